"""torch.autograd.gradcheck in float64 for every backend, through out and lse."""

from __future__ import annotations

import pytest
import torch

import qstar_kernels
from qstar_kernels import thought_attention


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
