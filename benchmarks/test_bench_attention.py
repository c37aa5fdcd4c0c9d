"""pytest-benchmark cases for thought attention: small shapes, one case per provider and mode.

    pytest benchmarks --benchmark-only                      # all providers, fwd and fwd+bwd
    pytest benchmarks --benchmark-only -k "cpu or causal"   # a subset
    QSTAR_BENCH_DEVICE=cuda pytest benchmarks --benchmark-only

The providers are those of ``mask_attention.py`` (see its docstring). A provider that cannot run
here (the C++ "cpu" backend not built, flash-attn missing, Flex backward on the CPU) is skipped with
the reason. Every case first checks its forward output against the float64 reference.
"""

from __future__ import annotations

import os

import mask_attention as ma
import pytest
import torch
from _common import synchronize

from qstar_kernels.reference import thought_attention_reference

DEVICE = torch.device(os.environ.get("QSTAR_BENCH_DEVICE", "cpu"))
CFG = {"B": 1, "Hq": 8, "Hkv": 2, "D": 64, "dtype": "float32", "L": 256, "depth": 4}
PROVIDERS = ma.DEFAULT_PROVIDERS + (
    [b for b in ("triton", "cuda") if b not in ma.DEFAULT_PROVIDERS] + ["flash_attn"]
    if DEVICE.type == "cuda"
    else []
)
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("QSTAR_BENCH_DEVICE=cuda but no GPU is available", allow_module_level=True)


@pytest.fixture(scope="module")
def inputs():
    return ma.make_inputs(CFG, DEVICE, seed=0)


@pytest.fixture(scope="module")
def reference_out(inputs):
    q, k, v, _ = inputs
    return thought_attention_reference(q.double(), k.double(), v.double()).float()


def _provider(name, inputs):
    p = ma.make_provider(name, CFG, DEVICE)
    try:
        p.check()
    except ma.Unavailable as exc:
        pytest.skip(f"{name}: {exc}")
    q, k, v, _ = inputs
    p.prepare(q, k, v)  # compile / block mask, outside the measurement
    return p


@pytest.mark.parametrize("provider", PROVIDERS)
def test_fwd(benchmark, provider, inputs, reference_out):
    p = _provider(provider, inputs)
    q, k, v, g = p.adapt(*inputs)
    with torch.no_grad():
        out = p.output_bhld(p.forward(q, k, v)).float()
    if p.compares:
        torch.testing.assert_close(out, reference_out, atol=1e-4, rtol=1e-4)

    def run():
        with torch.no_grad():
            p.forward(q, k, v)
        synchronize(DEVICE)

    benchmark.group = f"thought_attention fwd L={CFG['L']} a={CFG['depth']}"
    benchmark.extra_info.update(CFG, provider=provider, device=str(DEVICE))
    benchmark(run)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_fwd_bwd(benchmark, provider, inputs):
    p = _provider(provider, inputs)
    if p.bwd_unavailable:
        pytest.skip(f"{provider}: {p.bwd_unavailable}")
    q0, k0, v0, g0 = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (q0, k0, v0)]
    q, k, v, g = p.adapt(*leaves, g0)

    def run():
        out = p.forward(q, k, v)
        out.backward(g)
        for t in (q, k, v):
            t.grad = None
        synchronize(DEVICE)

    benchmark.group = f"thought_attention fwd+bwd L={CFG['L']} a={CFG['depth']}"
    benchmark.extra_info.update(CFG, provider=provider, device=str(DEVICE))
    benchmark(run)
