"""``thought_attention``: the public op and its input checks. The backend comes from
:mod:`qstar_kernels.dispatch`; the compiled backends run behind the custom op
``qstar::thought_attention_fwd`` (:mod:`qstar_kernels.custom_ops`).

Shapes (``docs/kernels.md``, "Contract: thought attention")::

    q:    (B, Hq, L, D)
    k, v: (B, Hkv, (a + 1) * L, D)   the text block, then one block of L keys per thought step
    out:  (B, Hq, L, D), dtype of q      lse (optional): (B, Hq, L), natural log, float32
"""

from __future__ import annotations

import math

import torch

from . import custom_ops, dispatch
from ._checks import as_float, as_int, check_floating, shape_of
from .backends.attention import torch as _torch_backend
from .dispatch import BACKENDS, BackendUnavailableError, available_backends
from .reference.attention import dense_thought_attention

__all__ = ["thought_attention", "available_backends", "BACKENDS", "BackendUnavailableError"]


def _validate(q, k, v, key_padding_mask, scale, sliding_window, return_lse):
    """Check every argument once; returns ``(keep, scale, sliding_window)`` with ``keep`` the
    padding mask as a contiguous bool ``(B, L)`` tensor (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            shape = "(B, Hq, L, D)" if name == "q" else "(B, Hkv, (a+1)*L, D)"
            raise ValueError(f"{name} must be 4-D {shape}, got {t.dim()}-D with shape {shape_of(t)}")
        check_floating(name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    B, Hq, L, D = q.shape
    if Hq < 1 or L < 1 or D < 1:
        raise ValueError(f"q must have Hq >= 1, L >= 1 and D >= 1, got shape {shape_of(q)} (B, Hq, L, D)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {shape_of(k)} and v {shape_of(v)}")
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size must equal q's B={B}, got k shape {shape_of(k)}")
    if k.shape[3] != D:
        raise ValueError(f"k/v head dim must equal q's D={D}, got k shape {shape_of(k)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"the query heads Hq={Hq} must be a positive multiple of the key/value heads Hkv={Hkv} "
            f"(q shape {shape_of(q)}, k shape {shape_of(k)})"
        )
    if Lk < L or Lk % L != 0:
        raise ValueError(
            f"the key length must be (a+1)*L for an integer a >= 0 with L={L} (q.shape[2]), "
            f"got k.shape[2]={Lk}"
        )
    keep = None
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool and (m.dtype.is_floating_point or m.dtype.is_complex):
            raise TypeError(
                f"key_padding_mask must be bool (True = real token) or an integer 0/1 tensor, got {m.dtype}"
            )
        if m.dim() != 2 or m.shape[0] != B or m.shape[1] != L:
            raise ValueError(f"key_padding_mask must have shape (B={B}, L={L}), got {shape_of(m)}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device} like q, got {m.device}")
        keep = m.to(torch.bool).contiguous()  # (B, L), the one form every backend reads
    if scale is not None:
        scale = as_float("scale", scale, "None or a real number", finite=False)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    if sliding_window is not None:
        sliding_window = as_int("sliding_window", sliding_window, "None or an int")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return keep, scale, sliding_window


def thought_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Quiet-STaR thought attention: causal over the text block plus one diagonal per thought step.

    Query ``i`` sees text key ``j`` iff ``j <= i``, ``keep[b, j]`` and (with a window ``W``)
    ``i - j < W``; and key ``i`` of each of the ``a`` thought blocks iff ``keep[b, i]``. Query head
    ``h`` reads key/value head ``h // (Hq // Hkv)`` (no ``repeat_kv`` copies).

    Args:
        q: ``(B, Hq, L, D)`` queries of the current step.
        k, v: ``(B, Hkv, (a+1)*L, D)`` keys/values: the text block, then one block per step.
        key_padding_mask: optional ``(B, L)``, True (or 1) for real tokens.
        scale: softmax scale, default ``1/sqrt(D)``.
        sliding_window: optional window ``W`` on the text block (``i - j < W``).
        return_lse: also return the ``(B, Hq, L)`` float32 log-sum-exp (``-inf`` on rows that
            see nothing; float64 for float64 inputs). It is differentiable.
        backend: ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``, or None to choose
            by device (``"cpu"`` for CPU tensors, ``"triton"`` for CUDA tensors; the ``QSTAR_BACKEND``
            environment variable overrides the automatic choice; see :mod:`qstar_kernels.dispatch`).
            ``"cuda"`` (the kernels of ``csrc/cuda``, head dims 64 and 128) is chosen only explicitly.

    Returns:
        ``out`` ``(B, Hq, L, D)`` in ``q.dtype``, or ``(out, lse)`` with ``return_lse=True``.
        Rows with nothing to attend to (left padding) give zeros, zero gradients and ``lse=-inf``.
    """
    keep, scale, sliding_window = _validate(q, k, v, key_padding_mask, scale, sliding_window, return_lse)
    chosen = dispatch.select_backend("thought_attention", backend, q.device, q.dtype, q.shape[-1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    window = -1 if sliding_window is None else sliding_window
    if chosen == "reference":
        return dense_thought_attention(q, k, v, keep, scale, sliding_window, return_lse)
    if chosen == "torch":
        return _torch_backend.forward(q, k, v, keep, scale, window, return_lse)
    out, lse = custom_ops.thought_attention_fwd(q, k, v, keep, float(scale), window, chosen)
    return (out, lse) if return_lse else out
