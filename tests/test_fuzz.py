"""Hypothesis-driven shape fuzzing of the fast backends against the float64 reference, in float64
(exact maths) and float32 (the production path: sgemm, the vectorised exp), through out and lse."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_reference, reference64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qstar_kernels
from qstar_kernels import thought_attention


@st.composite
def configs(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 4]))
    L = draw(st.integers(1, 70))
    depth = draw(st.integers(0, 9))
    D = draw(st.integers(1, 72))
    window = draw(st.one_of(st.none(), st.integers(1, L + 2)))
    keep = None
    if draw(st.booleans()):
        bits = draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))
        keep = torch.tensor(bits, dtype=torch.bool).reshape(B, L)
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hkv, G, L, depth, D, window, keep, scale, seed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_fuzz_against_reference(backend, dtype, cfg):
    assert backend in qstar_kernels.available_backends("cpu")
    B, Hkv, G, L, depth, D, window, keep, scale, seed = cfg
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    shapes = [(B, Hq, L, D), (B, Hkv, (depth + 1) * L, D), (B, Hkv, (depth + 1) * L, D)]
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw = dict(key_padding_mask=keep, sliding_window=window, scale=scale, return_lse=True)
    out, lse = thought_attention(q, k, v, backend=backend, **kw)
    out64, lse64 = reference64(q64, k64, v64, **kw)
    assert_close_to_reference("out", out, out64, dtype=dtype)
    assert_close_to_reference("lse", lse, lse64, dtype=dtype)
    # Gradients through out and through the lse (masked where a row sees nothing).
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=gen, dtype=torch.float64).masked_fill(torch.isneginf(lse64), 0.0)

    def loss(o, l):
        return (o.double() * g).sum() + (torch.where(torch.isfinite(l), l.double(), 0.0) * gl).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    grads64 = torch.autograd.grad(loss(out64, lse64), (q64, k64, v64))
    for name, a, b in zip("qkv", grads, grads64):
        assert_close_to_reference("d" + name, a, b, dtype=dtype)
