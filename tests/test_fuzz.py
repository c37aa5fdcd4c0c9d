"""Hypothesis-driven shape fuzzing of the fast backends against the reference (float64)."""

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


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_fuzz_against_reference(backend, cfg):
    assert backend in qstar_kernels.available_backends("cpu")
    B, Hkv, G, L, depth, D, window, keep, scale, seed = cfg
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    q = torch.randn(B, Hq, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, (depth + 1) * L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, (depth + 1) * L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(key_padding_mask=keep, sliding_window=window, scale=scale, return_lse=True)
    out, lse = thought_attention(q, k, v, backend=backend, **kw)
    out64, lse64 = reference64(q, k, v, **kw)
    assert_close_to_reference("out", out, out64, dtype=torch.float64)
    assert_close_to_reference("lse", lse, lse64, dtype=torch.float64)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    grads64 = torch.autograd.grad((out64 * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, grads64):
        assert_close_to_reference("d" + name, a, b, dtype=torch.float64)
