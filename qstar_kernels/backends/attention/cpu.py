"""The ``"cpu"`` backend of ``thought_attention``: the C++/OpenMP kernels of ``csrc/cpu``, run behind
the custom op ``qstar::thought_attention_fwd`` (:mod:`qstar_kernels.custom_ops`), whose autograd
calls :func:`backward`.

The kernels compute in float32 (float64 for float64 inputs); float16/bfloat16 inputs are widened
on entry and the output is rounded back to the input dtype.
"""

from __future__ import annotations

import torch

from ... import _ext


def _window_any(bad: torch.Tensor, window: int) -> torch.Tensor:
    """(..., L) bool -> (..., L): any bad[j] for j in (i - window, i] (window <= 0: j <= i)."""
    counts = torch.cumsum(bad.to(torch.int64), dim=-1)
    if window > 0 and window < bad.shape[-1]:
        shifted = torch.nn.functional.pad(counts, (window, 0))[..., : counts.shape[-1]]
        counts = counts - shifted
    return counts > 0


def _window_any_ahead(hit: torch.Tensor, window: int) -> torch.Tensor:
    """(..., L) bool -> (..., L): any hit[i] for i in [j, j + window) (window <= 0: i >= j)."""
    return _window_any(hit.flip(-1), window).flip(-1)


@torch.no_grad()
def _mark_nonfinite_rows(out, lse, q, k, v, keep, window):
    """Set out and lse to NaN in every row that sees a non-finite query, key or value; returns
    the (B, Hq, L) bool mask of those rows."""
    B, Hq, L, _ = q.shape
    Hkv = k.shape[1]
    depth = k.shape[2] // L - 1
    real = torch.ones(B, L, dtype=torch.bool, device=q.device) if keep is None else keep
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, (a+1)L)
    # Text keys j <= i (inside the window) that are real, and row i's own diagonal keys.
    hits = _window_any(bad_kv[..., :L] & real[:, None, :], window)  # (B, Hkv, L)
    if depth > 0:
        hits |= bad_kv[..., L:].reshape(B, Hkv, depth, L).any(2) & real[:, None, :]
    hits = hits.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, L)
    # A query row with a non-finite entry poisons its row, unless the row sees nothing at all.
    sees = _window_any(real, window)
    if depth > 0:
        sees = sees | real
    hits |= ~torch.isfinite(q).all(-1) & sees[:, None, :]
    out[hits] = float("nan")
    lse[hits] = float("nan")
    return hits


@torch.no_grad()
def _mark_nonfinite_grads(hits, dq, dk, dv, keep, window):
    """The backward twin: the gradients of a NaN row and of every key/value it reads are NaN
    (the kernel's exp would otherwise drop that row's share quietly)."""
    B, Hq, L, _ = dq.shape
    Hkv = dk.shape[1]
    depth = dk.shape[2] // L - 1
    real = torch.ones(B, L, dtype=torch.bool, device=dq.device) if keep is None else keep
    dq[hits] = float("nan")
    rows = hits.reshape(B, Hkv, Hq // Hkv, L).any(2)  # (B, Hkv, L): a NaN row of the kv group
    text_read = _window_any_ahead(rows, window) & real[:, None, :]  # keys j read by rows i >= j
    dk[:, :, :L][text_read] = float("nan")
    dv[:, :, :L][text_read] = float("nan")
    if depth > 0:
        diag_read = (rows & real[:, None, :])[:, :, None, :].expand(B, Hkv, depth, L)
        dk[:, :, L:].view(B, Hkv, depth, L, -1)[diag_read] = float("nan")
        dv[:, :, L:].view(B, Hkv, depth, L, -1)[diag_read] = float("nan")


def forward(q, k, v, keep, scale: float, window: int):
    """(out in q.dtype, lse float32 (float64 for float64 inputs)) from the C++ kernel."""
    ext = _ext.cpu_extension()
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute).contiguous() for t in (q, k, v))
    out, lse = ext.thought_attention_fwd(qc, kc, vc, keep, scale, window)
    # The kernel's exp treats a NaN score like a masked one. One cheap reduction finds
    # non-finite inputs (a diverging run); then the rows that read them are made NaN, as the
    # dense computation makes them, instead of coming out quietly finite.
    if not torch.isfinite(qc.sum() + kc.sum() + vc.sum()):
        _mark_nonfinite_rows(out, lse, qc, kc, vc, keep, window)
    return out.to(q.dtype), lse


def backward(grad_out, grad_lse, q, k, v, out, lse, keep, scale: float, window: int):
    """(dq, dk, dv) in the inputs' dtypes; ``grad_out`` or ``grad_lse`` may be None."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute).contiguous() for t in (q, k, v))
    out = out.to(compute).contiguous()
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(compute).contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.to(lse.dtype).contiguous()
    dq, dk, dv = _ext.cpu_extension().thought_attention_bwd(
        grad_out, qc, kc, vc, out, lse, grad_lse, keep, scale, window
    )
    if not torch.isfinite(qc.sum() + kc.sum() + vc.sum()):
        scratch_out, scratch_lse = out.clone(), lse.clone()
        hits = _mark_nonfinite_rows(scratch_out, scratch_lse, qc, kc, vc, keep, window)
        if hits.any():
            _mark_nonfinite_grads(hits, dq, dk, dv, keep, window)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
