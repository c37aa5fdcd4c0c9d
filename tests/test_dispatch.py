"""The one dispatch (``qstar_kernels.dispatch``) of the three ops: the ``backend=`` argument, then the
environment (``QSTAR_BACKEND``; ``QSTAR_LM_HEAD_BACKEND`` for the LM-head ops), then the device;
clear errors instead of silent fallbacks, and one warning when the automatic choice falls back."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_qkv

import qstar_kernels
from qstar_kernels import (
    BackendUnavailableError,
    _ext,
    custom_ops,
    dispatch,
    mixed_token_logprobs,
    sample_thought_tokens,
    thought_attention,
)
from qstar_kernels.backends.attention import torch as attention_torch
from qstar_kernels.backends.attention import triton as attention_triton


def _qkv(B=2, Hq=4, Hkv=2, L=8, depth=2, D=16, dtype=torch.float32):
    return (
        torch.randn(B, Hq, L, D, dtype=dtype),
        torch.randn(B, Hkv, (depth + 1) * L, D, dtype=dtype),
        torch.randn(B, Hkv, (depth + 1) * L, D, dtype=dtype),
    )


def _lm_inputs():
    hb, ht, weight = torch.randn(5, 8), torch.randn(5, 8), torch.randn(11, 8)
    return hb, ht, torch.randn(5), weight, torch.randint(0, 11, (5,))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """The fallback warnings are once per process: each test starts with none given."""
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.fixture
def attention_calls(monkeypatch):
    """The name of every attention backend that runs (the compiled ones behind the custom op)."""
    seen = []
    for name, module in custom_ops.ATTENTION_BACKENDS.items():
        real = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, _n=name, _f=real: seen.append(_n) or _f(*a))
    real_torch = attention_torch.forward
    monkeypatch.setattr(attention_torch, "forward", lambda *a: seen.append("torch") or real_torch(*a))
    return seen


@pytest.fixture
def lm_calls(monkeypatch):
    """The name of every fused LM-head backend whose passes run."""
    seen = []
    real = custom_ops.passes_for

    def spy(name):
        seen.append(name)
        return real(name)

    monkeypatch.setattr(custom_ops, "passes_for", spy)
    return seen


# ------------------------------------------------------------------------------------------------
# What can run here
# ------------------------------------------------------------------------------------------------


def test_available_backends():
    # The tests run Triton through its interpreter (TRITON_INTERPRET=1, tests/conftest.py) where
    # there is no GPU, so the Triton kernels can run on CPU tensors there.
    on_cpu = ["reference", "torch", "cpu"] + (["triton"] if dispatch.triton_interpreting() else [])
    assert qstar_kernels.available_backends("cpu") == on_cpu
    assert "cpu" not in qstar_kernels.available_backends("meta")
    assert "triton" not in qstar_kernels.available_backends("meta")
    assert qstar_kernels.available_lm_head_backends("cpu") == on_cpu
    assert qstar_kernels.available_lm_head_backends("meta") == ["reference", "torch"]
    assert dispatch.available_backends("cpu", "sample_thought_tokens") == on_cpu


def test_one_table_of_reasons():
    """Each reason names the backend and what it needs; reference and torch run anywhere."""
    for op in dispatch.OPS:
        for device in ("cpu", "meta"):
            assert dispatch.unavailable_reason(op, "reference", device) is None
            assert dispatch.unavailable_reason(op, "torch", device) is None
        assert "CPU tensors, got tensors on meta" in dispatch.unavailable_reason(op, "cpu", "meta")
    why = dispatch.unavailable_reason("thought_attention", "triton", "cpu", torch.float32, 512)
    assert "head dims up to 256, got D=512" in why
    why = dispatch.unavailable_reason("mixed_token_logprobs", "triton", "cpu", torch.float64)
    assert "float16, bfloat16 and float32, got torch.float64" in why


# ------------------------------------------------------------------------------------------------
# 1. The backend= argument
# ------------------------------------------------------------------------------------------------


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
    with pytest.raises(
        BackendUnavailableError, match=r"backend='cpu' cannot run: .*CPU tensors, got tensors on meta"
    ):
        dispatch.select_backend("mixed_token_logprobs", "cpu", torch.device("meta"))


def test_backend_that_is_not_built(monkeypatch):
    monkeypatch.setattr(_ext, "cpu_extension", lambda: None)
    monkeypatch.setattr(_ext, "cpu_extension_error", lambda: "ImportError: gone")
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match=r"qstar_kernels._C is not built.*ImportError: gone"):
        thought_attention(q, k, v, backend="cpu")


def test_lm_head_backends_that_cannot_run(monkeypatch):
    with pytest.raises(
        BackendUnavailableError,
        match=r"backend='triton' cannot run: .*float16, bfloat16 and float32.*float64",
    ):
        mixed_token_logprobs(
            *(t.double() if t.is_floating_point() else t for t in _lm_inputs()), backend="triton"
        )
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        BackendUnavailableError, match=r"runs on CUDA tensors \(CPU tensors only under TRITON_INTERPRET=1\)"
    ):
        mixed_token_logprobs(*_lm_inputs(), backend="triton")
    monkeypatch.setattr(_ext, "cpu_extension", lambda: object())  # built from older sources
    with pytest.raises(
        BackendUnavailableError, match=r"built from older sources without the LM-head kernels"
    ):
        mixed_token_logprobs(*_lm_inputs(), backend="cpu")


def test_triton_unavailable_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16)
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run: .*TRITON_INTERPRET=1"):
        thought_attention(q, k, v, backend="triton")
    assert "triton" not in qstar_kernels.available_backends("cpu")


def test_triton_refuses_float64_and_huge_head_dims_clearly():
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float16, bfloat16 and float32, got torch.float64"):
        thought_attention(q, k, v, backend="triton")
    q, k, v = make_qkv(1, 1, 1, 2, 0, 512)
    with pytest.raises(BackendUnavailableError, match="head dims up to 256, got D=512"):
        thought_attention(q, k, v, backend="triton")


def test_cuda_backend_is_explicit_and_not_for_sampling(monkeypatch, lm_calls):
    """'cuda' (csrc/cuda/mixing.cu) never runs on CPU tensors, says why, and has no sampling."""
    assert "cuda" in qstar_kernels.LM_HEAD_BACKENDS
    assert "cuda" not in qstar_kernels.available_lm_head_backends("cpu")
    with pytest.raises(
        BackendUnavailableError, match=r"backend='cuda' cannot run: .*(CUDA tensors|not built)"
    ):
        mixed_token_logprobs(*_lm_inputs(), backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"implements mixed_token_logprobs only"):
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8), backend="cuda")
    # The package-wide variable naming 'cuda' (for the attention) leaves sampling to choose by device.
    monkeypatch.setenv("QSTAR_BACKEND", "cuda")
    with pytest.warns(RuntimeWarning, match=r"implements mixed_token_logprobs only"):
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))
    assert lm_calls[-1] == "cpu"


# ------------------------------------------------------------------------------------------------
# 2. The environment
# ------------------------------------------------------------------------------------------------


def test_env_var_overrides_the_automatic_choice(monkeypatch, attention_calls):
    q, k, v = _qkv()
    monkeypatch.setenv("QSTAR_BACKEND", "torch")
    thought_attention(q, k, v)
    assert attention_calls == ["torch"]
    thought_attention(q, k, v, backend="reference")  # an explicit argument wins over the variable
    assert attention_calls == ["torch"]
    monkeypatch.setenv("QSTAR_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"QSTAR_BACKEND must be one of .*'nope'"):
        thought_attention(q, k, v)


def test_env_var_naming_a_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("QSTAR_BACKEND", "cuda")
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match=r"QSTAR_BACKEND='cuda' cannot run"):
        thought_attention(q, k, v)


def test_global_env_var_for_the_lm_head_ops(monkeypatch, lm_calls):
    monkeypatch.setenv("QSTAR_BACKEND", "torch")
    mixed_token_logprobs(*_lm_inputs())
    assert lm_calls == ["torch"]
    monkeypatch.setenv("QSTAR_BACKEND", "reference")
    out = mixed_token_logprobs(*_lm_inputs())
    assert lm_calls == ["torch"] and out.shape == (5,)  # the reference runs without passes
    monkeypatch.setenv("QSTAR_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"QSTAR_BACKEND must be one of .*got 'nope'"):
        mixed_token_logprobs(*_lm_inputs())


def test_lm_head_alias_is_scoped_to_the_lm_head_ops(monkeypatch, lm_calls, attention_calls):
    monkeypatch.setenv("QSTAR_LM_HEAD_BACKEND", "torch")
    mixed_token_logprobs(*_lm_inputs())
    mixed_token_logprobs(*_lm_inputs(), backend="cpu")  # an explicit argument wins
    assert lm_calls == ["torch", "cpu"]
    monkeypatch.setenv("QSTAR_BACKEND", "cpu")  # the op-specific variable wins over the global one
    sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))
    assert lm_calls[-1] == "torch"
    thought_attention(*_qkv())  # the attention reads QSTAR_BACKEND only
    assert attention_calls == ["cpu"]
    monkeypatch.setenv("QSTAR_LM_HEAD_BACKEND", "nope")
    with pytest.raises(
        ValueError,
        match=r"QSTAR_LM_HEAD_BACKEND must be one of "
        r"\('reference', 'torch', 'cpu', 'triton', 'cuda'\), got 'nope'",
    ):
        mixed_token_logprobs(*_lm_inputs())


def test_global_env_var_naming_another_ops_backend_is_ignored_with_a_warning(monkeypatch, lm_calls):
    names = dict(dispatch.NAMES, thought_attention=dispatch.BACKENDS + ("flex",))
    monkeypatch.setattr(dispatch, "NAMES", names)
    monkeypatch.setenv("QSTAR_BACKEND", "flex")
    with pytest.warns(RuntimeWarning, match=r"QSTAR_BACKEND='flex': 'flex' names no backend of mixed_token"):
        mixed_token_logprobs(*_lm_inputs())
    assert lm_calls == ["cpu"]


# ------------------------------------------------------------------------------------------------
# 3. The device
# ------------------------------------------------------------------------------------------------


def test_automatic_choice_on_cpu_is_the_cpu_kernel_quietly(attention_calls, lm_calls):
    """The interpreter is for tests: CPU tensors go to the C++ kernels by default."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thought_attention(*_qkv())
        mixed_token_logprobs(*_lm_inputs())
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))
    assert attention_calls == ["cpu"] and lm_calls == ["cpu", "cpu"]


def test_automatic_fallback_says_so_once(monkeypatch, attention_calls):
    monkeypatch.setattr(_ext, "cpu_extension", lambda: None)
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="falling back to the slower 'torch' backend"):
        out = thought_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = thought_attention(q, k, v)  # the second time is quiet
    assert torch.equal(out, out2) and attention_calls == ["torch", "torch"]


def test_automatic_fallback_of_the_lm_head_ops_says_so_once(monkeypatch, lm_calls):
    monkeypatch.setattr(_ext, "cpu_extension", lambda: None)
    monkeypatch.setattr(_ext, "cpu_extension_error", lambda: "ImportError: gone")
    with pytest.warns(RuntimeWarning, match=r"ImportError: gone.*falling back to the slower 'torch' backend"):
        mixed_token_logprobs(*_lm_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_thought_tokens(torch.randn(5, 8), torch.randn(11, 8))  # the second time is quiet
    assert lm_calls == ["torch", "torch"]


@pytest.mark.parametrize("op", dispatch.OPS)
def test_the_same_rule_for_every_op(op, monkeypatch):
    """Argument, then environment, then device: the same answers for every op."""
    cpu = torch.device("cpu")
    assert dispatch.select_backend(op, None, cpu, torch.float32) == "cpu"
    assert dispatch.select_backend(op, "torch", cpu, torch.float32) == "torch"
    monkeypatch.setenv("QSTAR_BACKEND", "reference")
    assert dispatch.select_backend(op, None, cpu, torch.float32) == "reference"
    assert dispatch.select_backend(op, "torch", cpu, torch.float32) == "torch"


@pytest.mark.parametrize("op", dispatch.OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_automatic_choice_on_cuda_is_triton_without_a_gpu(op, dtype, monkeypatch):
    """Where Triton can run on CUDA tensors, the automatic choice is Triton (simulated here)."""
    monkeypatch.setattr(dispatch, "_reason", lambda op, b, device_type, dtype, head_dim: "")
    assert dispatch.select_backend(op, None, torch.device("cuda"), dtype, 64) == "triton"
    monkeypatch.setenv("QSTAR_BACKEND", "cuda")
    if op == "sample_thought_tokens":
        with pytest.warns(RuntimeWarning, match="implements mixed_token_logprobs only"):
            assert dispatch.select_backend(op, None, torch.device("cuda"), dtype) == "triton"
    else:
        assert dispatch.select_backend(op, None, torch.device("cuda"), dtype, 64) == "cuda"


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped, with the reason, where there is none; `pytest -m gpu` selects these)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("op", dispatch.OPS)
def test_automatic_choice_on_cuda_is_triton(op):
    assert dispatch.select_backend(op, None, torch.device("cuda"), torch.bfloat16, 128) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_automatic_choice_on_cuda_runs_the_triton_kernel(monkeypatch, attention_calls):
    q, k, v = make_qkv(1, 4, 2, 16, 2, 32, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = thought_attention(q, k, v)
    assert out.is_cuda and attention_calls == ["triton"]
    monkeypatch.setenv("QSTAR_BACKEND", "cuda")
    q, k, v = make_qkv(1, 4, 2, 16, 2, 64, device="cuda")
    assert dispatch.select_backend("thought_attention", None, q.device, q.dtype, 64) == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_automatic_fallback_on_cuda_says_so():
    q, k, v = make_qkv(1, 4, 2, 16, 2, 32, dtype=torch.float64, device="cuda")  # no Triton float64
    with pytest.warns(RuntimeWarning, match="falling back to the slower 'torch' backend"):
        out = thought_attention(q, k, v)
    assert out.is_cuda


def test_triton_backend_module_exposes_the_kernel_launchers():
    """The attention triton backend is launchers only: the reasons live in the dispatch."""
    assert callable(attention_triton.forward) and callable(attention_triton.backward)
    assert not hasattr(attention_triton, "unavailable_reason")
