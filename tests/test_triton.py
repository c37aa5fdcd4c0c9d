"""The ``"triton"`` backend against the float64 reference, run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``, set in conftest.py). The interpreter runs the same kernels with 16x16
tiles, so these small shapes cross many tile boundaries. It is slow: shapes stay small
(L <= 64, batch x heads <= 4)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import assert_close_to_reference, make_padding, make_qkv, reference64, run_backend_case

import qstar_kernels
from qstar_kernels import BackendUnavailableError, thought_attention
from qstar_kernels.backends import triton_backend

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="interpreter tests; on a GPU tests/test_gpu.py runs the compiled kernels",
)


def _random_case(seed: int) -> tuple[dict, int, int]:
    """A random small configuration: (case, B, Hkv) with B * Hq <= 4."""
    rng = random.Random(seed)
    G = rng.choice([1, 2, 4])
    Hkv = rng.choice([1, 2]) if G <= 2 else 1
    B = max(1, 4 // (G * Hkv)) if rng.random() < 0.5 else 1
    case = dict(
        L=rng.choice([1, 5, 16, 17, 33, 48, 64]),
        depth=rng.choice([0, 1, 2, 3, 5]),
        G=G,
        D=rng.choice([16, 32, 24, 64]),
        pad=rng.choice(["none", "end", "start", "both", "random"]),
        window=rng.choice([None, None, 3, 20]),
        layout="contig",
    )
    if Hkv > 1 and case["L"] > 1 and rng.random() < 0.5:
        case["layout"] = "strided"  # read in place through the strides of a (B, L, H, D) projection
    return case, B, Hkv


@pytest.mark.parametrize("seed_", range(10))
def test_random_configurations_fp32(seed_, seed):
    case, B, Hkv = _random_case(1000 + seed_)
    torch.manual_seed(seed + seed_)
    run_backend_case("triton", case, torch.float32, B=B, Hkv=Hkv)


@pytest.mark.parametrize("seed_", range(6))
def test_random_configurations_fp16(seed_, seed):
    case, B, Hkv = _random_case(2000 + seed_)
    torch.manual_seed(seed + seed_)
    run_backend_case("triton", case, torch.float16, B=B, Hkv=Hkv)


def test_bf16(seed):
    """bf16 loads are widened to fp32 under the interpreter (its bf16 arithmetic is wrong); the
    rounding on store is still bf16's."""
    case = dict(L=40, depth=3, G=2, D=32, pad="both", window=None, layout="contig")
    run_backend_case("triton", case, torch.bfloat16, B=1, Hkv=2)


@pytest.mark.parametrize(
    "case",
    [
        # padding at both ends, GQA 4 and a window, across tile boundaries
        dict(L=64, depth=2, G=4, D=16, pad="both", window=7, layout="contig"),
        # left padding with a fully padded row: zeros, lse = -inf, zero gradients
        dict(L=33, depth=3, G=2, D=32, pad="start", window=None, layout="strided"),
        # head dim 128 and an odd head dim (masked lanes)
        dict(L=20, depth=1, G=1, D=128, pad="end", window=None, layout="contig"),
        dict(L=19, depth=2, G=2, D=40, pad="random", window=None, layout="contig"),
        # a window wider than the text, and one of a single key
        dict(L=24, depth=2, G=1, D=16, pad="none", window=100, layout="contig"),
        dict(L=24, depth=1, G=2, D=16, pad="end", window=1, layout="contig"),
    ],
    ids=["both-gqa4-win", "start-empty-rows", "D128", "D40-random", "wide-window", "window1"],
)
def test_edge_cases(case, seed):
    B, Hkv = (1, 1) if case["G"] == 4 else (1, 2) if case["G"] == 2 else (2, 2)
    run_backend_case("triton", case, torch.float32, B=B, Hkv=Hkv)


def test_deep_thoughts(seed):
    """depth 33 (more than 32 thought steps): the diagonal loop is not capped."""
    case = dict(L=8, depth=33, G=2, D=16, pad="end", window=None, layout="contig")
    run_backend_case("triton", case, torch.float32, B=1, Hkv=2)


def test_every_output_element_is_written(monkeypatch, seed):
    """Every buffer the kernels write starts as NaN; nothing NaN may be left in the results."""
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)
    q, k, v = make_qkv(2, 2, 1, 37, 3, 24, requires_grad=True)
    keep = make_padding(2, 37, "both")
    out, lse = thought_attention(q, k, v, key_padding_mask=keep, return_lse=True, backend="triton")
    assert not out.isnan().any() and not lse.isnan().any()
    finite = torch.isfinite(lse)
    loss = (out * torch.randn_like(out)).sum() + torch.where(finite, lse, 0.0).sum()
    for g in torch.autograd.grad(loss, (q, k, v)):
        assert not g.isnan().any()


def test_lse_only_gradient_and_unused_output(seed):
    q, k, v = make_qkv(1, 2, 1, 21, 2, 16, requires_grad=True)
    _, lse = thought_attention(q, k, v, return_lse=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(lse.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, lse64 = reference64(q64, k64, v64, return_lse=True)
    dq64, dk64 = torch.autograd.grad(lse64.sum(), (q64, k64))
    assert_close_to_reference("dq", dq, dq64)
    assert_close_to_reference("dk", dk, dk64)
    assert torch.all(dv == 0), "the lse does not depend on v"


def test_nonfinite_inputs_are_not_hidden(seed):
    q, k, v = make_qkv(1, 2, 1, 16, 2, 16)
    k[0, 0, 3, 0] = float("nan")  # a text key every row from 3 on reads
    out = thought_attention(q, k, v, backend="triton")
    assert out[0, :, 3:].isnan().all(dim=-1).all()


def test_double_backward_is_refused(seed):
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16, requires_grad=True)
    out = thought_attention(q, k, v, backend="triton")
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=False)  # plain backward works
    assert g.shape == q.shape
    out = thought_attention(q, k, v, backend="triton")
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_unavailable_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16)
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run: .*TRITON_INTERPRET=1"):
        thought_attention(q, k, v, backend="triton")
    assert "triton" not in qstar_kernels.available_backends("cpu")


def test_float64_and_huge_head_dims_are_refused_clearly():
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float16, bfloat16 and float32, got torch.float64"):
        thought_attention(q, k, v, backend="triton")
    q, k, v = make_qkv(1, 1, 1, 2, 0, 512)
    with pytest.raises(BackendUnavailableError, match="head dims up to 256, got D=512"):
        thought_attention(q, k, v, backend="triton")


def test_automatic_choice_on_cpu_stays_the_cpu_kernel(monkeypatch):
    """The interpreter is for tests: CPU tensors still go to the C++ kernel by default."""
    calls = []
    real = triton_backend.thought_attention_triton
    monkeypatch.setattr(
        triton_backend, "thought_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16)
    thought_attention(q, k, v)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# torch.compile: the compiled backends are custom ops with fake implementations, so a model that
# calls thought_attention traces with fullgraph=True (no graph break) and gives the eager result.
# ---------------------------------------------------------------------------------------------


class _TinyThoughtLayer(torch.nn.Module):
    """Projections around thought_attention, as a model layer would call it."""

    def __init__(self, backend: str, Hq=4, Hkv=2, D=16):
        super().__init__()
        self.backend, self.Hq, self.Hkv, self.D = backend, Hq, Hkv, D
        hidden = Hq * D
        self.q = torch.nn.Linear(hidden, Hq * D, bias=False)
        self.kv = torch.nn.Linear(hidden, 2 * Hkv * D, bias=False)
        self.o = torch.nn.Linear(Hq * D, hidden, bias=False)

    def forward(self, x_step, kv_cache_in, keep):
        B, L, _ = x_step.shape
        q = self.q(x_step).view(B, L, self.Hq, self.D).transpose(1, 2)
        kv_new = self.kv(x_step).view(B, L, 2, self.Hkv, self.D)
        k_new, v_new = kv_new[:, :, 0].transpose(1, 2), kv_new[:, :, 1].transpose(1, 2)
        k = torch.cat([kv_cache_in[0], k_new], dim=2)
        v = torch.cat([kv_cache_in[1], v_new], dim=2)
        out, lse = thought_attention(
            q, k, v, key_padding_mask=keep, sliding_window=9, return_lse=True, backend=self.backend
        )
        y = self.o(out.transpose(1, 2).reshape(B, L, -1))
        return y, lse


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend, seed):
    torch._dynamo.reset()
    layer = _TinyThoughtLayer(backend)
    B, L, depth = 2, 12, 2
    x = torch.randn(B, L, layer.Hq * layer.D)
    cache = torch.randn(2, B, layer.Hkv, depth * L, layer.D)
    keep = make_padding(B, L, "both")

    def loss_and_grads(fn):
        layer.zero_grad()
        y, lse = fn(x, cache, keep)
        (y.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
        return y.detach(), lse.detach(), [p.grad.clone() for p in layer.parameters()]

    want = loss_and_grads(layer)
    compiled = torch.compile(layer, fullgraph=True)  # inductor, the default
    got = loss_and_grads(compiled)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w)


def test_custom_ops_pass_opcheck(seed):
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16, requires_grad=True)
    keep = make_padding(1, 8, "end")
    for backend in ("cpu", "triton"):
        torch.library.opcheck(
            torch.ops.qstar.thought_attention_fwd.default, (q, k, v, keep, 0.25, -1, backend)
        )
