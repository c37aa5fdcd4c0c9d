"""Every fast backend of ``thought_attention`` against the dense reference, forward and backward."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    assert_close_to_reference,
    make_padding,
    make_qkv,
    reference64,
    run_backend_case,
    skip_unavailable,
)

import qstar_kernels
from qstar_kernels import thought_attention

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


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_lse_only_gradient(backend, seed):
    """A loss on the lse alone (out unused) must still give the right gradient."""
    skip_unavailable(backend)
    q, k, v = make_qkv(1, 4, 2, 12, 2, 16, requires_grad=True)
    _, lse = thought_attention(q, k, v, return_lse=True, backend=backend)
    dq, dk = torch.autograd.grad(lse.sum(), (q, k), allow_unused=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, lse64 = reference64(q64, k64, v64, return_lse=True)
    dq64, dk64 = torch.autograd.grad(lse64.sum(), (q64, k64))
    assert_close_to_reference("dq", dq, dq64)
    assert_close_to_reference("dk", dk, dk64)


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
