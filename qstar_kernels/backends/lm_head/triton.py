"""The ``"triton"`` backend of the LM-head ops: the Python tile loop of :class:`.base.TiledPasses`
with cuBLAS GEMMs (``torch.mm``, in the inputs' dtype, so float16/bfloat16 use the tensor cores) and the
Triton row kernels of :mod:`.triton_kernels` for everything that touches a tile
element-wise (the log-sum-exp, the Gumbel-max draw, the gradient of the log-softmax), in float32.

On CPU tensors it runs only under ``TRITON_INTERPRET=1`` (the tests). float64 inputs are not
supported here (use ``torch`` or ``cpu``).
"""

from __future__ import annotations

import torch
import triton

from . import triton_kernels as K
from .base import TiledPasses

__all__ = ["TritonPasses", "gumbel_noise_triton"]

_MAX_BLOCK = 1024
_MAX_TILE = 2048  # BLOCK_R * BLOCK: the elements one program holds per step


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK): up to 1024 ids per step, and as many rows as fit in 2048 elements."""
    block = max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1))))
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), _MAX_TILE // block))
    return block_r, block


def _launch(kernel, n_rows, n_cols, *args, **kwargs):
    block_r, block = _blocks(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, block_r),)
    kernel[grid](*args, BLOCK_R=block_r, BLOCK=block, num_warps=8 if block_r * block >= 2048 else 4, **kwargs)


class TritonPasses(TiledPasses):
    name = "triton"
    lowp_gemm = True

    def lse_rows(self, z, scale, out):
        r, c = z.shape
        _launch(K.lse_rows_kernel, r, c, z, z.stride(0), r, c, float(scale), out)

    def sample_rows(self, z, inv_t, lp_scale, seed, row0, v0, tokens, keys, lse):
        r, c = z.shape
        seed_lo, seed_hi = int(seed) & 0xFFFFFFFF, int(seed) >> 32
        _launch(
            K.sample_rows_kernel,
            r,
            c,
            z,
            z.stride(0),
            r,
            c,
            float(inv_t),
            float(lp_scale),
            seed_lo,
            seed_hi,
            int(row0),
            int(v0),
            tokens,
            keys,
            lse,
            GREEDY=inv_t == 0,
        )

    def grad_rows_(self, z, lse, index, coef, scale):
        r, c = z.shape
        _launch(K.grad_rows_kernel, r, c, z, z.stride(0), r, c, lse, index, coef, float(scale))


def gumbel_noise_triton(seed: int, row0: int, rows: int, vocab: int, device) -> torch.Tensor:
    """The Gumbel noise as the Triton sampling kernel draws it, ``(rows, vocab)`` float32."""
    out = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    seed_lo, seed_hi = int(seed) & 0xFFFFFFFF, int(seed) >> 32
    _launch(K.gumbel_noise_kernel, rows, vocab, out, rows, vocab, seed_lo, seed_hi, int(row0))
    return out
