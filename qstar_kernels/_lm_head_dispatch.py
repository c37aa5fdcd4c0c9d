"""The one dispatch point of the two fused LM-head ops (``mixed_token_logprobs`` and
``sample_thought_tokens``), and the input checks they share.

Backends (the same set for both ops)::

    reference  dense PyTorch (qstar_kernels.reference): the executable specification, slow
    torch      the tiled algorithm in plain PyTorch ops: any device, no (N, V) tensor
    cpu        the tiled algorithm with the C++/OpenMP row kernels of csrc/cpu/lm_head.cpp
    triton     the tiled algorithm with Triton row kernels (GPU; CPU tensors only under
               TRITON_INTERPRET=1, which is how the tests run it without a GPU)
    cuda       mixed_token_logprobs only: the tiled algorithm with cuBLAS GEMMs and the CUDA
               kernels of csrc/cuda/mixing.cu (GPU; chosen only explicitly)

Choice, first match wins: the ``backend=`` argument; the ``QSTAR_LM_HEAD_BACKEND`` environment
variable (these two ops only); the package-wide ``QSTAR_BACKEND`` when it names one of the
backends above (a name that only other ops have, for example a future attention-only backend, is
ignored here with a one-time warning); else by device: ``cpu`` for CPU tensors, ``triton`` for
CUDA tensors, ``torch`` elsewhere (with a one-time warning when the preferred backend cannot run).
An explicitly requested backend that cannot run raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import os
import warnings

import torch

from . import _ext
from ._checks import reject_non_number
from .attention import BACKENDS as _ATTENTION_BACKENDS
from .attention import BackendUnavailableError

__all__ = ["LM_HEAD_BACKENDS", "ENV_VAR", "available_lm_head_backends", "select_backend"]

logger = logging.getLogger("qstar_kernels")

#: The backends of mixed_token_logprobs and sample_thought_tokens, in order of preference on a CPU.
LM_HEAD_BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
ENV_VAR = "QSTAR_LM_HEAD_BACKEND"
GLOBAL_ENV_VAR = "QSTAR_BACKEND"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        logger.warning(msg)


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(exc).__name__}: {exc}"
    return None


def _why_not(
    backend: str, device: torch.device, dtype: torch.dtype | None = None, op: str = "mixed_token_logprobs"
) -> str | None:
    """None if ``backend`` can run ``op`` on tensors of ``device`` (and ``dtype``), else the reason."""
    if backend in ("reference", "torch"):
        return None
    if backend == "cuda":
        from .backends import lm_head_cuda

        return lm_head_cuda.unavailable_reason(op, device, dtype)
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got tensors on {device}"
        ext = _ext.cpu_extension()
        if ext is None:
            return (
                "the C++ CPU extension qstar_kernels._C is not built or does not import "
                f"({_ext.cpu_extension_error()}); reinstall with `pip install -e . --no-build-isolation`"
            )
        if not hasattr(ext, "lm_head_lse_fwd"):
            return (
                "the C++ CPU extension qstar_kernels._C was built from older sources without the "
                "LM-head kernels; rebuild it with `pip install -e . --no-build-isolation`"
            )
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            return f"triton does not import ({err})"
        if dtype == torch.float64:
            return "the 'triton' backend supports float32, float16 and bfloat16 inputs, got torch.float64"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None  # the Triton interpreter (tests without a GPU)
        return (
            f"the 'triton' backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
            f"got tensors on {device}"
        )
    raise AssertionError(backend)


def available_lm_head_backends(
    device: str | torch.device = "cpu", op: str = "mixed_token_logprobs"
) -> list[str]:
    """The backends of ``op`` (``mixed_token_logprobs`` or ``sample_thought_tokens``) that can run
    on ``device`` here."""
    dev = torch.device(device)
    return [b for b in LM_HEAD_BACKENDS if _why_not(b, dev, None, op) is None]


def _checked(name: str, origin: str, device: torch.device, dtype: torch.dtype | None, op: str) -> str:
    reason = _why_not(name, device, dtype, op)
    if reason is not None:
        raise BackendUnavailableError(f"{origin}={name!r} cannot run: {reason}")
    return name


def select_backend(
    op: str, backend: str | None, device: torch.device, dtype: torch.dtype | None = None
) -> str:
    """The backend ``op`` runs on tensors of ``device`` (see the module docstring for the rules)."""
    if backend is not None:
        if not isinstance(backend, str) or backend not in LM_HEAD_BACKENDS:
            raise ValueError(
                f"backend must be one of {LM_HEAD_BACKENDS} (or None for automatic), got {backend!r}"
            )
        return _checked(backend, "backend", device, dtype, op)
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in LM_HEAD_BACKENDS:
            raise ValueError(
                f"the environment variable {ENV_VAR} must be one of {LM_HEAD_BACKENDS}, got {env!r}"
            )
        return _checked(env, ENV_VAR, device, dtype, op)
    env = os.environ.get(GLOBAL_ENV_VAR)
    if env:
        only_other_ops = env == "cuda" and op != "mixed_token_logprobs"
        if env in LM_HEAD_BACKENDS and not only_other_ops:
            return _checked(env, GLOBAL_ENV_VAR, device, dtype, op)
        if only_other_ops:
            _warn_once(
                f"global-env-{env}-{op}",
                f"{GLOBAL_ENV_VAR}={env!r}: the 'cuda' LM-head backend implements mixed_token_logprobs only; "
                f"{op} ignores it and chooses by device (set {ENV_VAR} to choose for this op)",
            )
        elif env in _ATTENTION_BACKENDS:
            _warn_once(
                f"global-env-{env}",
                f"{GLOBAL_ENV_VAR}={env!r} names no backend of the LM-head ops {LM_HEAD_BACKENDS}; "
                f"{op} ignores it and chooses by device (set {ENV_VAR} to choose for these ops)",
            )
        else:
            raise ValueError(
                f"the environment variable {GLOBAL_ENV_VAR} must be one of "
                f"{tuple(dict.fromkeys(_ATTENTION_BACKENDS + LM_HEAD_BACKENDS))}, got {env!r}"
            )
    preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if preferred is None:
        _warn_once(
            f"no-fused-{device.type}",
            f"qstar_kernels.{op}: no fused kernel for {device.type} tensors; using the tiled 'torch' backend",
        )
        return "torch"
    reason = _why_not(preferred, device, dtype, op)
    if reason is None:
        return preferred
    _warn_once(
        f"fallback-{preferred}-{dtype}",
        f"qstar_kernels.{op}: falling back to the tiled 'torch' backend: {reason}",
    )
    return "torch"


# ------------------------------------------------------------------------------------------------
# Input checks shared by the two ops
# ------------------------------------------------------------------------------------------------


def shape_of(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_matrix(name: str, t, what: str) -> None:
    """``t`` is a 2-D floating tensor ``what`` (e.g. "(N, H)")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {what}, got {t.dim()}-D with shape {shape_of(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {t.dtype}"
        )


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype=True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def check_backend_arg(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__} {backend!r}")


def as_float(name: str, x, what: str = "a real number") -> float:
    reject_non_number(name, x, what)
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {what} (finite), got {v!r}")
    return v


def as_int(name: str, x) -> int:
    reject_non_number(name, x, "an int")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}") from None
