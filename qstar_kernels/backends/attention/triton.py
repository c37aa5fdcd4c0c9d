"""The ``"triton"`` backend of ``thought_attention``: launchers for the kernels in
:mod:`.triton_kernels`, run behind the custom op ``qstar::thought_attention_fwd``.

It runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before the first
use (the interpreter, for tests). Inputs are read in place through their strides (no copies, no
``repeat_kv``); fp16/bf16 go through the tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import contextlib
import functools

import torch

#: Test hook: fill every buffer the kernels write with NaN first, so a test can check that each
#: element was written.
POISON_OUTPUTS = False


def _empty(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


@functools.cache
def _kernels():
    from . import triton_kernels

    return triton_kernels


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products unless the user allowed TF32 for matmuls, as torch does.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _block_d(D: int) -> int:
    """The head dim padded to a power of two >= 16 (tl.dot's smallest size)."""
    return max(16, _pow2(D))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _common(q, k, keep):
    tk = _kernels()
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    depth = k.shape[2] // L - 1
    has_keep = keep is not None
    if has_keep:
        keep_arg = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
        keep_strides = (keep_arg.stride(0), keep_arg.stride(1))
    else:
        keep_arg = q  # never read
        keep_strides = (0, 0)
    upcast = tk.INTERPRETED  # the interpreter's bf16 arithmetic is wrong; fp32 is exact there
    return tk, B, Hq, Hkv, L, D, depth, keep_arg, keep_strides, has_keep, upcast


def forward(q, k, v, keep, scale: float, window: int):
    """(out (B, Hq, L, D) in q.dtype, lse (B, Hq, L) float32)."""
    tk, B, Hq, Hkv, L, D, depth, keep_arg, ks, has_keep, upcast = _common(q, k, keep)
    out = _empty(q.shape, like=q)
    lse = _empty((B, Hq, L), like=q, dtype=torch.float32)
    has_window = window > 0
    grid = lambda meta: (_cdiv(L, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        tk.thought_attention_fwd_kernel[grid](
            q, k, v, out, lse, keep_arg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ks,
            Hq, L, D, depth, Hq // Hkv, window if has_window else 0, scale * tk.LOG2E,
            HAS_KEEP=has_keep, HAS_WINDOW=has_window, UPCAST=upcast, PRECISION=_precision(q.dtype),
            BLOCK_D=_block_d(D),
        )  # fmt: skip
    return out, lse


def backward(grad_out, grad_lse, q, k, v, out, lse, keep, scale: float, window: int):
    """(dq, dk, dv) in the inputs' dtypes; ``grad_lse`` may be None."""
    tk, B, Hq, Hkv, L, D, depth, keep_arg, ks, has_keep, upcast = _common(q, k, keep)
    G = Hq // Hkv
    has_window = window > 0
    win = window if has_window else 0
    block_d = _block_d(D)
    precision = _precision(q.dtype)
    delta = _empty((B, Hq, L), like=q, dtype=torch.float32)
    lse2 = _empty((B, Hq, L), like=q, dtype=torch.float32)
    dq = _empty(q.shape, like=q, dtype=torch.float32)  # fp32: the diagonal and text parts add up here
    dk = _empty(k.shape, like=k)
    dv = _empty(v.shape, like=v)
    has_dlse = grad_lse is not None
    dlse = grad_lse.contiguous() if has_dlse else lse
    qk_scale = scale * tk.LOG2E
    rows = lambda meta: (_cdiv(L, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        # Per row, for the G query heads of each kv head: delta, the lse in base 2, and the whole
        # diagonal part (dK, dV of the thought blocks; dQ's diagonal part initialises dq).
        tk.thought_attention_bwd_rows_kernel[lambda meta: (_cdiv(L, meta["BLOCK_M"]), B * Hkv)](
            q, k, v, out, grad_out, dlse, lse, delta, lse2, dq, dk, dv, keep_arg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(),
            *dk.stride(), *ks,
            Hq, Hkv, L, D, depth, G, qk_scale, scale,
            HAS_DLSE=has_dlse, HAS_KEEP=has_keep, G_PAD=_pow2(G), BLOCK_D=block_d,
        )  # fmt: skip
        # The text block: dK, dV (one program per key tile), then dQ += its text part.
        tk.thought_attention_bwd_dkdv_kernel[lambda meta: (_cdiv(L, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, grad_out, lse2, delta, dk, dv, keep_arg,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *ks,
            Hq, Hkv, L, D, G, win, qk_scale, scale,
            HAS_KEEP=has_keep, HAS_WINDOW=has_window, UPCAST=upcast, PRECISION=precision, BLOCK_D=block_d,
        )  # fmt: skip
        tk.thought_attention_bwd_dq_kernel[rows](
            q, k, v, grad_out, lse2, delta, dq, keep_arg,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *ks,
            Hq, L, D, G, win, qk_scale, scale,
            HAS_KEEP=has_keep, HAS_WINDOW=has_window, UPCAST=upcast, PRECISION=precision, BLOCK_D=block_d,
        )  # fmt: skip
    return dq.to(q.dtype), dk, dv
