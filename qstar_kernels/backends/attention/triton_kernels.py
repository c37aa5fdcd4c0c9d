"""Triton kernels of thought attention: one online softmax over the causal text block plus the
``depth`` diagonal keys of each row, and its backward.

Every kernel works in base 2: scores are multiplied by ``scale * log2(e)`` once, so the
softmax uses ``exp2``; the stored ``lse`` is converted back to the natural log.

Layout of keys and values (``docs/kernels.md``, "Contract: thought attention")::

    k, v: (B, Hkv, (depth + 1) * L, D)   [ text block | step-1 block | ... | step-depth block ]

Query ``i`` of head ``h`` reads kv head ``h // G``: text keys ``j <= i`` (real, inside the window)
and key ``i`` of each thought block (when token ``i`` is real). The text part runs over tiles
with ``tl.dot``; the diagonal part is ``depth`` row-wise dot products, so it never touches a tile.

This module is imported lazily: ``@triton.jit`` reads ``TRITON_INTERPRET`` when it runs.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Whether the kernels below were decorated for the interpreter (fixed when this module loads).
INTERPRETED = interpreting()


# ----------------------------------------------------------------------------------------------
# Configurations. On a GPU the autotuner picks among these per head dim (BLOCK_D), text length and
# dtype. Under the interpreter multi-config autotuning does not work, so one small config runs
# (small tiles also make the tests cross many tile boundaries at L <= 64).
# ----------------------------------------------------------------------------------------------

_INTERPRET_BLOCK = int(os.environ.get("QSTAR_TRITON_INTERPRET_BLOCK", "16"))


def _cfgs(*specs):
    """Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in specs
    ]


def arch_family(capability: tuple[int, int]) -> int:
    """80 for Ampere/Ada (sm_8x), 90 for Hopper and later: the two tables below."""
    return 80 if capability[0] < 9 else 90


def head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


#: Every config any table may use, per kernel (``scripts/triton_resources.py --candidates``
#: compiles them all). Forward/dQ: BLOCK_M query rows per program, BLOCK_N keys per tile.
#: dK/dV: BLOCK_N keys per program, BLOCK_M query rows per tile. Elementwise kernels use BLOCK_M.
CANDIDATES = {
    "fwd": [
        (128, 64, 8, 2), (128, 64, 4, 3), (128, 32, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
        (64, 32, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2),
    ],
    "bwd_dkdv": [
        (32, 128, 8, 2), (32, 128, 8, 1), (16, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2),
        (16, 64, 4, 3), (16, 64, 4, 2), (16, 32, 4, 2),
    ],
    "bwd_dq": [
        (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2), (32, 64, 4, 3),
        (32, 32, 4, 3), (32, 32, 4, 2),
    ],
    # BLOCK_M rows of G_PAD heads each; the table below gives BLOCK_M * G_PAD.
    "bwd_rows": [(bm, 16, w, 1) for bm in (1, 2, 4, 8, 16, 32, 64, 128) for w in (4, 8)],
}  # fmt: skip

#: What the autotuner may pick on a GPU: per kernel, per (arch family, head-dim class), the
#: candidates that compile without register spills there (checked by scripts/triton_resources.py
#: for D=64 and D=128; D=256 has small tiles but no such guarantee).
CONFIG_TABLE = {
    "fwd": {
        (80, 64): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        (90, 64): [(128, 64, 8, 2), (128, 64, 4, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4)],
        (80, 128): [(128, 32, 8, 2), (64, 32, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2)],
        (90, 128): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4), (32, 32, 4, 2)],
        (80, 256): [(32, 32, 4, 2)],
        (90, 256): [(32, 32, 4, 2)],
    },
    # bwd_rows: (BLOCK_M * G_PAD, -, warps, stages): its tiles hold the G query heads of a kv head.
    "bwd_rows": {
        (80, 64): [(128, 16, 8, 1), (64, 16, 4, 1), (32, 16, 4, 1)],
        (90, 64): [(128, 16, 8, 1), (64, 16, 4, 1), (32, 16, 4, 1)],
        (80, 128): [(64, 16, 8, 1), (32, 16, 8, 1), (16, 16, 4, 1)],
        (90, 128): [(64, 16, 8, 1), (32, 16, 8, 1), (16, 16, 4, 1)],
        (80, 256): [(16, 16, 4, 1)],
        (90, 256): [(16, 16, 4, 1)],
    },
    "bwd_dkdv": {
        (80, 64): [(32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2)],
        (90, 64): [(32, 128, 8, 2), (16, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)],
        (80, 128): [(16, 128, 8, 2), (64, 64, 8, 2), (16, 64, 4, 3), (16, 64, 4, 2)],
        (90, 128): [(32, 128, 8, 2), (32, 128, 8, 1), (16, 64, 4, 3), (16, 64, 4, 2)],
        (80, 256): [(16, 32, 4, 2)],
        (90, 256): [(16, 32, 4, 2)],
    },
    "bwd_dq": {
        (80, 64): [(128, 32, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 4, 3)],
        (90, 64): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
        (80, 128): [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 3)],
        (90, 128): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
        (80, 256): [(32, 32, 4, 2)],
        (90, 256): [(32, 32, 4, 2)],
    },
}


def table_specs(kind: str, arch: int, block_d: int, g_pad: int = 1) -> list[tuple]:
    """The (BLOCK_M, BLOCK_N, warps, stages) the autotuner may pick for one launch."""
    specs = CONFIG_TABLE[kind][(arch, head_dim_class(block_d))]
    if kind == "bwd_rows":  # the table holds BLOCK_M * G_PAD
        specs = [(max(1, r // g_pad), bn, w, st) for r, bn, w, st in specs]
    return specs


def _configs(kind: str):
    if INTERPRETED:
        b = _INTERPRET_BLOCK
        return _cfgs((b, b, 1, 1))
    return _cfgs(*CANDIDATES[kind])


def _prune(kind: str):
    """Keep the table's configs for this GPU's arch family and the launch's head dim."""

    def prune(configs, named_args, **kwargs):
        if INTERPRETED:
            return configs
        import torch

        arch = arch_family(torch.cuda.get_device_capability())
        allowed = set(table_specs(kind, arch, kwargs["BLOCK_D"], kwargs.get("G_PAD", 1)))
        keep = [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed
        ]
        return keep

    return prune


_KEY = ["BLOCK_D", "L", "G"]


def _autotune(kind: str):
    return triton.autotune(
        configs=_configs(kind), key=_KEY, prune_configs_by={"early_config_prune": _prune(kind)}
    )


# The kernels keep their argument lists compact: one argument per line would hide the maths.
# fmt: off
# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ptrs(base, rows, cols, stride_r, stride_c):
    """Pointers of the (len(rows), len(cols)) tile at ``base``."""
    return base + rows[:, None] * stride_r + cols[None, :] * stride_c


@triton.jit
def _text_tile_mask(offs_m, offs_n, L, Keep, keep_base, stride_keep_l, WINDOW,
                    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: which text keys of this tile the query rows may see."""
    ok = offs_n[None, :] < L
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_WINDOW:
        ok = ok & (offs_m[:, None] - offs_n[None, :] < WINDOW)
    if HAS_KEEP:
        kp = tl.load(Keep + keep_base + offs_n * stride_keep_l, mask=offs_n < L, other=0)
        ok = ok & (kp[None, :] != 0)
    return ok


@triton.jit
def _fwd_text_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                    offs_m, offs_d, lo, hi, L, D, qk_scale, Keep, keep_base, stride_keep_l, WINDOW,
                    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the text key tiles [lo, hi). Invariant after each tile: m_i is the row
    max of the (base-2) scores seen, l_i = sum exp2(s - m_i), acc = sum exp2(s - m_i) v."""
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kT = tl.load(_ptrs(K + k_base, offs_d, offs_n, stride_kd, stride_kl),
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        ok = _text_tile_mask(offs_m, offs_n, L, Keep, keep_base, stride_keep_l, WINDOW,
                             CAUSAL, HAS_KEEP, HAS_WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_ptrs(V + v_base, offs_n, offs_d, stride_vl, stride_vd),
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@_autotune("fwd")
@triton.jit
def thought_attention_fwd_kernel(
    Q, K, V, Out, Lse, Keep,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_keep_b, stride_keep_l,
    Hq, L, D, DEPTH, G, WINDOW, qk_scale,
    HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, query head).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D

    # Load the Q tile.  (BLOCK_M, BLOCK_D)
    q_ptrs = _ptrs(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = b * stride_kb + hk * stride_kh
    v_base = b * stride_vb + hk * stride_vh
    keep_base = b * stride_keep_b

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Text block, tiles wholly below the diagonal (no causal test), then the diagonal tiles.
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    mid = tl.maximum(start_m // BLOCK_N * BLOCK_N, lo)
    hi = tl.minimum(start_m + BLOCK_M, L)
    acc, m_i, l_i = _fwd_text_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kl, stride_kd,
                                    stride_vl, stride_vd, offs_m, offs_d, lo, mid, L, D, qk_scale,
                                    Keep, keep_base, stride_keep_l, WINDOW,
                                    False, HAS_KEEP, HAS_WINDOW, BLOCK_N, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_text_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kl, stride_kd,
                                    stride_vl, stride_vd, offs_m, offs_d, mid, hi, L, D, qk_scale,
                                    Keep, keep_base, stride_keep_l, WINDOW,
                                    True, HAS_KEEP, HAS_WINDOW, BLOCK_N, UPCAST, PRECISION)

    # Diagonal keys: row i reads key i of every thought block, iff token i is real.
    diag_ok = m_ok
    if HAS_KEEP:
        row_keep = tl.load(Keep + keep_base + offs_m * stride_keep_l, mask=m_ok, other=0)
        diag_ok = diag_ok & (row_keep != 0)
    for step in range(0, DEPTH):
        rows = (step + 1) * L + offs_m
        kd = tl.load(_ptrs(K + k_base, rows, offs_d, stride_kl, stride_kd),
                     mask=diag_ok[:, None] & d_ok[None, :], other=0.0)
        sd = tl.sum(q.to(tl.float32) * kd.to(tl.float32), 1) * qk_scale
        sd = tl.where(diag_ok, sd, float("-inf"))
        m_new = tl.maximum(m_i, sd)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(sd - m_ref)
        l_i = l_i * alpha + p
        vd = tl.load(_ptrs(V + v_base, rows, offs_d, stride_vl, stride_vd),
                     mask=diag_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * vd
        m_i = m_new

    # Write O = acc / l and the natural-log LSE; rows that saw nothing get 0 and -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = _ptrs(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ol, stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh * L + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------
# Backward. With P = softmax(S) over a row's allowed keys, dO the output gradient and g the lse
# gradient, dS = P * (dP - delta) where dP = dO V^T and delta = rowsum(dO * O) - g. Each part of
# the row (text tiles, diagonal keys) uses the final lse and delta, so the split is exact.
# ----------------------------------------------------------------------------------------------


@_autotune("bwd_rows")
@triton.jit
def thought_attention_bwd_rows_kernel(
    Q, K, V, Out, dOut, dLse, Lse, Delta, Lse2, dQ, dK, dV, Keep,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_keep_b, stride_keep_l,
    Hq, Hkv, L, D, DEPTH, G, qk_scale, sm_scale,
    HAS_DLSE: tl.constexpr, HAS_KEEP: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Everything per row, for the G query heads of one kv head at once (tiles (G, rows, D)):
    delta = rowsum(dO * O) - dlse; the lse in base 2, with -inf rows set to 0 (their scores are
    all -inf, so exp2(s - 0) = 0 keeps them out of every gradient); and the whole diagonal part:
    key i of a thought block is read only by row i of these G heads, so this program owns its
    dK, dV outright, and it writes the diagonal part of dQ (fp32; the text-tile kernel adds its
    part). Each thought key and value is read once."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)  # batch offsets can pass 2**31 elements
    hk = pid_bh % Hkv
    offs_g = tl.arange(0, G_PAD)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    m_ok = offs_m < L
    d_ok = offs_d < D
    heads = hk * G + offs_g  # (G,) query heads of this kv head
    rows2 = g_ok[:, None] & m_ok[None, :]  # (G, BLOCK_M)
    mask3 = rows2[:, :, None] & d_ok[None, None, :]  # (G, BLOCK_M, BLOCK_D)
    row_idx = (b * Hq + heads)[:, None] * L + offs_m[None, :]  # into (B, Hq, L) row vectors

    o = tl.load(Out + b * stride_ob + heads[:, None, None] * stride_oh + offs_m[None, :, None] * stride_ol
                + offs_d[None, None, :] * stride_od, mask=mask3, other=0.0).to(tl.float32)
    do = tl.load(dOut + b * stride_gb + heads[:, None, None] * stride_gh + offs_m[None, :, None] * stride_gl
                 + offs_d[None, None, :] * stride_gd, mask=mask3, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 2)  # (G, BLOCK_M)
    if HAS_DLSE:
        delta = delta - tl.load(dLse + row_idx, mask=rows2, other=0.0)
    lse = tl.load(Lse + row_idx, mask=rows2, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    tl.store(Delta + row_idx, delta, mask=rows2)
    tl.store(Lse2 + row_idx, lse2, mask=rows2)

    q = tl.load(Q + b * stride_qb + heads[:, None, None] * stride_qh + offs_m[None, :, None] * stride_ql
                + offs_d[None, None, :] * stride_qd, mask=mask3, other=0.0).to(tl.float32)
    diag_ok = m_ok
    if HAS_KEEP:
        row_keep = tl.load(Keep + b * stride_keep_b + offs_m * stride_keep_l, mask=m_ok, other=0)
        diag_ok = diag_ok & (row_keep != 0)
    live = g_ok[:, None] & diag_ok[None, :]  # (G, BLOCK_M)
    kv_mask = diag_ok[:, None] & d_ok[None, :]
    out_mask = m_ok[:, None] & d_ok[None, :]
    dq = tl.zeros([G_PAD, BLOCK_M, BLOCK_D], tl.float32)
    for step in range(0, DEPTH):
        # dS_s = P_s (dO . v_s - delta): dQ += dS_s k_s; dK_s = sum_g dS_s q; dV_s = sum_g P_s dO.
        rows = (step + 1) * L + offs_m
        kd = tl.load(_ptrs(K + b * stride_kb + hk * stride_kh, rows, offs_d, stride_kl, stride_kd),
                     mask=kv_mask, other=0.0).to(tl.float32)
        vd = tl.load(_ptrs(V + b * stride_vb + hk * stride_vh, rows, offs_d, stride_vl, stride_vd),
                     mask=kv_mask, other=0.0).to(tl.float32)
        pd = tl.where(live, tl.exp2(tl.sum(q * kd[None, :, :], 2) * qk_scale - lse2), 0.0)
        dsd = pd * (tl.sum(do * vd[None, :, :], 2) - delta)
        dq += dsd[:, :, None] * kd[None, :, :]
        dk = tl.sum(dsd[:, :, None] * q, 0) * sm_scale
        dv = tl.sum(pd[:, :, None] * do, 0)
        dkv_ptrs = _ptrs(b * stride_dkb + hk * stride_dkh, rows, offs_d, stride_dkl, stride_dkd)
        tl.store(dK + dkv_ptrs, dk.to(dK.dtype.element_ty), mask=out_mask)
        tl.store(dV + dkv_ptrs, dv.to(dV.dtype.element_ty), mask=out_mask)
    tl.store(dQ + b * stride_dqb + heads[:, None, None] * stride_dqh + offs_m[None, :, None] * stride_dql
             + offs_d[None, None, :] * stride_dqd, dq * sm_scale, mask=mask3)


@_autotune("bwd_dkdv")
@triton.jit
def thought_attention_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse2, Delta, dK, dV, Keep,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_keep_b, stride_keep_l,
    Hq, Hkv, L, D, G, WINDOW, qk_scale, sm_scale,
    HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of the text block: one program owns BLOCK_N text keys of one kv head and loops over
    the G query heads that read it (no atomics), and over the query tiles at or after its keys."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)  # batch offsets can pass 2**31 elements
    hk = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(_ptrs(K + b * stride_kb + hk * stride_kh, offs_n, offs_d, stride_kl, stride_kd),
                mask=kv_mask, other=0.0)
    v = tl.load(_ptrs(V + b * stride_vb + hk * stride_vh, offs_n, offs_d, stride_vl, stride_vd),
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    keep_base = b * stride_keep_b
    n_allowed = n_ok
    if HAS_KEEP:
        kp = tl.load(Keep + keep_base + offs_n * stride_keep_l, mask=n_ok, other=0)
        n_allowed = n_allowed & (kp != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = start_n // BLOCK_M * BLOCK_M
    hi = L
    if HAS_WINDOW:
        hi = tl.minimum(start_n + BLOCK_N + WINDOW - 1, L)
    for g in range(0, G):
        h = hk * G + g
        row_base = (b * Hq + h) * L
        q_base = b * stride_qb + h * stride_qh
        g_base = b * stride_gb + h * stride_gh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < L
            qo_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(_ptrs(Q + q_base, offs_m, offs_d, stride_ql, stride_qd),
                        mask=qo_mask, other=0.0)
            do = tl.load(_ptrs(dOut + g_base, offs_m, offs_d, stride_gl, stride_gd),
                         mask=qo_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2 = tl.load(Lse2 + row_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
            # Transposed scores: keys along rows.  (BLOCK_N, BLOCK_M)
            sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            ok = n_allowed[:, None] & m_ok[None, :] & (offs_n[:, None] <= offs_m[None, :])
            if HAS_WINDOW:
                ok = ok & (offs_m[None, :] - offs_n[:, None] < WINDOW)
            pT = tl.where(ok, tl.exp2(sT - lse2[None, :]), 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    dk_ptrs = _ptrs(dK + b * stride_dkb + hk * stride_dkh, offs_n, offs_d, stride_dkl, stride_dkd)
    dv_ptrs = _ptrs(dV + b * stride_dkb + hk * stride_dkh, offs_n, offs_d, stride_dkl, stride_dkd)
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_text_tiles(dq, q, do, lse2, delta, Kh, Vh, stride_kl, stride_kd, stride_vl, stride_vd,
                       offs_m, offs_d, lo, hi, L, D, qk_scale, Keep, keep_base, stride_keep_l, WINDOW,
                       CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS K over the text key tiles [lo, hi), with P recomputed from the final lse."""
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < L)[:, None] & d_ok[None, :]
        k = tl.load(_ptrs(Kh, offs_n, offs_d, stride_kl, stride_kd), mask=kv_mask, other=0.0)
        v = tl.load(_ptrs(Vh, offs_n, offs_d, stride_vl, stride_vd), mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _text_tile_mask(offs_m, offs_n, L, Keep, keep_base, stride_keep_l, WINDOW,
                             CAUSAL, HAS_KEEP, HAS_WINDOW)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@_autotune("bwd_dq")
@triton.jit
def thought_attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse2, Delta, dQ, Keep,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_keep_b, stride_keep_l,
    Hq, L, D, G, WINDOW, qk_scale, sm_scale,
    HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M rows of one (batch, query head) from the text tiles, added to the diagonal
    part that the row kernel wrote into the fp32 dQ."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    qo_mask = m_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(_ptrs(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, stride_qd),
                mask=qo_mask, other=0.0)
    do = tl.load(_ptrs(dOut + b * stride_gb + h * stride_gh, offs_m, offs_d, stride_gl, stride_gd),
                 mask=qo_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse2 + pid_bh * L + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + pid_bh * L + offs_m, mask=m_ok, other=0.0)
    k_base = b * stride_kb + hk * stride_kh
    v_base = b * stride_vb + hk * stride_vh
    keep_base = b * stride_keep_b

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    mid = tl.maximum(start_m // BLOCK_N * BLOCK_N, lo)
    hi = tl.minimum(start_m + BLOCK_M, L)
    dq = _bwd_dq_text_tiles(dq, q, do, lse2, delta, K + k_base, V + v_base, stride_kl, stride_kd,
                            stride_vl, stride_vd, offs_m, offs_d, lo, mid, L, D, qk_scale,
                            Keep, keep_base, stride_keep_l, WINDOW,
                            False, HAS_KEEP, HAS_WINDOW, BLOCK_N, UPCAST, PRECISION)
    dq = _bwd_dq_text_tiles(dq, q, do, lse2, delta, K + k_base, V + v_base, stride_kl, stride_kd,
                            stride_vl, stride_vd, offs_m, offs_d, mid, hi, L, D, qk_scale,
                            Keep, keep_base, stride_keep_l, WINDOW,
                            True, HAS_KEEP, HAS_WINDOW, BLOCK_N, UPCAST, PRECISION)
    dq_ptrs = _ptrs(dQ + b * stride_dqb + h * stride_dqh, offs_m, offs_d, stride_dql, stride_dqd)
    dq = dq * sm_scale + tl.load(dq_ptrs, mask=qo_mask, other=0.0)
    tl.store(dq_ptrs, dq, mask=qo_mask)


# fmt: on
