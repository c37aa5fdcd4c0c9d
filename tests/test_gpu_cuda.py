"""The ``"cuda"`` backend (csrc/cuda) on a GPU: the same equivalence cases as every backend, against
the float64 reference, forward and backward (the lse gradient included), for float32, float16 and
bfloat16, head dims 64 and 128, GQA, padding at either end (with rows that see nothing), the
sliding window, one-token texts and depth 0. Skipped, with the reason, where there is no GPU;
``make gpu-check`` runs these with the other GPU tests and the benchmarks.

(The mixing op's CUDA backend is in tests/test_mixing.py::test_on_cuda_matches_reference.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_padding, make_qkv, run_backend_case

from qstar_kernels import BackendUnavailableError, _ext, thought_attention
from qstar_kernels import attention as attention_mod

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]

CUDA_CASES = [
    dict(L=256, depth=14, G=4, D=128, pad="both", window=None, layout="contig"),
    dict(L=1000, depth=8, G=4, D=128, pad="start", window=300, layout="strided"),
    dict(L=37, depth=33, G=2, D=64, pad="end", window=None, layout="contig"),
    dict(L=129, depth=3, G=1, D=64, pad="random", window=50, layout="strided"),
    dict(L=64, depth=0, G=4, D=64, pad="none", window=None, layout="contig"),
    dict(L=1, depth=7, G=1, D=128, pad="none", window=None, layout="contig"),
    dict(L=100, depth=5, G=2, D=128, pad="start", window=7, layout="contig"),
    dict(L=65, depth=1, G=8, D=64, pad="both", window=1, layout="contig"),
]


def _case_id(c):
    return f"L{c['L']}-a{c['depth']}-g{c['G']}-D{c['D']}-{c['pad']}-w{c['window']}-{c['layout']}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=_case_id)
def test_cuda_matches_reference(dtype, case, seed):
    run_backend_case("cuda", case, dtype, B=2, Hkv=2, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_writes_every_output_element(dtype, D, seed):
    ext = _ext.cuda_extension()
    old = ext._set_poison_outputs(True)
    try:
        q, k, v = make_qkv(2, 8, 2, 300, 6, D, dtype=dtype, device="cuda", requires_grad=True)
        keep = make_padding(2, 300, "both", device="cuda")
        out, lse = thought_attention(q, k, v, key_padding_mask=keep, return_lse=True, backend="cuda")
        assert not out.isnan().any() and not lse.isnan().any()
        loss = out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
        for g in torch.autograd.grad(loss, (q, k, v)):
            assert not g.isnan().any()
    finally:
        ext._set_poison_outputs(old)


def test_cuda_under_torch_compile_fullgraph(seed):
    q, k, v = make_qkv(2, 8, 2, 64, 3, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)

    def f(q, k, v):
        return thought_attention(q * 2, k, v, sliding_window=16, backend="cuda").float().square().sum()

    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_cuda_agrees_with_triton(seed):
    """The two GPU backends on one Mistral-like shape (bf16, D=128, GQA 4, depth 14)."""
    q, k, v = make_qkv(2, 8, 2, 256, 14, 128, dtype=torch.bfloat16, device="cuda")
    a = thought_attention(q, k, v, backend="cuda").float()
    b = thought_attention(q, k, v, backend="triton").float()
    assert (a - b).abs().max().item() < 2e-2


def test_cuda_refuses_unsupported_head_dims_and_float64():
    q, k, v = make_qkv(1, 2, 1, 8, 1, 80, device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"head dims \(64, 128\), got D=80"):
        thought_attention(q, k, v, backend="cuda")
    q, k, v = make_qkv(1, 2, 1, 8, 1, 64, dtype=torch.float64, device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"float16, bfloat16 and float32, got torch.float64"):
        thought_attention(q, k, v, backend="cuda")


def test_automatic_choice_on_cuda_stays_triton(monkeypatch):
    """The CUDA backend is selectable (argument, QSTAR_BACKEND) but not the automatic choice."""
    q, k, v = make_qkv(1, 4, 2, 16, 2, 64, device="cuda")
    assert attention_mod._select_backend(None, q) == "triton"
    monkeypatch.setenv("QSTAR_BACKEND", "cuda")
    assert attention_mod._select_backend(None, q) == "cuda"
