"""``thought_attention`` on every backend against the float64 reference, forward and backward (the
lse gradient included); the backend is a parameter.

* CPU backends (``torch``, ``cpu``): the full case grid, in every dtype.
* ``triton`` through Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py): the same
  kernels with 16x16 tiles, so small shapes cross many tile boundaries. It is slow: shapes stay small
  (L <= 64, batch x heads <= 4). On a GPU machine these give way to the compiled kernels below.
* On a GPU (``torch``, ``triton``, ``cuda`` on CUDA tensors): skipped, with the reason, where there is
  none; ``make test-gpu`` (``pytest -m gpu``) runs them.
* Properties every backend keeps (empty rows, lse-only gradients, non-finite inputs, double
  backward refused, every output element written), gradcheck, shape fuzzing, and bad input.

The dispatch rules are in tests/test_dispatch.py, the custom ops (opcheck, torch.compile) in
tests/test_custom_ops.py, the C++ kernel's internals in tests/test_cpu_kernel.py.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
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
    skip_unavailable,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qstar_kernels
from qstar_kernels import BackendUnavailableError, _ext, thought_attention
from qstar_kernels.backends.attention import triton as attention_triton

ON_GPU = torch.cuda.is_available()
#: The interpreter runs where there is no GPU; on a GPU the compiled kernels are tested instead.
interpreter = pytest.mark.skipif(
    ON_GPU, reason="interpreter tests; on a GPU the GPU section runs the kernels"
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (none visible)")]
TRITON = pytest.param("triton", marks=interpreter)

# ------------------------------------------------------------------------------------------------
# The CPU backends on the full grid
# ------------------------------------------------------------------------------------------------

FAST_BACKENDS = ["torch", "cpu"]

# (L, depth) covers the grid of the issue; the other axes rotate through it, so every value of
# every axis appears several times without a full cross product (CI has 2 cores).
_LS = [1, 37, 128, 256]
_DEPTHS = [0, 1, 3, 8]
_GQA = [1, 2, 4]
_DS = [16, 64, 128]
_PADS = ["none", "end", "start", "both", "random"]
_WINDOWS = [None, None, 5, 64]
CASES = []
for n, (L, depth) in enumerate(itertools.product(_LS, _DEPTHS)):
    CASES.append(
        dict(
            L=L,
            depth=depth,
            G=_GQA[n % 3],
            D=_DS[(n // 3) % 3],
            pad=_PADS[n % 5],
            window=_WINDOWS[(n // 2) % 4],
            layout="strided" if n % 4 == 3 else "contig",
        )
    )


def _case_id(c):
    w = f"w{c['window']}" if c["window"] else "nowin"
    return f"L{c['L']}-a{c['depth']}-g{c['G']}-D{c['D']}-{c['pad']}-{w}-{c['layout']}"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_fp32(backend, case, seed):
    run_backend_case(backend, case, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES[::3], ids=_case_id)
def test_matches_reference_bf16(backend, case, seed):
    run_backend_case(backend, case, torch.bfloat16)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES[1::5], ids=_case_id)
def test_matches_reference_fp16(backend, case, seed):
    run_backend_case(backend, case, torch.float16)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_reference_fp64_exactly(backend, seed):
    skip_unavailable(backend)
    q, k, v = make_qkv(3, 8, 2, 45, 5, 24, dtype=torch.float64)
    keep = make_padding(3, 45, "both")
    out, lse = thought_attention(q, k, v, key_padding_mask=keep, return_lse=True, backend=backend)
    out64, lse64 = reference64(q, k, v, key_padding_mask=keep, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close_to_reference("out", out, out64, dtype=torch.float64)
    assert_close_to_reference("lse", lse, lse64, dtype=torch.float64)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_depth_zero_is_causal_attention(backend, seed):
    """At a = 0 the pattern is ordinary causal attention: compare with SDPA's causal kernel."""
    skip_unavailable(backend)
    q, k, v = make_qkv(2, 4, 4, 50, 0, 32)
    out = thought_attention(q, k, v, backend=backend)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True
    )
    assert_close_to_reference("out", out, want)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_custom_scale_and_int_mask(backend, seed):
    skip_unavailable(backend)
    q, k, v = make_qkv(2, 4, 1, 20, 2, 8)
    keep = make_padding(2, 20, "end")
    out = thought_attention(q, k, v, key_padding_mask=keep.long(), scale=0.37, backend=backend)
    want = reference64(q, k, v, key_padding_mask=keep, scale=0.37)
    assert_close_to_reference("out", out, want)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_empty_rows_give_zero_gradient_even_with_lse_gradient(backend, seed):
    skip_unavailable(backend)
    q, k, v = make_qkv(1, 2, 1, 16, 3, 8, requires_grad=True)
    keep = torch.ones(1, 16, dtype=torch.bool)
    keep[0, :6] = False  # left padding: rows 0..5 see nothing at all
    out, lse = thought_attention(q, k, v, key_padding_mask=keep, return_lse=True, backend=backend)
    assert torch.isneginf(lse[0, :, :6]).all() and torch.isfinite(lse[0, :, 6:]).all()
    assert (out[0, :, :6] == 0).all()
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[0, :, :6] == 0).all()
    # Padded keys (text block and thought blocks of padded positions) get no gradient.
    assert (dk[0, :, :6] == 0).all() and (dv[0, :, :6] == 0).all()
    for s in range(1, 4):
        assert (dk[0, :, s * 16 : s * 16 + 6] == 0).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS + [TRITON])
def test_lse_only_gradient(backend, seed):
    """A loss on the lse alone (out unused) must still give the right gradient, and none to v."""
    skip_unavailable(backend)
    q, k, v = make_qkv(1, 4, 2, 12, 2, 16, requires_grad=True)
    _, lse = thought_attention(q, k, v, return_lse=True, backend=backend)
    dq, dk, dv = torch.autograd.grad(lse.sum(), (q, k, v), allow_unused=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, lse64 = reference64(q64, k64, v64, return_lse=True)
    dq64, dk64 = torch.autograd.grad(lse64.sum(), (q64, k64))
    assert_close_to_reference("dq", dq, dq64)
    assert_close_to_reference("dk", dk, dk64)
    if backend in ("cpu", "triton", "cuda"):  # the custom op always returns a (zero) dv
        assert dv is not None and torch.all(dv == 0), "the lse does not depend on v"
    else:  # autograd: v is not in the lse's graph
        assert dv is None, "the lse does not depend on v"


def test_backends_agree_with_each_other(seed):
    """The backends agree with each other as well as with the reference (same random inputs)."""
    q, k, v = make_qkv(2, 8, 2, 64, 4, 32)
    keep = make_padding(2, 64, "both")
    outs = {
        b: thought_attention(q, k, v, key_padding_mask=keep, sliding_window=20, backend=b)
        for b in qstar_kernels.available_backends("cpu")
    }
    assert {"reference", "torch", "cpu"} <= set(outs)
    for b, o in outs.items():
        assert torch.allclose(o, outs["reference"], atol=2e-5, rtol=1e-5), b


def test_reference_is_exactly_the_authors_dense_mask_with_sdpa(seed):
    """The reference equals what the authors run: SDPA with the additive finfo.min mask and
    repeat_kv (right padding only, where no row is fully masked)."""
    B, Hq, Hkv, L, depth, D = 2, 4, 2, 30, 4, 16
    q, k, v = make_qkv(B, Hq, Hkv, L, depth, D, dtype=torch.float64)
    keep = make_padding(B, L, "end")
    add = qstar_kernels.build_additive_thought_mask(L, depth, keep, dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=add
    )
    got = thought_attention(q, k, v, key_padding_mask=keep, backend="reference")
    assert torch.allclose(got, want, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# triton through the interpreter (small shapes)
# ------------------------------------------------------------------------------------------------


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


@interpreter
@pytest.mark.parametrize("seed_", range(10))
def test_triton_random_configurations_fp32(seed_, seed):
    case, B, Hkv = _random_case(1000 + seed_)
    torch.manual_seed(seed + seed_)
    run_backend_case("triton", case, torch.float32, B=B, Hkv=Hkv)


@interpreter
@pytest.mark.parametrize("seed_", range(6))
def test_triton_random_configurations_fp16(seed_, seed):
    case, B, Hkv = _random_case(2000 + seed_)
    torch.manual_seed(seed + seed_)
    run_backend_case("triton", case, torch.float16, B=B, Hkv=Hkv)


@interpreter
def test_triton_bf16(seed):
    """bf16 loads are widened to fp32 under the interpreter (its bf16 arithmetic is wrong); the
    rounding on store is still bf16's."""
    case = dict(L=40, depth=3, G=2, D=32, pad="both", window=None, layout="contig")
    run_backend_case("triton", case, torch.bfloat16, B=1, Hkv=2)


@interpreter
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
def test_triton_edge_cases(case, seed):
    B, Hkv = (1, 1) if case["G"] == 4 else (1, 2) if case["G"] == 2 else (2, 2)
    run_backend_case("triton", case, torch.float32, B=B, Hkv=Hkv)


@interpreter
def test_triton_deep_thoughts(seed):
    """depth 33 (more than 32 thought steps): the diagonal loop is not capped."""
    case = dict(L=8, depth=33, G=2, D=16, pad="end", window=None, layout="contig")
    run_backend_case("triton", case, torch.float32, B=1, Hkv=2)


# ------------------------------------------------------------------------------------------------
# On a GPU: torch, triton and cuda on CUDA tensors
# ------------------------------------------------------------------------------------------------


def gpu_marks(fn):
    for mark in reversed(gpu):
        fn = mark(fn)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "L,depth,G,D,pad,window", [(37, 3, 4, 64, "both", None), (256, 8, 4, 128, "start", 64)]
)
@gpu_marks
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
@gpu_marks
def test_triton_on_cuda_matches_reference(dtype, case, seed):
    run_backend_case("triton", case, dtype, B=2, Hkv=2, device="cuda")


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


def _cuda_case_id(c):
    return f"L{c['L']}-a{c['depth']}-g{c['G']}-D{c['D']}-{c['pad']}-w{c['window']}-{c['layout']}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=_cuda_case_id)
@gpu_marks
def test_cuda_matches_reference(dtype, case, seed):
    run_backend_case("cuda", case, dtype, B=2, Hkv=2, device="cuda")


@gpu_marks
def test_cuda_agrees_with_triton(seed):
    """The two GPU backends on one Mistral-like shape (bf16, D=128, GQA 4, depth 14)."""
    q, k, v = make_qkv(2, 8, 2, 256, 14, 128, dtype=torch.bfloat16, device="cuda")
    a = thought_attention(q, k, v, backend="cuda").float()
    b = thought_attention(q, k, v, backend="triton").float()
    assert (a - b).abs().max().item() < 2e-2


@gpu_marks
def test_cuda_refuses_unsupported_head_dims_and_float64():
    q, k, v = make_qkv(1, 2, 1, 8, 1, 80, device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"head dims \(64, 128\), got D=80"):
        thought_attention(q, k, v, backend="cuda")
    q, k, v = make_qkv(1, 2, 1, 8, 1, 64, dtype=torch.float64, device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"float16, bfloat16 and float32, got torch.float64"):
        thought_attention(q, k, v, backend="cuda")


# ------------------------------------------------------------------------------------------------
# What every backend keeps
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_double_backward_is_refused_not_silently_wrong(backend, seed):
    """With create_graph=True the kernel's gradients would be constants: any second-order term
    through the attention would be silently missing (here q**2 keeps dq differentiable)."""
    skip_unavailable(backend)
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16, requires_grad=True)
    out = thought_attention(q, k, v, backend=backend)
    loss = (out * torch.randn_like(out)).sum() + (q**2).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, q, create_graph=True)
    # The plain first-order backward is unaffected.
    out = thought_attention(q, k, v, backend=backend)
    (dq,) = torch.autograd.grad((out * torch.randn_like(out)).sum() + (q**2).sum(), q)
    assert dq.shape == q.shape and torch.isfinite(dq).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", TRITON])
def test_a_nan_key_poisons_every_row_that_reads_it(backend, seed):
    skip_unavailable(backend)
    q, k, v = make_qkv(1, 2, 1, 16, 2, 16)
    k[0, 0, 3, 0] = float("nan")  # a text key every row from 3 on reads
    out = thought_attention(q, k, v, backend=backend)
    assert out[0, :, 3:].isnan().all(dim=-1).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
@pytest.mark.parametrize("where", ["q", "text_k", "text_v", "diag_k", "diag_v", "pad_key", "pad_value"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("window", [None, 3])
def test_nonfinite_inputs_are_never_hidden(backend, where, value, window, seed):
    """A NaN/Inf input must show up as non-finite in every output row that reads it, in that
    row's query gradient and in the gradients of every key/value that row reads (the fast
    kernel's exp must not treat it as a masked score). Rows that cannot see it may still be
    non-finite where a product multiplies a masked (zero) probability by it, as any dense or tiled
    matmul does; padded keys/values are never read, so the cpu forward stays finite (a backward
    GEMM may still multiply a zero score gradient by them)."""
    from qstar_kernels.reference import build_thought_mask

    B, Hq, Hkv, L, depth, D = 2, 4, 2, 11, 2, 8
    G = Hq // Hkv
    q, k, v = make_qkv(B, Hq, Hkv, L, depth, D)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, :2] = False
    keep[1, -3:] = False
    b, h, pos = 0, 1, 6
    target = {"q": (q, (b, 2 * h, pos, 3)), "text_k": (k, (b, h, pos, 1)), "text_v": (v, (b, h, pos, 1))}
    target.update({"diag_k": (k, (b, h, 2 * L + pos, 0)), "diag_v": (v, (b, h, L + pos, 0))})
    target.update({"pad_key": (k, (1, h, L - 1, 0)), "pad_value": (v, (1, h, 2 * L - 2, 0))})
    tensor, index = target[where]
    tensor[index] = value
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = thought_attention(
        q, k, v, key_padding_mask=keep, sliding_window=window, return_lse=True, backend=backend
    )
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    allowed = build_thought_mask(L, depth, keep, window)[:, 0]  # (B, L, (a+1)L)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, (a+1)L)
    reads = (allowed[:, None] & bad_kv[:, :, None, :]).any(-1).repeat_interleave(G, 1)  # (B, Hq, L)
    reads |= ~torch.isfinite(q).all(-1) & allowed.any(-1)[:, None]
    # The keys/values that some bad row reads, per kv head.  (B, Hkv, (a+1)L)
    read_by_bad = (allowed[:, None] & reads[..., None]).any(2).reshape(B, Hkv, G, -1).any(2)

    def nonfinite(t):
        return ~torch.isfinite(t).all(-1)

    # (An infinite key component can give a score of -inf, which the dense softmax then treats
    # as masked; the cpu kernel flags those rows too.)
    if backend == "cpu" or value != value or where not in ("text_k", "diag_k"):
        assert (nonfinite(out) | ~reads).all(), "a row that reads a non-finite input came out finite"
        assert (nonfinite(dq) | ~reads).all(), "dq of such a row came out finite"
        if backend == "cpu":
            assert (nonfinite(dk) | ~read_by_bad).all() and (nonfinite(dv) | ~read_by_bad).all()
    if backend == "cpu":  # lse is NaN exactly in the rows that read a non-finite input
        assert torch.equal(torch.isnan(lse), reads)
    if where.startswith("pad_"):
        assert not reads.any()
        if backend == "cpu":  # the forward never reads a padded key or value
            assert torch.isfinite(out).all() and not torch.isnan(lse).any()


@interpreter
def test_triton_writes_every_output_element(monkeypatch, seed):
    """Every buffer the kernels write starts as NaN; nothing NaN may be left in the results."""
    monkeypatch.setattr(attention_triton, "POISON_OUTPUTS", True)
    q, k, v = make_qkv(2, 2, 1, 37, 3, 24, requires_grad=True)
    keep = make_padding(2, 37, "both")
    out, lse = thought_attention(q, k, v, key_padding_mask=keep, return_lse=True, backend="triton")
    assert not out.isnan().any() and not lse.isnan().any()
    finite = torch.isfinite(lse)
    loss = (out * torch.randn_like(out)).sum() + torch.where(finite, lse, 0.0).sum()
    for g in torch.autograd.grad(loss, (q, k, v)):
        assert not g.isnan().any()


@gpu_marks
def test_triton_on_cuda_writes_every_output_element(monkeypatch, seed):
    monkeypatch.setattr(attention_triton, "POISON_OUTPUTS", True)
    q, k, v = make_qkv(2, 8, 2, 300, 6, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    keep = make_padding(2, 300, "both", device="cuda")
    out, lse = thought_attention(q, k, v, key_padding_mask=keep, return_lse=True, backend="triton")
    assert not out.isnan().any() and not lse.isnan().any()
    loss = out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    for g in torch.autograd.grad(loss, (q, k, v)):
        assert not g.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@gpu_marks
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


# ------------------------------------------------------------------------------------------------
# gradcheck and shape fuzzing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize(
    "B,Hq,Hkv,L,depth,D,pad,window",
    [
        (1, 2, 1, 5, 2, 4, None, None),
        (2, 4, 2, 6, 3, 3, "both", 3),
        (1, 1, 1, 1, 0, 2, None, None),
    ],
)
def test_gradcheck(backend, B, Hq, Hkv, L, depth, D, pad, window, seed):
    assert backend in qstar_kernels.available_backends("cpu")
    q = torch.randn(B, Hq, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, (depth + 1) * L, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, (depth + 1) * L, D, dtype=torch.float64, requires_grad=True)
    keep = None
    if pad == "both":
        keep = torch.ones(B, L, dtype=torch.bool)
        keep[0, :2] = False  # left padding: rows 0 and 1 of batch 0 see nothing
        keep[-1, -2:] = False

    def fn(q, k, v):
        out, lse = thought_attention(
            q, k, v, key_padding_mask=keep, sliding_window=window, return_lse=True, backend=backend
        )
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


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


# ------------------------------------------------------------------------------------------------
# Bad input gets a clear exception naming the argument and what was expected
# ------------------------------------------------------------------------------------------------


def _qkv(B=2, Hq=4, Hkv=2, L=8, depth=2, D=16, dtype=torch.float32):
    return (
        torch.randn(B, Hq, L, D, dtype=dtype),
        torch.randn(B, Hkv, (depth + 1) * L, D, dtype=dtype),
        torch.randn(B, Hkv, (depth + 1) * L, D, dtype=dtype),
    )


@pytest.mark.parametrize("backend", [None, "reference", "torch", "cpu"])
class TestBadInput:
    def test_wrong_rank(self, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"q must be 4-D \(B, Hq, L, D\), got 3-D"):
            thought_attention(q[0], k, v, backend=backend)
        with pytest.raises(ValueError, match=r"k must be 4-D .*got 5-D"):
            thought_attention(q, k[None], v, backend=backend)

    def test_key_length_not_multiple_of_L(self, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"key length must be \(a\+1\)\*L .*L=8.*k.shape\[2\]=23"):
            thought_attention(q, k[:, :, :23], v[:, :, :23], backend=backend)
        with pytest.raises(ValueError, match=r"k.shape\[2\]=4"):
            thought_attention(q, k[:, :, :4], v[:, :, :4], backend=backend)

    def test_heads_not_multiple(self, backend):
        q, k, v = _qkv(Hq=5, Hkv=2)
        with pytest.raises(
            ValueError, match=r"Hq=5 must be a positive multiple of the key/value heads Hkv=2"
        ):
            thought_attention(q, k, v, backend=backend)

    def test_mismatched_dtype(self, backend):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"share one dtype.*k torch.float16"):
            thought_attention(q, k.half(), v, backend=backend)

    def test_unsupported_dtype(self, backend):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"q must have a floating dtype.*got torch.int64"):
            thought_attention(q.long(), k.long(), v.long(), backend=backend)

    def test_mismatched_device(self, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"one device.*k on meta"):
            thought_attention(q, k.to("meta"), v, backend=backend)

    def test_mismatched_head_dim(self, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"head dim must equal q's D=16"):
            thought_attention(q, k[..., :8], v[..., :8], backend=backend)
        with pytest.raises(ValueError, match=r"k and v must have the same shape"):
            thought_attention(q, k, v[..., :8], backend=backend)

    def test_mismatched_batch(self, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"batch size must equal q's B=2"):
            thought_attention(q, k[:1], v[:1], backend=backend)

    def test_padding_mask_shape_dtype_device(self, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B=2, L=8\), got \(2, 24\)"):
            thought_attention(q, k, v, key_padding_mask=torch.ones(2, 24, dtype=torch.bool), backend=backend)
        with pytest.raises(ValueError, match=r"got \(8,\)"):
            thought_attention(q, k, v, key_padding_mask=torch.ones(8, dtype=torch.bool), backend=backend)
        with pytest.raises(TypeError, match=r"key_padding_mask must be bool .*got torch.float32"):
            thought_attention(q, k, v, key_padding_mask=torch.ones(2, 8), backend=backend)
        with pytest.raises(ValueError, match=r"key_padding_mask must be on cpu"):
            thought_attention(
                q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.bool, device="meta"), backend=backend
            )

    def test_bad_scale_window_and_flags(self, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="scale must be None or a finite float"):
            thought_attention(q, k, v, scale=float("nan"), backend=backend)
        with pytest.raises(ValueError, match="sliding_window must be None or an int >= 1, got 0"):
            thought_attention(q, k, v, sliding_window=0, backend=backend)
        with pytest.raises(TypeError, match="return_lse must be a bool"):
            thought_attention(q, k, v, return_lse="yes", backend=backend)

    def test_scale_and_window_types(self, backend):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"sliding_window must be None or an int, got float 2.5"):
            thought_attention(q, k, v, sliding_window=2.5, backend=backend)
        with pytest.raises(TypeError, match=r"sliding_window must be None or an int, got bool"):
            thought_attention(q, k, v, sliding_window=True, backend=backend)
        with pytest.raises(TypeError, match=r"scale must be None or a real number, got str"):
            thought_attention(q, k, v, scale="0.1", backend=backend)
        for bad in (torch.tensor(True), np.bool_(True), torch.tensor([3]), np.array([3])):
            with pytest.raises(TypeError, match=r"sliding_window must be None or an int"):
                thought_attention(q, k, v, sliding_window=bad, backend=backend)
        for bad in (torch.tensor(0.5, requires_grad=True), np.array([[0.5]]), torch.tensor(True)):
            with pytest.raises(TypeError, match=r"scale must be None or a real number"):
                thought_attention(q, k, v, scale=bad, backend=backend)
        # NumPy and 0-d tensor numbers are numbers like any other.
        want = thought_attention(q, k, v, sliding_window=3, scale=0.25, backend="reference")
        for w, sc in ((np.int64(3), np.float32(0.25)), (torch.tensor(3), torch.tensor(0.25))):
            got = thought_attention(q, k, v, sliding_window=w, scale=sc, backend=backend)
            assert torch.allclose(got, want, atol=1e-5)

    def test_zero_query_heads(self, backend):
        q, k, v = _qkv()
        with pytest.raises(
            ValueError, match=r"q must have Hq >= 1, L >= 1 and D >= 1, got shape \(2, 0, 8, 16\)"
        ):
            thought_attention(q[:, :0], k, v, backend=backend)

    def test_complex_padding_mask(self, backend):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"key_padding_mask must be bool .*complex64"):
            thought_attention(
                q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.complex64), backend=backend
            )

    def test_not_a_tensor(self, backend):
        _, k, v = _qkv()
        with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
            thought_attention([1.0], k, v, backend=backend)
