"""The GPU side of the same contract: whatever can run on a CUDA device today (the structured
``torch`` backend and the automatic choice there) against the reference. Skipped, with the reason,
where there is no GPU; `pytest -m gpu` selects these on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from helpers import LOWP, assert_close_to_reference, make_padding, make_qkv, plain_lowp_attention, reference64

from qstar_kernels import attention as attention_mod
from qstar_kernels import thought_attention

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


def test_automatic_choice_on_cuda_says_what_it_runs(seed, monkeypatch):
    monkeypatch.setattr(attention_mod, "_warned", set())  # the warning is once per process
    q, k, v = make_qkv(1, 4, 2, 16, 2, 32, device="cuda")
    with pytest.warns(RuntimeWarning, match="no fused kernel for cuda tensors"):
        out = thought_attention(q, k, v)
    assert out.is_cuda
