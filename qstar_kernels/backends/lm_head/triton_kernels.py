"""Triton row kernels of the fused LM-head ops: one program per ``BLOCK_R`` rows of a logit tile
``z`` (``r x c``, contiguous), looping over the rows in blocks of ``BLOCK`` ids.

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

import os

import triton
import triton.language as tl

__all__ = ["lse_rows_kernel", "sample_rows_kernel", "grad_rows_kernel", "gumbel_noise_kernel", "INTERPRETED"]

#: Whether the kernels below were decorated for the interpreter (``@triton.jit`` reads
#: ``TRITON_INTERPRET`` when this module loads; the dispatch refuses a later change).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _philox_gumbel(ids, rows, k0, k1):
    """Gumbel noise of vocabulary ids ``ids`` (int64 >= 0, shape (1, B)) of rows ``rows`` (uint32,
    shape (R, 1)), key (k0, k1): Philox4x32-10 at counter (id // 4, row, 0, 0), word id % 4."""
    c0 = (ids >> 2).to(tl.uint32) + tl.zeros_like(rows)  # (R, B)
    c1 = rows + tl.zeros_like(c0)
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
    """Per row (axis 1): merge the lanes; NaN if a lane saw a NaN or +inf."""
    top = tl.max(m, 1)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(s * tl.exp(m - shift[:, None]), 1)  # 0 when the row saw only -inf
    lse = tl.where(total > 0, shift + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    return tl.where(tl.max(bad, 1) > 0, float("nan"), lse)


@triton.jit
def lse_rows_kernel(Z, stride_z, n_rows, n_cols, scale, LSE, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    z_rows = Z + rows.to(tl.int64)[:, None] * stride_z
    m = tl.full([BLOCK_R, BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK], tl.float32)
    bad = tl.zeros([BLOCK_R, BLOCK], tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)[None, :]
        inside = row_ok[:, None] & (cols < n_cols)
        x = tl.load(z_rows + cols, mask=inside, other=float("-inf")).to(tl.float32) * scale
        bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)
        m, s = _online_lse_step(m, s, x)
    tl.store(LSE + rows, _finish_lse(m, s, bad), mask=row_ok)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "row0", "v0"])
def sample_rows_kernel(
    Z,
    stride_z,
    n_rows,
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
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    z_rows = Z + rows.to(tl.int64)[:, None] * stride_z
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    noise_rows = (row0 + rows).to(tl.uint32)[:, None]  # the rows' indices in the whole call
    m = tl.full([BLOCK_R, BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK], tl.float32)
    bad = tl.zeros([BLOCK_R, BLOCK], tl.int32)
    best = tl.full([BLOCK_R, BLOCK], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK_R, BLOCK], tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)[None, :]
        inside = row_ok[:, None] & (cols < n_cols)
        z = tl.load(z_rows + cols, mask=inside, other=float("-inf")).to(tl.float32)
        x = z * lp_scale
        bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)
        m, s = _online_lse_step(m, s, x)
        if GREEDY:
            key = z
        else:
            key = z * inv_t + _philox_gumbel(v0 + cols.to(tl.int64), noise_rows, k0, k1)
        key = tl.where(inside, key, float("-inf"))
        better = key > best  # strict: each lane keeps its first maximum
        best = tl.where(better, key, best)
        best_col = tl.where(better, cols, best_col)
    top = tl.max(best, 1)
    first = tl.min(tl.where(best == top[:, None], best_col, n_cols), 1)  # the row's first maximum
    first = tl.where(top == float("-inf"), 0, first)
    tl.store(TOK + rows, v0 + first.to(tl.int64), mask=row_ok)
    tl.store(KEY + rows, top, mask=row_ok)
    tl.store(LSE + rows, _finish_lse(m, s, bad), mask=row_ok)


@triton.jit
def grad_rows_kernel(
    Z, stride_z, n_rows, n_cols, LSE, IDX, COEF, scale, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    z_rows = Z + rows.to(tl.int64)[:, None] * stride_z
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    idx = tl.load(IDX + rows, mask=row_ok, other=-1)[:, None]
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)[None, :]
        inside = row_ok[:, None] & (cols < n_cols)
        x = tl.load(z_rows + cols, mask=inside, other=0.0).to(tl.float32)
        p = tl.exp(x * scale - lse)
        d = coef * (tl.where(cols == idx, 1.0, 0.0) - p)
        tl.store(z_rows + cols, d.to(Z.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "row0"])
def gumbel_noise_kernel(
    OUT, n_rows, n_cols, seed_lo, seed_hi, row0, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr
):
    """The noise of rows [row0, row0 + n_rows) and ids [0, n_cols), float32 (for tests)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)[None, :]
        g = _philox_gumbel(cols.to(tl.int64), (row0 + rows).to(tl.uint32)[:, None], k0, k1)
        out = OUT + rows.to(tl.int64)[:, None] * n_cols + cols
        tl.store(out, g, mask=row_ok[:, None] & (cols < n_cols))
