"""The one dispatch of the package: which backend runs an op, and why a backend cannot.

Every public op (``thought_attention``, ``mixed_token_logprobs``, ``sample_thought_tokens``) calls
:func:`select_backend`. The backends::

    reference  dense PyTorch (qstar_kernels.reference): the executable specification, slow
    torch      plain PyTorch that keeps the op's structure (attention: the causal block plus the
               diagonals; LM head: the tiled algorithm): any device
    cpu        the C++/OpenMP kernels of csrc/cpu
    triton     the Triton kernels (GPU; CPU tensors only under TRITON_INTERPRET=1, which is how the
               tests run them without a GPU)
    cuda       the CUDA kernels of csrc/cuda: thought_attention (head dims 64 and 128) and
               mixed_token_logprobs, not sample_thought_tokens; never the automatic choice

The rule, first match wins, the same for every op:

1. the ``backend=`` argument;
2. the environment: ``QSTAR_BACKEND`` for every op. ``QSTAR_LM_HEAD_BACKEND`` is an alias scoped to
   the two LM-head ops (``mixed_token_logprobs``, ``sample_thought_tokens``): when set, it wins over
   ``QSTAR_BACKEND`` for them and is ignored by ``thought_attention``. A name from either variable
   is an explicit choice (it raises when it cannot run), except that ``QSTAR_BACKEND`` naming a
   backend the op does not implement (``cuda`` for ``sample_thought_tokens``) is ignored by that op
   with a one-time warning, since the variable is package-wide;
3. the device: ``cpu`` for CPU tensors, ``triton`` for the others; when that one cannot run, the
   ``torch`` backend, with a one-time warning that says why.

An explicitly chosen backend (argument or environment) that cannot run raises
:class:`BackendUnavailableError` with the reason from :func:`unavailable_reason`, the one table of
what each backend needs (op, device, dtype, head dim, build).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

import torch

from . import _ext

__all__ = [
    "BACKENDS",
    "LM_HEAD_BACKENDS",
    "OPS",
    "ENV_VAR",
    "LM_HEAD_ENV_VAR",
    "BackendUnavailableError",
    "available_backends",
    "available_lm_head_backends",
    "select_backend",
    "unavailable_reason",
    "warn_once",
    "triton_interpreting",
]

logger = logging.getLogger("qstar_kernels")

#: Every backend name ``thought_attention`` knows, in order of preference on a CPU.
BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
#: The backend names of mixed_token_logprobs and sample_thought_tokens.
LM_HEAD_BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
LM_HEAD_OPS = ("mixed_token_logprobs", "sample_thought_tokens")
OPS = ("thought_attention",) + LM_HEAD_OPS

#: The names the ``backend=`` argument of each op accepts.
NAMES = {"thought_attention": BACKENDS, **{op: LM_HEAD_BACKENDS for op in LM_HEAD_OPS}}
#: (op, backend) pairs that are valid names but not implemented, and why.
NOT_IMPLEMENTED = {
    ("sample_thought_tokens", "cuda"): (
        "the 'cuda' backend implements mixed_token_logprobs only, not sample_thought_tokens "
        "(use 'triton' on a GPU)"
    ),
}

ENV_VAR = "QSTAR_BACKEND"
LM_HEAD_ENV_VAR = "QSTAR_LM_HEAD_BACKEND"

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_HEAD_DIMS = (64, 128)
#: The module of each op's Triton kernels: it fixes interpreted-or-compiled when it loads.
_TRITON_KERNELS = {
    "thought_attention": "qstar_kernels.backends.attention.triton_kernels",
    **{op: "qstar_kernels.backends.lm_head.triton_kernels" for op in LM_HEAD_OPS},
}

_warned: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these inputs or in this build."""


def warn_once(key, msg: str, stacklevel: int = 4) -> None:
    """A RuntimeWarning (and a log record) the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
        logger.warning(msg)


# ------------------------------------------------------------------------------------------------
# Why a backend cannot run
# ------------------------------------------------------------------------------------------------


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(exc).__name__}: {exc}"
    return None


def _cpu_reason(op: str, device_type: str) -> str:
    if device_type != "cpu":
        return f"the 'cpu' backend runs on CPU tensors, got tensors on {device_type}"
    ext = _ext.cpu_extension()
    if ext is None:
        return (
            "the C++ CPU extension qstar_kernels._C is not built or does not import "
            f"({_ext.cpu_extension_error()}); reinstall with `pip install -e . --no-build-isolation`"
        )
    if op in LM_HEAD_OPS and not hasattr(ext, "lm_head_lse_fwd"):
        return (
            "the C++ CPU extension qstar_kernels._C was built from older sources without the "
            "LM-head kernels; rebuild it with `pip install -e . --no-build-isolation`"
        )
    return ""


def _triton_reason(op: str, device_type: str, dtype: torch.dtype | None, head_dim: int) -> str:
    err = _triton_import_error()
    if err is not None:
        return f"Triton does not import ({err}); pip install triton, or a CUDA build of torch, which ships it"
    interpret = triton_interpreting()
    if device_type == "cpu":
        if not interpret:
            return (
                "the 'triton' backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                "got tensors on cpu; the interpreter is for tests and must be set before the first "
                "Triton kernel is used"
            )
    elif device_type != "cuda":
        return f"the 'triton' backend runs on CUDA tensors, got tensors on {device_type}"
    elif interpret:
        return "TRITON_INTERPRET=1 is set, so Triton would interpret instead of compiling for the GPU"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"the 'triton' backend supports float16, bfloat16 and float32, got {dtype}"
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"the 'triton' backend supports head dims up to {TRITON_MAX_HEAD_DIM}, got D={head_dim}"
    kernels = sys.modules.get(_TRITON_KERNELS[op])
    if kernels is not None and kernels.INTERPRETED != interpret:
        return (
            "TRITON_INTERPRET changed after the Triton kernels were first loaded "
            f"(they were loaded {'for the interpreter' if kernels.INTERPRETED else 'for the GPU'})"
        )
    return ""


def _cuda_reason(op: str, device_type: str, dtype: torch.dtype | None, head_dim: int) -> str:
    if _ext.cuda_extension() is None:
        return (
            "the CUDA extension qstar_kernels._C_cuda is not built or does not import "
            f"({_ext.cuda_extension_error()}); it is built by `pip install -e . --no-build-isolation` "
            "when torch is a CUDA build and nvcc is found"
        )
    if op == "thought_attention":
        from .backends.attention import cuda as backend

        kernels = "thought attention kernels"
    else:
        from .backends.lm_head import cuda as backend

        kernels = "LM-head kernels"
    if not backend.ops_registered():
        return (
            f"qstar_kernels._C_cuda was built from older sources without the {kernels}; "
            "rebuild it with `pip install -e . --no-build-isolation`"
        )
    if device_type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors, got tensors on {device_type}"
    if dtype is not None and dtype not in CUDA_DTYPES:
        return f"the 'cuda' backend supports float16, bfloat16 and float32, got {dtype}"
    if op == "thought_attention" and head_dim and head_dim not in CUDA_HEAD_DIMS:
        return f"the 'cuda' backend supports head dims {CUDA_HEAD_DIMS}, got D={head_dim}"
    return ""


@torch.compiler.assume_constant_result
def _reason(op: str, backend: str, device_type: str, dtype: torch.dtype | None, head_dim: int) -> str:
    """The reason, or "" if ``backend`` can run. A constant to torch.compile, which then never
    traces the probes (imports, the environment, the extensions) behind it."""
    if (op, backend) in NOT_IMPLEMENTED:
        return NOT_IMPLEMENTED[(op, backend)]
    if backend in ("reference", "torch"):
        return ""
    if backend == "cpu":
        return _cpu_reason(op, device_type)
    if backend == "triton":
        return _triton_reason(op, device_type, dtype, head_dim)
    if backend == "cuda":
        return _cuda_reason(op, device_type, dtype, head_dim)
    raise AssertionError(backend)


def unavailable_reason(
    op: str, backend: str, device, dtype: torch.dtype | None = None, head_dim: int = 0
) -> str | None:
    """None if ``backend`` can run ``op`` on tensors of ``device`` (and ``dtype``; ``head_dim`` 0:
    not known or not relevant), else the reason it cannot."""
    device_type = device if isinstance(device, str) else device.type
    return _reason(op, backend, torch.device(device_type).type, dtype, int(head_dim)) or None


def available_backends(device: str | torch.device = "cpu", op: str = "thought_attention") -> list[str]:
    """The backends of ``op`` that can run on ``device`` in this installation."""
    dev = torch.device(device)
    return [b for b in NAMES[op] if unavailable_reason(op, b, dev) is None]


def available_lm_head_backends(
    device: str | torch.device = "cpu", op: str = "mixed_token_logprobs"
) -> list[str]:
    """The backends of ``op`` (``mixed_token_logprobs`` or ``sample_thought_tokens``) that can run
    on ``device`` here."""
    return available_backends(device, op)


# ------------------------------------------------------------------------------------------------
# The choice
# ------------------------------------------------------------------------------------------------


def _explicit(op, name, origin, device_type, dtype, head_dim) -> str:
    reason = unavailable_reason(op, name, device_type, dtype, head_dim)
    if reason is not None:
        raise BackendUnavailableError(f"{origin}={name!r} cannot run: {reason}")
    return name


def _from_environment(op: str, device_type: str, dtype, head_dim: int) -> str | None:
    """The backend the environment chooses for ``op``, or None."""
    if op in LM_HEAD_OPS:
        env = os.environ.get(LM_HEAD_ENV_VAR)
        if env:
            if env not in NAMES[op]:
                raise ValueError(
                    f"the environment variable {LM_HEAD_ENV_VAR} must be one of {NAMES[op]}, got {env!r}"
                )
            return _explicit(op, env, LM_HEAD_ENV_VAR, device_type, dtype, head_dim)
    env = os.environ.get(ENV_VAR)
    if not env:
        return None
    known = tuple(dict.fromkeys(name for o in OPS for name in NAMES[o]))
    if env not in known:
        raise ValueError(f"the environment variable {ENV_VAR} must be one of {known}, got {env!r}")
    if env in NAMES[op] and (op, env) not in NOT_IMPLEMENTED:
        return _explicit(op, env, ENV_VAR, device_type, dtype, head_dim)
    why = NOT_IMPLEMENTED.get((op, env)) or f"{env!r} names no backend of {op} {NAMES[op]}"
    hint = f" (set {LM_HEAD_ENV_VAR} to choose for the LM-head ops)" if op in LM_HEAD_OPS else ""
    warn_once(
        ("env", env, op),
        f"{ENV_VAR}={env!r}: {why}; {op} ignores it and chooses by device{hint}",
        stacklevel=5,
    )
    return None


def select_backend(
    op: str, backend: str | None, device, dtype: torch.dtype | None = None, head_dim: int = 0
) -> str:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype`` (with head dim
    ``head_dim`` for the attention), by the rule of the module docstring."""
    device_type = device if isinstance(device, str) else device.type
    if backend is not None:
        if not isinstance(backend, str) or backend not in NAMES[op]:
            raise ValueError(f"backend must be one of {NAMES[op]} (or None for automatic), got {backend!r}")
        return _explicit(op, backend, "backend", device_type, dtype, head_dim)
    chosen = _from_environment(op, device_type, dtype, head_dim)
    if chosen is not None:
        return chosen
    preferred = "cpu" if device_type == "cpu" else "triton"
    reason = unavailable_reason(op, preferred, device_type, dtype, head_dim)
    if reason is None:
        return preferred
    warn_once(
        ("fallback", preferred, device_type, reason),
        f"qstar_kernels.{op}: no fused {preferred!r} kernel for these {device_type} tensors ({reason}); "
        "falling back to the slower 'torch' backend",
    )
    return "torch"
