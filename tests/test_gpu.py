"""The GPU side of the same contract: the compiled Triton kernels, the structured ``torch`` backend
and the automatic choice on a CUDA device, against the reference. Skipped, with the reason, where
there is no GPU; ``make test-gpu`` (``pytest -m gpu``) runs these on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    LOWP,
    assert_close_to_reference,
    make_padding,
    make_qkv,
    plain_lowp_attention,
    reference64,
    run_backend_case,
)

from qstar_kernels import attention as attention_mod
from qstar_kernels import thought_attention
from qstar_kernels.backends import triton_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "L,depth,G,D,pad,window", [(37, 3, 4, 64, "both", None), (256, 8, 4, 128, "start", 64)]
)
def test_torch_backend_on_cuda_matches_reference(dtype, L, depth, G, D, pad, window, seed):
    q, k, v = make_qkv(2, 2 * G, 2, L, depth, D, dtype=dtype, device="cuda", requires_grad=True)
    keep = make_padding(2, L, pad, device="cuda")
    kw = dict(key_padding_mask=keep, sliding_window=window)
    out = thought_attention(q, k, v, backend="torch", **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = reference64(q64, k64, v64, **kw)
    yard = plain_lowp_attention(q.detach(), k.detach(), v.detach(), keep, window) if dtype in LOWP else None
    # GPU matmuls may use TF32 for float32: allow the low-precision criterion against fp32 TF32.
    tol_dtype = torch.float16 if dtype == torch.float32 else dtype
    assert_close_to_reference("out", out, out64, yard, tol_dtype)
    g = torch.randn_like(out64)
    grads = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    grads64 = torch.autograd.grad((out64 * g).sum(), (q64, k64, v64))
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_to_reference(name, a, b, None, tol_dtype if dtype not in LOWP else torch.bfloat16)


# The compiled Triton kernels: fp32 (exact fp32 dot products unless TF32 is enabled), fp16, bf16;
# head dims 64 and 128 (and 16, 32, an odd one); any L; depth up to 33.
TRITON_CASES = [
    dict(L=256, depth=14, G=4, D=128, pad="both", window=None, layout="contig"),
    dict(L=1000, depth=8, G=4, D=128, pad="start", window=4096, layout="strided"),
    dict(L=37, depth=33, G=2, D=64, pad="end", window=None, layout="contig"),
    dict(L=129, depth=3, G=1, D=64, pad="random", window=50, layout="strided"),
    dict(L=64, depth=0, G=4, D=32, pad="none", window=None, layout="contig"),
    dict(L=17, depth=2, G=2, D=16, pad="start", window=None, layout="contig"),
    dict(L=100, depth=5, G=2, D=80, pad="both", window=None, layout="contig"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case", TRITON_CASES, ids=lambda c: f"L{c['L']}-a{c['depth']}-g{c['G']}-D{c['D']}-{c['pad']}"
)
def test_triton_on_cuda_matches_reference(dtype, case, seed):
    run_backend_case("triton", case, dtype, B=2, Hkv=2, device="cuda")


def test_triton_writes_every_output_element(monkeypatch, seed):
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)
    q, k, v = make_qkv(2, 8, 2, 300, 6, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    keep = make_padding(2, 300, "both", device="cuda")
    out, lse = thought_attention(q, k, v, key_padding_mask=keep, return_lse=True, backend="triton")
    assert not out.isnan().any() and not lse.isnan().any()
    loss = out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    for g in torch.autograd.grad(loss, (q, k, v)):
        assert not g.isnan().any()


def test_triton_under_torch_compile_fullgraph(seed):
    q, k, v = make_qkv(2, 8, 2, 64, 3, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)

    def f(q, k, v):
        return thought_attention(q * 2, k, v, sliding_window=16, backend="triton").float().square().sum()

    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_automatic_choice_on_cuda_is_the_triton_kernel(seed, monkeypatch):
    calls = []
    real = triton_backend.thought_attention_triton
    monkeypatch.setattr(
        triton_backend, "thought_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    q, k, v = make_qkv(1, 4, 2, 16, 2, 32, device="cuda")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = thought_attention(q, k, v)
    assert out.is_cuda and calls == [1]


def test_automatic_fallback_on_cuda_says_so(seed, monkeypatch):
    monkeypatch.setattr(attention_mod, "_warned", set())  # the warning is once per process
    q, k, v = make_qkv(1, 4, 2, 16, 2, 32, dtype=torch.float64, device="cuda")  # no Triton float64
    with pytest.warns(RuntimeWarning, match="using the slower structured 'torch' backend"):
        out = thought_attention(q, k, v)
    assert out.is_cuda
