"""The reference mask is the authors' mask: checked against a hand-written example and against an
independent re-enactment of how their code grows it step by step (``docs/algorithm.md``, "The
thought mask")."""

from __future__ import annotations

import pytest
import torch
from helpers import make_padding

from qstar_kernels.reference import (
    build_additive_thought_mask,
    build_thought_mask,
    thought_attention_reference,
    thought_mask_mod,
)


def _authors_mask(keep: torch.Tensor, steps: int, dtype=torch.bfloat16, window=None) -> torch.Tensor:
    """Re-enact the authors' procedure with plain loops: an additive causal+padding mask, then,
    after each step, take its first L columns, mark entries == max as allowed, keep the diagonal
    of that, re-encode as 0 / finfo.min and concatenate on the key axis."""
    B, L = keep.shape
    neg = torch.finfo(dtype).min
    base = torch.full((B, 1, L, L), neg, dtype=dtype)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                if j <= i and keep[b, j] and (window is None or i - j < window):
                    base[b, 0, i, j] = 0
    mask = base
    for _ in range(steps):
        first = mask[..., :L]
        allowed = first == first.max()
        eye = torch.eye(L, dtype=torch.float32).to(dtype)
        diag = eye * allowed.to(dtype)
        new_block = torch.where(diag > 0, torch.zeros((), dtype=dtype), torch.full((), neg, dtype=dtype))
        mask = torch.cat([mask, new_block], dim=-1)
    return mask


def test_hand_checked_example():
    # ``docs/algorithm.md``, "The thought mask": L=5, the last position is padding, step 2.
    keep = torch.tensor([[True, True, True, True, False]])
    want_rows = [
        "10000 10000 10000",
        "11000 01000 01000",
        "11100 00100 00100",
        "11110 00010 00010",
        "11110 00000 00000",
    ]
    want = torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in want_rows])
    got = build_thought_mask(5, 2, keep)
    assert got.shape == (1, 1, 5, 15)
    assert torch.equal(got[0, 0], want)


@pytest.mark.parametrize("pad", ["none", "end", "start", "both", "random"])
@pytest.mark.parametrize("L,steps,window", [(1, 3, None), (7, 0, None), (9, 4, None), (12, 3, 4)])
def test_matches_the_authors_growing_mask(pad, L, steps, window, seed):
    keep = make_padding(3, L, pad)
    keep_t = torch.ones(3, L, dtype=torch.bool) if keep is None else keep
    want = _authors_mask(keep_t, steps, window=window)
    got_add = build_additive_thought_mask(L, steps, keep_t, window, dtype=torch.bfloat16)
    assert got_add.dtype == torch.bfloat16 and got_add.shape == (3, 1, L, (steps + 1) * L)
    assert torch.equal(got_add, want)
    got_bool = build_thought_mask(L, steps, keep, window)
    assert torch.equal(got_bool.expand(3, -1, -1, -1), want == 0)


def test_mask_mod_is_the_dense_mask(seed):
    L, depth = 11, 3
    keep = make_padding(2, L, "both")
    dense = build_thought_mask(L, depth, keep, sliding_window=5)
    qi = torch.arange(L)[:, None]
    kj = torch.arange((depth + 1) * L)[None, :]
    for b in range(2):
        mm = thought_mask_mod(qi, kj, L, keep_q=keep[b][qi], keep_kv=keep[b][kj % L], sliding_window=5)
        assert torch.equal(mm, dense[b, 0])


def test_reference_empty_rows_are_zero_with_finite_gradients(seed):
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 18, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 18, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[False, False, True, True, True, True]])
    out, lse = thought_attention_reference(q, k, v, key_padding_mask=keep, return_lse=True)
    assert (out[0, :, :2] == 0).all() and torch.isneginf(lse[0, :, :2]).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_mask_builder_errors():
    with pytest.raises(ValueError, match="L must be a positive int"):
        build_thought_mask(0, 1)
    with pytest.raises(ValueError, match="depth"):
        build_thought_mask(4, -1)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        build_thought_mask(4, 1, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sliding_window"):
        build_thought_mask(4, 1, sliding_window=0)
    with pytest.raises(TypeError, match="floating dtype"):
        build_additive_thought_mask(4, 1, dtype=torch.int32)
