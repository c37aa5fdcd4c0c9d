"""``thought_attention``: the public op, its input checks and the one dispatch point.

Shapes (``kernels.md`` section 1)::

    q:    (B, Hq, L, D)
    k, v: (B, Hkv, (a + 1) * L, D)   the text block, then one block of L keys per thought step
    out:  (B, Hq, L, D), dtype of q      lse (optional): (B, Hq, L), natural log, float32
"""

from __future__ import annotations

import logging
import math
import operator
import os
import warnings

import torch

from . import _ext, _ops  # noqa: F401  (_ops registers the qstar:: custom ops at import)
from ._checks import reject_non_number
from .backends import cpu as _cpu_backend
from .backends import cuda_backend as _cuda_backend
from .backends import torch_backend as _torch_backend
from .backends import triton_backend as _triton_backend
from .reference import thought_attention_reference

__all__ = ["thought_attention", "available_backends", "BACKENDS", "BackendUnavailableError"]

logger = logging.getLogger("qstar_kernels")

#: Every backend name the op knows, in order of preference on a CPU.
BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ENV_VAR = "QSTAR_BACKEND"
_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these inputs or in this build."""


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        logger.warning(msg)


def _why_not(backend: str, q: torch.Tensor) -> str | None:
    """None if ``backend`` can run on tensors like ``q``, else the reason it cannot."""
    head_dim = int(q.shape[-1]) if q.dim() == 4 else 0
    return _unavailable(backend, q.device.type, q.dtype, head_dim) or None


@torch.compiler.assume_constant_result
def _unavailable(backend: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The reason ``backend`` cannot run on such tensors, or the empty string if it can. A constant
    to torch.compile, which then never traces the probes (imports, environment) behind it."""
    if backend in ("reference", "torch"):
        return ""
    if backend == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got tensors on {device_type}"
        if _ext.cpu_extension() is None:
            return (
                "the C++ CPU extension qstar_kernels._C is not built or does not import "
                f"({_ext.cpu_extension_error()}); reinstall with `pip install -e . --no-build-isolation`"
            )
        return ""
    if backend == "triton":
        return _triton_backend.unavailable_reason(device_type, dtype, head_dim) or ""
    if backend == "cuda":
        return _cuda_backend.unavailable_reason(device_type, dtype, head_dim) or ""
    raise AssertionError(backend)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this installation."""
    probe = torch.empty(0, device=device)
    return [b for b in BACKENDS if _why_not(b, probe) is None]


def _check_backend_name(backend, origin: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{origin} must be one of {BACKENDS} (or None for automatic), got {backend!r}")
    return backend


def _select_backend(backend: str | None, q: torch.Tensor) -> str:
    if backend is not None:
        backend = _check_backend_name(backend, "backend")
        reason = _why_not(backend, q)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot run: {reason}")
        return backend
    env = os.environ.get(_ENV_VAR)
    if env:
        env = _check_backend_name(env, f"the environment variable {_ENV_VAR}")
        reason = _why_not(env, q)
        if reason is not None:
            raise BackendUnavailableError(f"{_ENV_VAR}={env!r} cannot run: {reason}")
        return env
    if q.device.type == "cpu":
        reason = _why_not("cpu", q)
        if reason is None:
            return "cpu"
        _warn_once(
            "cpu-fallback",
            f"qstar_kernels.thought_attention: falling back to the slower 'torch' backend: {reason}",
        )
        return "torch"
    reason = _why_not("triton", q)
    if reason is None:
        return "triton"
    _warn_once(
        f"no-fused-{q.device.type}",
        f"qstar_kernels.thought_attention: no fused kernel for these {q.device.type} tensors ({reason}); "
        "using the slower structured 'torch' backend",
    )
    return "torch"


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _validate(q, k, v, key_padding_mask, scale, sliding_window, return_lse):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            shape = "(B, Hq, L, D)" if name == "q" else "(B, Hkv, (a+1)*L, D)"
            raise ValueError(f"{name} must be 4-D {shape}, got {t.dim()}-D with shape {_shape(t)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must have a floating dtype in {[str(d) for d in _SUPPORTED_DTYPES]}, got {t.dtype}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    B, Hq, L, D = q.shape
    if Hq < 1 or L < 1 or D < 1:
        raise ValueError(f"q must have Hq >= 1, L >= 1 and D >= 1, got shape {_shape(q)} (B, Hq, L, D)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size must equal q's B={B}, got k shape {_shape(k)}")
    if k.shape[3] != D:
        raise ValueError(f"k/v head dim must equal q's D={D}, got k shape {_shape(k)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"the query heads Hq={Hq} must be a positive multiple of the key/value heads Hkv={Hkv} "
            f"(q shape {_shape(q)}, k shape {_shape(k)})"
        )
    if Lk < L or Lk % L != 0:
        raise ValueError(
            f"the key length must be (a+1)*L for an integer a >= 0 with L={L} (q.shape[2]), "
            f"got k.shape[2]={Lk}"
        )
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool and (m.dtype.is_floating_point or m.dtype.is_complex):
            raise TypeError(
                f"key_padding_mask must be bool (True = real token) or an integer 0/1 tensor, got {m.dtype}"
            )
        if m.dim() != 2 or m.shape[0] != B or m.shape[1] != L:
            raise ValueError(f"key_padding_mask must have shape (B={B}, L={L}), got {_shape(m)}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device} like q, got {m.device}")
    if scale is not None:
        scale = _as_float("scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    if sliding_window is not None:
        sliding_window = _as_int("sliding_window", sliding_window)
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return scale, sliding_window


def _as_float(name: str, x) -> float:
    """Python/NumPy real numbers and 0-d real tensors."""
    reject_non_number(name, x, "None or a real number")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be None or a real number, got {type(x).__name__} {x!r}") from None


def _as_int(name: str, x) -> int:
    """Python/NumPy integers and 0-d integer tensors."""
    reject_non_number(name, x, "None or an int")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be None or an int, got {type(x).__name__} {x!r}") from None


def thought_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Quiet-STaR thought attention: causal over the text block plus one diagonal per thought step.

    Query ``i`` sees text key ``j`` iff ``j <= i``, ``keep[b, j]`` and (with a window ``W``)
    ``i - j < W``; and key ``i`` of each of the ``a`` thought blocks iff ``keep[b, i]``. Query head
    ``h`` reads key/value head ``h // (Hq // Hkv)`` (no ``repeat_kv`` copies).

    Args:
        q: ``(B, Hq, L, D)`` queries of the current step.
        k, v: ``(B, Hkv, (a+1)*L, D)`` keys/values: the text block, then one block per step.
        key_padding_mask: optional ``(B, L)``, True (or 1) for real tokens.
        scale: softmax scale, default ``1/sqrt(D)``.
        sliding_window: optional window ``W`` on the text block (``i - j < W``).
        return_lse: also return the ``(B, Hq, L)`` float32 log-sum-exp (``-inf`` on rows that
            see nothing; float64 for float64 inputs). It is differentiable.
        backend: ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``, or None to choose
            by device (``"cpu"`` for CPU tensors, ``"triton"`` for CUDA tensors; the ``QSTAR_BACKEND``
            environment variable overrides the automatic choice). ``"cuda"`` (the kernels of
            ``csrc/cuda``, head dims 64 and 128) is chosen only explicitly.

    Returns:
        ``out`` ``(B, Hq, L, D)`` in ``q.dtype``, or ``(out, lse)`` with ``return_lse=True``.
        Rows with nothing to attend to (left padding) give zeros, zero gradients and ``lse=-inf``.
    """
    scale, sliding_window = _validate(q, k, v, key_padding_mask, scale, sliding_window, return_lse)
    chosen = _select_backend(backend, q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    kwargs = dict(key_padding_mask=keep, scale=scale, sliding_window=sliding_window, return_lse=return_lse)
    if chosen == "reference":
        return thought_attention_reference(q, k, v, **kwargs)
    if chosen == "torch":
        return _torch_backend.thought_attention_torch(q, k, v, **kwargs)
    if chosen == "cpu":
        return _cpu_backend.thought_attention_cpu(q, k, v, **kwargs)
    if chosen == "triton":
        return _triton_backend.thought_attention_triton(q, k, v, **kwargs)
    if chosen == "cuda":
        return _cuda_backend.thought_attention_cuda(q, k, v, **kwargs)
    raise AssertionError(chosen)
