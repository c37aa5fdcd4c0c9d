"""The per-element maths the CUDA kernels run (csrc/common/softmax_math.h, lm_head_math.h),
compiled for the host and run on the CPU in the kernels' own sequence (csrc/cpu/shared_math.cpp),
against PyTorch: the online softmax with its single pushes and tile merges, fully masked rows,
the backward row term, the LM head's tile-merged log-sum-exp (NaN and +inf rows) and the gradient
epilogue. The CPU kernels (thought_attention.cpp, lm_head.cpp) call the same header functions, so
their equivalence tests cover them too; this file pins the GPU's order of operations."""

from __future__ import annotations

import pytest
import torch

from qstar_kernels import _ext

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def C():
    ext = _ext.cpu_extension()
    assert ext is not None and hasattr(ext, "shared_online_softmax_rows"), _ext.cpu_extension_error()
    return ext


def _scores(R, Cn, mask_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, Cn, generator=g) * 4
    x[torch.rand(R, Cn, generator=g) < mask_frac] = NEG_INF
    x[0] = NEG_INF  # a row that sees nothing
    if R > 2:
        x[1, :-1] = NEG_INF  # a row that sees one key, the last
        x[2, 1:] = NEG_INF  # a row that sees one key, the first (a pushed one)
    return x


@pytest.mark.parametrize("n_push,tile", [(0, 32), (3, 32), (7, 5), (40, 8), (0, 1), (2, 1000)])
def test_online_softmax_matches_softmax(C, n_push, tile, seed):
    x = _scores(9, 37, seed=seed)
    probs, lse = C.shared_online_softmax_rows(x, n_push, tile)
    want_lse = torch.logsumexp(x.double(), dim=1)
    want = torch.softmax(x.double(), dim=1).nan_to_num(0.0)  # empty rows: zeros
    torch.testing.assert_close(probs.double(), want, atol=2e-6, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[fin], want_lse[fin], atol=2e-6, rtol=1e-6)
    assert torch.all(probs[0] == 0) and not probs.isnan().any()


def test_online_softmax_is_stable_for_huge_scores(C):
    x = torch.tensor([[1e30, 1e30 - 1e24, NEG_INF, -1e30], [-1e30, NEG_INF, -1e30 + 1e24, -1e30]])
    probs, lse = C.shared_online_softmax_rows(x, 1, 2)
    assert torch.isfinite(probs).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_softmax_backward_row(C, seed):
    x = _scores(6, 21, seed=seed)
    lse = torch.logsumexp(x, dim=1)
    dp = torch.randn(6, 21)
    dd, gl = torch.randn(6), torch.randn(6)
    ds = C.shared_softmax_bwd_rows(x, lse, dp, dd, gl)
    p = torch.softmax(x.double(), 1).nan_to_num(0.0)
    want = p * (dp.double() - (dd.double() - gl.double())[:, None])
    torch.testing.assert_close(ds.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.all(ds[0] == 0)  # the empty row: zero gradient, not NaN


@pytest.mark.parametrize("tile", [1, 4, 7, 100])
def test_lm_head_tile_merge(C, tile, seed):
    z = torch.randn(5, 23) * 3
    z[1, 3] = NEG_INF  # a banned id
    z[2] = NEG_INF  # nothing allowed: -inf
    z[3, 5] = float("nan")
    z[4, 20] = float("inf")
    lse = C.shared_lse_merge_tiles(z, tile)
    want = torch.logsumexp(z.double(), 1)
    torch.testing.assert_close(lse[:2].double(), want[:2], atol=2e-6, rtol=1e-6)
    assert lse[2] == NEG_INF
    assert lse[3].isnan() and lse[4].isnan()  # a NaN or +inf logit never gives a finite lse


def test_logit_gradient_epilogue(C, seed):
    z = torch.randn(4, 9)
    lse = torch.logsumexp(z * 0.5, 1)
    index = torch.tensor([0, 8, -1, 20])  # outside [0, 9): no one-hot
    coef = torch.randn(4)
    got = C.shared_logit_grad_rows(z, lse, index, coef, 0.5)
    onehot = torch.zeros(4, 9)
    onehot[0, 0] = onehot[1, 8] = 1
    want = coef[:, None] * (onehot - torch.exp(z * 0.5 - lse[:, None]))
    torch.testing.assert_close(got, want)


def test_mix_prologue_and_epilogue(C, seed):
    hb, ht, w = torch.randn(6, 10), torch.randn(6, 10), torch.randn(6) * 3
    h = C.lm_head_mix(hb, ht, w, torch.float64)
    wd = w.double()[:, None]
    torch.testing.assert_close(h, (1 - wd) * hb.double() + wd * ht.double())
    g = torch.randn(6, 10, dtype=torch.float64)
    gb, gt, gw = C.lm_head_mix_backward(g, hb, ht, w)
    torch.testing.assert_close(gb, (1 - wd) * g)
    torch.testing.assert_close(gt, wd * g)
    torch.testing.assert_close(gw, (g * (ht.double() - hb.double())).sum(1))
