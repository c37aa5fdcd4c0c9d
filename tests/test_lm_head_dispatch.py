"""The dispatch of the LM-head ops (``qstar_kernels._lm_head_dispatch``): automatic choice by device,
the ``backend=`` argument, the environment variables, and clear errors instead of silent fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

import qstar_kernels
from qstar_kernels import BackendUnavailableError, mixed_token_logprobs, mixing, sample_thought_tokens
from qstar_kernels import _lm_head_dispatch as dispatch


def _inputs():
    hb, ht, weight = torch.randn(5, 8), torch.randn(5, 8), torch.randn(11, 8)
    return hb, ht, torch.randn(5), weight, torch.randint(0, 11, (5,))


@pytest.fixture
def calls(monkeypatch):
    """The name of every fused backend whose passes run."""
    seen = []

    real = mixing.lm_head_passes

    def spy(name):
        seen.append(name)
        return real(name)

    monkeypatch.setattr(mixing, "lm_head_passes", spy)
    monkeypatch.setattr(qstar_kernels.sampling, "lm_head_passes", spy)
    monkeypatch.setattr(dispatch, "_warned", set())
    return seen


def test_available_backends():
    assert qstar_kernels.available_lm_head_backends("cpu") == ["reference", "torch", "cpu", "triton"]
    assert qstar_kernels.available_lm_head_backends("meta") == ["reference", "torch"]


def test_automatic_choice_on_cpu_is_the_cpu_kernel_quietly(calls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixed_token_logprobs(*_inputs())
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))
    assert calls == ["cpu", "cpu"]


def test_automatic_fallback_says_so_once(monkeypatch, calls):
    monkeypatch.setattr(dispatch._ext, "cpu_extension", lambda: None)
    monkeypatch.setattr(dispatch._ext, "cpu_extension_error", lambda: "ImportError: gone")
    with pytest.warns(
        RuntimeWarning, match=r"falling back to the tiled 'torch' backend: .*ImportError: gone"
    ):
        mixed_token_logprobs(*_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))  # the second time is quiet
    assert calls == ["torch", "torch"]


def test_explicit_backend_that_cannot_run(monkeypatch):
    with pytest.raises(
        BackendUnavailableError, match=r"backend='cpu' cannot run: .*CPU tensors, got tensors on meta"
    ):
        dispatch.select_backend("op", "cpu", torch.device("meta"))
    with pytest.raises(
        BackendUnavailableError,
        match=r"backend='triton' cannot run: .*float32, float16 and bfloat16.*float64",
    ):
        mixed_token_logprobs(
            *(t.double() if t.is_floating_point() else t for t in _inputs()), backend="triton"
        )
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        BackendUnavailableError, match=r"runs on CUDA tensors \(CPU tensors only under TRITON_INTERPRET=1\)"
    ):
        mixed_token_logprobs(*_inputs(), backend="triton")
    monkeypatch.setattr(dispatch._ext, "cpu_extension", lambda: object())  # built from older sources
    with pytest.raises(
        BackendUnavailableError, match=r"built from older sources without the LM-head kernels"
    ):
        mixed_token_logprobs(*_inputs(), backend="cpu")


def test_op_specific_env_var(monkeypatch, calls):
    monkeypatch.setenv("QSTAR_LM_HEAD_BACKEND", "torch")
    mixed_token_logprobs(*_inputs())
    mixed_token_logprobs(*_inputs(), backend="cpu")  # an explicit argument wins
    assert calls == ["torch", "cpu"]
    monkeypatch.setenv("QSTAR_BACKEND", "cpu")  # the op-specific variable wins over the global one
    sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))
    assert calls[-1] == "torch"
    monkeypatch.setenv("QSTAR_LM_HEAD_BACKEND", "nope")
    with pytest.raises(
        ValueError,
        match=r"QSTAR_LM_HEAD_BACKEND must be one of "
        r"\('reference', 'torch', 'cpu', 'triton', 'cuda'\), got 'nope'",
    ):
        mixed_token_logprobs(*_inputs())


def test_global_env_var(monkeypatch, calls):
    monkeypatch.setenv("QSTAR_BACKEND", "torch")
    mixed_token_logprobs(*_inputs())
    assert calls == ["torch"]
    monkeypatch.setenv("QSTAR_BACKEND", "reference")
    out = mixed_token_logprobs(*_inputs())
    assert calls == ["torch"] and out.shape == (5,)  # the reference runs without passes
    monkeypatch.setenv("QSTAR_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"QSTAR_BACKEND must be one of .*got 'nope'"):
        mixed_token_logprobs(*_inputs())


def test_global_env_var_naming_another_ops_backend_is_ignored_with_a_warning(monkeypatch, calls):
    monkeypatch.setattr(dispatch, "_ATTENTION_BACKENDS", ("reference", "torch", "cpu", "flex"))
    monkeypatch.setenv("QSTAR_BACKEND", "flex")
    with pytest.warns(RuntimeWarning, match=r"QSTAR_BACKEND='flex' names no backend of the LM-head ops"):
        mixed_token_logprobs(*_inputs())
    assert calls == ["cpu"]


def test_cuda_backend_is_explicit_and_mixing_only(monkeypatch, calls):
    """'cuda' (csrc/cuda/mixing.cu) never runs on CPU tensors, says why, and has no sampling."""
    assert "cuda" in qstar_kernels.LM_HEAD_BACKENDS
    assert "cuda" not in qstar_kernels.available_lm_head_backends("cpu")
    with pytest.raises(
        BackendUnavailableError, match=r"backend='cuda' cannot run: .*(CUDA tensors|not built)"
    ):
        mixed_token_logprobs(*_inputs(), backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"implements mixed_token_logprobs only"):
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8), backend="cuda")
    # The package-wide variable naming 'cuda' (for the attention) leaves sampling to choose by device.
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv("QSTAR_BACKEND", "cuda")
    with pytest.warns(RuntimeWarning, match=r"implements mixed_token_logprobs only"):
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))
    assert calls[-1] == "cpu"
