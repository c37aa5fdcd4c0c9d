"""The ``"torch"`` backend of the LM-head ops: the Python tile loop of :class:`.base.TiledPasses`
with row kernels written as plain PyTorch ops, so it runs on any device. The Gumbel noise is the
Philox4x32-10 stream of :mod:`qstar_kernels.reference.sampling`, computed with int64 tensor ops
(32-bit products split in 16-bit halves so that nothing overflows), so this backend draws the same
tokens as the others for the same seed.
"""

from __future__ import annotations

import torch

from ...reference.sampling import PHILOX_KEY_INCREMENTS, PHILOX_ROUND_MULTIPLIERS
from .base import TiledPasses

__all__ = ["TorchPasses", "philox_gumbel_torch"]

_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * m for int64 tensors a < 2**32 and an int m < 2**32."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    t_lo = a * m_lo  # < 2**48
    t_hi = a * m_hi  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi, lo


def _philox(c0, c1, c2, c3, k0: int, k1: int):
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_ROUND_MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_ROUND_MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_INCREMENTS[0]) & _MASK32
        k1 = (k1 + PHILOX_KEY_INCREMENTS[1]) & _MASK32
    return c0, c1, c2, c3


def philox_gumbel_torch(seed: int, row0: int, rows: int, v0: int, cols: int, device) -> torch.Tensor:
    """The float32 Gumbel noise of rows [row0, row0 + rows) and ids [v0, v0 + cols)."""
    q0, q1 = v0 >> 2, (v0 + cols - 1 >> 2) + 1  # the counters that cover the ids
    q = torch.arange(q0, q1, dtype=torch.int64, device=device)[None, :]  # (1, nq)
    i = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)[:, None]  # (rows, 1)
    q, i = torch.broadcast_tensors(q, i)
    zero = torch.zeros_like(q)
    words = torch.stack(_philox(q, i, zero, zero, seed & _MASK32, seed >> 32), dim=-1)  # (rows, nq, 4)
    words = words.reshape(rows, -1)[:, v0 - 4 * q0 : v0 - 4 * q0 + cols]  # word v % 4 of counter v // 4
    u = ((words >> 9) * 2 + 1).to(torch.float32) * 2.0**-24
    return -torch.log(-torch.log(u))


def _lse_rows(x: torch.Tensor) -> torch.Tensor:
    lse = torch.logsumexp(x, dim=1)
    return torch.where(lse == float("inf"), torch.full_like(lse, float("nan")), lse)


class TorchPasses(TiledPasses):
    name = "torch"

    def lse_rows(self, z, scale, out):
        out.copy_(_lse_rows(z.to(out.dtype) * scale))

    def sample_rows(self, z, inv_t, lp_scale, seed, row0, v0, tokens, keys, lse):
        x = z.to(lse.dtype)
        lse.copy_(_lse_rows(x * lp_scale))
        if inv_t == 0:
            key = x
        else:
            key = x * inv_t + philox_gumbel_torch(seed, row0, x.shape[0], v0, x.shape[1], x.device).to(
                x.dtype
            )
        best, idx = key.max(dim=1)  # the first maximum of each row
        keys.copy_(best)
        tokens.copy_(idx + v0)

    def grad_rows_(self, z, lse, index, coef, scale):
        d = (z.to(lse.dtype) * scale - lse[:, None]).exp_().mul_(-coef[:, None])
        inside = ((index >= 0) & (index < z.shape[1])).nonzero()[:, 0]
        d.index_put_((inside, index[inside]), coef[inside], accumulate=True)
        z.copy_(d)
