"""Shared test helpers: random inputs, padding patterns and the per-dtype error criterion."""

from __future__ import annotations

import math

import torch

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


# Tolerances per dtype when the reference runs in float64 (kernels.md section 5).
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
