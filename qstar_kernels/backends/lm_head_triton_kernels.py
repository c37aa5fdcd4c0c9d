"""Triton row kernels of the fused LM-head ops: one program per row of a logit tile ``z``
(``r x c``, contiguous), looping over the row in blocks of ``BLOCK`` ids.

* :func:`lse_rows_kernel`: ``lse = logsumexp(z * scale)``, an online log-sum-exp kept per lane
  (``BLOCK`` running maxima and sums, merged once at the end).
* :func:`sample_rows_kernel`: the same, plus the Gumbel-max key ``z * inv_t + G`` (or ``z`` when
  ``GREEDY``) with its running maximum and index per lane; the first index of the row maximum wins.
  ``G`` is the Philox4x32-10 noise defined in :mod:`qstar_kernels.reference.sampling`.
* :func:`grad_rows_kernel`: in place ``z <- coef * (onehot(index) - exp(z * scale - lse))``.

Every load is widened to float32 at once (float16/bfloat16 tiles on the GPU; the interpreter's
bfloat16 arithmetic is unreliable, which this also avoids). Rows with a NaN or +inf logit get
``lse = NaN``; rows of -inf only (all ids of the tile banned) get ``-inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["lse_rows_kernel", "sample_rows_kernel", "grad_rows_kernel", "gumbel_noise_kernel"]


@triton.jit
def _philox_gumbel(ids, row, k0, k1):
    """Gumbel noise of vocabulary ids ``ids`` (int64 >= 0) of row ``row`` (uint32), key (k0, k1)."""
    c0 = (ids >> 2).to(tl.uint32)
    c1 = tl.zeros_like(c0) + row
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c2 = hi0 ^ c3 ^ k1
        c1 = lo1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    lane = ids & 3
    word = tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))
    u = (((word >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08  # (2k + 1) / 2^24
    return -tl.log(-tl.log(u))


@triton.jit
def _online_lse_step(m, s, x):
    """Fold the block x (already scaled) into the per-lane running max m and sum s. The shift is
    0 while a lane has seen only -inf, so that -inf - -inf is never formed."""
    m_new = tl.maximum(m, x)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - shift) + tl.exp(x - shift)


@triton.jit
def _finish_lse(m, s, bad):
    top = tl.max(m, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    lse = shift + tl.log(tl.sum(s * tl.exp(m - shift), 0))  # log(0) = -inf for a row of -inf only
    return tl.where(tl.max(bad, 0) > 0, float("nan"), lse)


@triton.jit
def lse_rows_kernel(Z, stride_z, n_cols, scale, LSE, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * scale
        bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)
        m, s = _online_lse_step(m, s, x)
    tl.store(LSE + row, _finish_lse(m, s, bad))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "row0", "v0"])
def sample_rows_kernel(
    Z,
    stride_z,
    n_cols,
    inv_t,
    lp_scale,
    seed_lo,
    seed_hi,
    row0,
    v0,
    TOK,
    KEY,
    LSE,
    GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    noise_row = (row0 + row).to(tl.uint32)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        inside = cols < n_cols
        z = tl.load(z_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        x = z * lp_scale
        bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)
        m, s = _online_lse_step(m, s, x)
        if GREEDY:
            key = z
        else:
            key = z * inv_t + _philox_gumbel(v0 + cols.to(tl.int64), noise_row, k0, k1)
        key = tl.where(inside, key, float("-inf"))
        better = key > best  # strict: each lane keeps its first maximum
        best = tl.where(better, key, best)
        best_col = tl.where(better, cols, best_col)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, best_col, n_cols), 0)  # the first maximum of the row
    first = tl.where(top == float("-inf"), 0, first)
    tl.store(TOK + row, v0 + first.to(tl.int64))
    tl.store(KEY + row, top)
    tl.store(LSE + row, _finish_lse(m, s, bad))


@triton.jit
def grad_rows_kernel(Z, stride_z, n_cols, LSE, IDX, COEF, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    lse = tl.load(LSE + row).to(tl.float32)
    idx = tl.load(IDX + row)
    coef = tl.load(COEF + row).to(tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32)
        p = tl.exp(x * scale - lse)
        d = coef * (tl.where(cols == idx, 1.0, 0.0) - p)
        tl.store(z_row + cols, d.to(Z.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "row0"])
def gumbel_noise_kernel(OUT, n_cols, seed_lo, seed_hi, row0, BLOCK: tl.constexpr):
    """The noise of rows [row0, row0 + grid) and ids [0, n_cols), float32 (for tests)."""
    row = tl.program_id(0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        g = _philox_gumbel(cols.to(tl.int64), (row0 + row).to(tl.uint32), k0, k1)
        tl.store(OUT + row.to(tl.int64) * n_cols + cols, g, mask=cols < n_cols)
