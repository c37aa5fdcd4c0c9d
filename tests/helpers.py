"""Shared test helpers: random inputs, padding patterns and the per-dtype error criterion."""

from __future__ import annotations

import math

import pytest
import torch

import qstar_kernels
from qstar_kernels.reference import build_thought_mask, thought_attention_reference


def make_padding(B: int, L: int, kind: str, device="cpu") -> torch.Tensor | None:
    """A (B, L) keep mask. kinds: none, end (right padding), start (left padding), both, random."""
    if kind == "none":
        return None
    keep = torch.ones(B, L, dtype=torch.bool, device=device)
    for b in range(B):
        n_pad = (b + 1) * max(1, L // 5) if L > 1 else 0
        n_pad = min(n_pad, L - 1) if b % 2 == 0 else min(n_pad, L)  # odd rows may be all padding
        if kind == "end" and n_pad:
            keep[b, L - n_pad :] = False
        elif kind == "start" and n_pad:
            keep[b, :n_pad] = False
        elif kind == "both" and n_pad:
            keep[b, : (n_pad + 1) // 2] = False
            keep[b, L - n_pad // 2 :] = False
        elif kind == "random":
            keep[b] = torch.rand(L) > 0.3
    return keep


def make_qkv(
    B, Hq, Hkv, L, depth, D, dtype=torch.float32, device="cpu", requires_grad=False, layout="contig"
):
    """Fresh random q, k, v. layout="strided" gives non-contiguous views with the same values."""
    Lk = (depth + 1) * L
    if layout == "contig":
        q = torch.randn(B, Hq, L, D, device=device)
        k = torch.randn(B, Hkv, Lk, D, device=device)
        v = torch.randn(B, Hkv, Lk, D, device=device)
    else:  # the layout a (B, L, H, D) projection gives after transpose(1, 2), plus a strided D
        q = torch.randn(B, L, Hq, 2 * D, device=device)[..., ::2].transpose(1, 2)
        k = torch.randn(B, Lk, Hkv, D, device=device).transpose(1, 2)
        v = torch.randn(B, Hkv, D, Lk, device=device).transpose(2, 3)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def plain_lowp_attention(q, k, v, keep=None, window=None, scale=None):
    """Dense eager attention computed entirely in the inputs' dtype: the yardstick for the error a
    low-precision fast path may have (the flash-attn test criterion)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    depth = k.shape[2] // L - 1
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = build_thought_mask(L, depth, keep, window, device=q.device)
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ kr.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ vr


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Tolerances per dtype when the reference runs in float64 (``docs/kernels.md``, "Testing rules for
# every kernel").
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOWP = (torch.float16, torch.bfloat16)


def assert_close_to_reference(name, got, want64, lowp_yardstick=None, dtype=torch.float32, rtol_mult=2.0):
    """``got`` must be finite where ``want64`` is, and within the dtype tolerance; for fp16/bf16 also
    within ``rtol_mult`` x the plain low-precision computation's error plus a small atol."""
    assert got.shape == want64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    finite = torch.isfinite(want64)
    assert not torch.isnan(got).any(), f"{name}: NaN in output"
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite entries differ from reference"
    err = max_err(got[finite], want64[finite])
    scale = max(1.0, want64[finite].abs().max().item()) if finite.any() else 1.0
    if dtype in LOWP and lowp_yardstick is not None:
        base = max_err(lowp_yardstick[finite], want64[finite])
        bound = rtol_mult * base + ATOL[dtype] * scale
    else:
        bound = ATOL[dtype] * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (dtype {dtype})"


def reference64(q, k, v, **kw):
    return thought_attention_reference(q.double(), k.double(), v.double(), **kw)


def skip_unavailable(backend, device="cpu"):
    if backend not in qstar_kernels.available_backends(device):
        pytest.fail(f"backend {backend!r} is not available in this build; build it before testing")


def run_backend_case(backend, c, dtype, check_backward=True, B=2, Hkv=2, device="cpu"):
    """One case ``c`` (L, depth, G, D, pad, window, layout) of ``backend`` against the float64
    reference: out and lse, then dq, dk, dv through both (the lse gradient included)."""
    skip_unavailable(backend, device)
    Hq = Hkv * c["G"]
    q, k, v = make_qkv(
        B,
        Hq,
        Hkv,
        c["L"],
        c["depth"],
        c["D"],
        dtype=dtype,
        requires_grad=True,
        layout=c["layout"],
        device=device,
    )
    keep = make_padding(B, c["L"], c["pad"], device=device)
    kw = dict(key_padding_mask=keep, sliding_window=c["window"])

    out, lse = qstar_kernels.thought_attention(q, k, v, return_lse=True, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = reference64(q64, k64, v64, return_lse=True, **kw)

    yard_out = None
    if dtype in LOWP:
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        yard_out = plain_lowp_attention(ql, kl, vl, keep, c["window"])
    assert_close_to_reference("out", out, out64, yard_out, dtype)
    assert_close_to_reference("lse", lse, lse64, None, torch.float32 if dtype not in LOWP else torch.float16)

    # Rows that may attend to nothing are exactly zero (left padding), never NaN.
    empty = torch.isneginf(lse64)
    if empty.any():
        assert torch.all(out.detach()[empty] == 0)

    if not check_backward:
        return
    grad_out = torch.randn_like(out64)
    grad_lse = torch.randn_like(lse64).masked_fill(empty, 0.0)
    loss = (out.double() * grad_out).sum() + (torch.where(empty, 0.0, lse.double()) * grad_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    loss64 = (out64 * grad_out).sum() + (torch.where(empty, 0.0, lse64) * grad_lse).sum()
    grads64 = torch.autograd.grad(loss64, (q64, k64, v64))
    yard = [None] * 3
    if dtype in LOWP:
        yo = yard_out
        yard = torch.autograd.grad((yo.double() * grad_out).sum(), (ql, kl, vl))
    for name, g, g64, y in zip(("dq", "dk", "dv"), grads, grads64, yard):
        assert g.dtype == dtype
        # The lse gradient has no low-precision yardstick; give fp16/bf16 the lse path's slack too.
        assert_close_to_reference(name, g, g64, None if y is None else y, dtype, rtol_mult=3.0)
        if empty.any() and name == "dq":
            assert torch.all(g[empty] == 0), "rows with nothing to attend to must get zero gradient"
