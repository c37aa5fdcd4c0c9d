"""The ``"triton"`` backend of the LM-head ops: the Python tile loop of :mod:`.lm_head_chunked` with
cuBLAS GEMMs (``torch.mm``, in the inputs' dtype, so float16/bfloat16 use the tensor cores) and the
Triton row kernels of :mod:`.lm_head_triton_kernels` for everything that touches a tile
element-wise (the log-sum-exp, the Gumbel-max draw, the gradient of the log-softmax), in float32.

On CPU tensors it runs only under ``TRITON_INTERPRET=1`` (the tests). float64 inputs are not
supported here (use ``torch`` or ``cpu``).
"""

from __future__ import annotations

import torch
import triton

from . import lm_head_triton_kernels as K
from .lm_head_chunked import TiledPasses

__all__ = ["TritonPasses", "gumbel_noise_triton"]

_MAX_BLOCK = 1024


def _block(n_cols: int) -> int:
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1))))


def _warps(block: int) -> int:
    return 8 if block >= 1024 else 4


class TritonPasses(TiledPasses):
    name = "triton"
    lowp_gemm = True

    def lse_rows(self, z, scale, out):
        r, c = z.shape
        block = _block(c)
        K.lse_rows_kernel[(r,)](z, z.stride(0), c, float(scale), out, BLOCK=block, num_warps=_warps(block))

    def sample_rows(self, z, inv_t, lp_scale, seed, row0, v0, tokens, keys, lse):
        r, c = z.shape
        block = _block(c)
        K.sample_rows_kernel[(r,)](
            z,
            z.stride(0),
            c,
            float(inv_t),
            float(lp_scale),
            int(seed) & 0xFFFFFFFF,
            int(seed) >> 32,
            int(row0),
            int(v0),
            tokens,
            keys,
            lse,
            GREEDY=inv_t == 0,
            BLOCK=block,
            num_warps=_warps(block),
        )

    def grad_rows_(self, z, lse, index, coef, scale):
        r, c = z.shape
        block = _block(c)
        K.grad_rows_kernel[(r,)](
            z, z.stride(0), c, lse, index, coef, float(scale), BLOCK=block, num_warps=_warps(block)
        )


def gumbel_noise_triton(seed: int, row0: int, rows: int, vocab: int, device) -> torch.Tensor:
    """The Gumbel noise as the Triton sampling kernel draws it, ``(rows, vocab)`` float32."""
    out = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    block = _block(vocab)
    seed_lo, seed_hi = int(seed) & 0xFFFFFFFF, int(seed) >> 32
    K.gumbel_noise_kernel[(rows,)](out, vocab, seed_lo, seed_hi, int(row0), BLOCK=block)
    return out
