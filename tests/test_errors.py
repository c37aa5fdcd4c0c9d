"""Bad input gets a clear exception naming the argument and what was expected; the dispatch
honours QSTAR_BACKEND and never falls back silently."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import qstar_kernels
from qstar_kernels import BackendUnavailableError, thought_attention
from qstar_kernels import attention as attention_mod


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


def test_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(
        ValueError, match=r"backend must be one of \('reference', 'torch', 'cpu', 'triton', 'cuda'\).*'flash'"
    ):
        thought_attention(q, k, v, backend="flash")


def test_backend_that_cannot_run_on_the_device():
    q, k, v = (t.to("meta") for t in _qkv())
    with pytest.raises(
        BackendUnavailableError, match=r"backend='cpu' cannot run: .*CPU tensors, got tensors on meta"
    ):
        thought_attention(q, k, v, backend="cpu")


def test_backend_that_is_not_built(monkeypatch):
    monkeypatch.setattr(attention_mod._ext, "cpu_extension", lambda: None)
    monkeypatch.setattr(attention_mod._ext, "cpu_extension_error", lambda: "ImportError: gone")
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match=r"qstar_kernels._C is not built.*ImportError: gone"):
        thought_attention(q, k, v, backend="cpu")


def test_automatic_fallback_says_so_once(monkeypatch):
    monkeypatch.setattr(attention_mod._ext, "cpu_extension", lambda: None)
    monkeypatch.setattr(attention_mod, "_warned", set())
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="falling back to the slower 'torch' backend"):
        out = thought_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = thought_attention(q, k, v)  # the second time is quiet
    assert torch.equal(out, out2)


def test_automatic_choice_on_cpu_is_the_cpu_kernel(monkeypatch):
    calls = []
    real = attention_mod._cpu_backend.thought_attention_cpu
    monkeypatch.setattr(
        attention_mod._cpu_backend,
        "thought_attention_cpu",
        lambda *a, **kw: calls.append(1) or real(*a, **kw),
    )
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thought_attention(q, k, v)
    assert calls == [1]


def test_env_var_overrides_the_automatic_choice(monkeypatch):
    called = []
    real = attention_mod._torch_backend.thought_attention_torch
    monkeypatch.setattr(
        attention_mod._torch_backend,
        "thought_attention_torch",
        lambda *a, **kw: called.append(1) or real(*a, **kw),
    )
    q, k, v = _qkv()
    monkeypatch.setenv("QSTAR_BACKEND", "torch")
    thought_attention(q, k, v)
    assert called == [1]
    thought_attention(q, k, v, backend="reference")  # an explicit argument wins over the variable
    assert called == [1]
    monkeypatch.setenv("QSTAR_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"QSTAR_BACKEND must be one of .*'nope'"):
        thought_attention(q, k, v)


def test_available_backends_lists_the_cpu_kernel():
    # The tests run Triton through its interpreter (TRITON_INTERPRET=1, tests/conftest.py), so
    # the Triton kernels can run on CPU tensors here.
    assert qstar_kernels.available_backends("cpu") == ["reference", "torch", "cpu", "triton"]
    assert "cpu" not in qstar_kernels.available_backends("meta")
    assert "triton" not in qstar_kernels.available_backends("meta")
