"""Argument checks shared by the public ops: one set of supported dtypes, one way to read a number
from an argument, one way to describe a shape. Every message names the argument, what was expected
and what was given."""

from __future__ import annotations

import math
import operator

import torch

#: The floating dtypes every op accepts (a backend may support fewer: see :mod:`qstar_kernels.dispatch`).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The dtypes of target ids and banned ids.
INDEX_DTYPES = (torch.int64, torch.int32)


def shape_of(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def dtype_names() -> list[str]:
    return [str(d) for d in SUPPORTED_DTYPES]


def reject_non_number(name: str, x, what: str) -> None:
    """Reject what only looks like a number: bools (also NumPy's and 0-d bool tensors), strings,
    arrays or tensors with dimensions, complex values, and tensors that require grad (the ops are
    not differentiable in them, and a gradient would be dropped silently).

    ``what`` completes the message "``name`` must be ...", e.g. "None or a real number".
    """
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return  # the common case
    bad = isinstance(x, (bool, str, bytes)) or type(x).__name__ == "bool_"
    if isinstance(x, torch.Tensor):
        bad = bad or x.dim() != 0 or x.dtype == torch.bool or x.is_complex() or x.requires_grad
    elif getattr(x, "ndim", 0) != 0 or getattr(getattr(x, "dtype", None), "kind", "") in ("b", "c"):
        bad = True
    if bad:
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}")


def as_float(name: str, x, what: str = "a real number", *, finite: bool = True) -> float:
    """Python/NumPy real numbers and 0-d real tensors; with ``finite``, NaN and infinities are
    refused too ("``name`` must be ``what`` (finite)")."""
    reject_non_number(name, x, what)
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}") from None
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be {what} (finite), got {value!r}")
    return value


def as_int(name: str, x, what: str = "an int") -> int:
    """Python/NumPy integers and 0-d integer tensors."""
    reject_non_number(name, x, what)
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}") from None


def check_floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {dtype_names()}, got {t.dtype}")


def check_matrix(name: str, t, what: str) -> None:
    """``t`` is a 2-D floating tensor ``what`` (e.g. "(N, H)")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {what}, got {t.dim()}-D with shape {shape_of(t)}")
    check_floating(name, t)


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype=True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def check_backend_arg(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__} {backend!r}")


# ------------------------------------------------------------------------------------------------
# Checks of values (they read the tensors): run once, where the op's work starts (inside the custom
# ops of the fused backends, so that a compiled graph has no data-dependent branch around them).
# ------------------------------------------------------------------------------------------------


def check_target_values(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target id is in ``[0, vocab)`` or equals ``ignore_index``."""
    if not target.numel():
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        first = int(target[bad.nonzero()[0, 0]])
        raise ValueError(
            f"target values must be in [0, V={vocab}) or equal ignore_index={ignore_index}, got {first}"
        )


def banned_id_set(banned: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
    """The banned ids as a sorted, duplicate-free int64 CPU tensor (None when there are none), after
    checking that each is in ``[0, vocab)`` and that they leave something to sample."""
    if banned is None or not banned.numel():
        return None
    banned = banned.detach().to("cpu", torch.int64).reshape(-1)
    lo, hi = int(banned.min()), int(banned.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"banned_ids must be in [0, V={vocab}), got {lo if lo < 0 else hi}")
    banned = torch.unique(banned)
    if banned.numel() >= vocab:
        raise ValueError(f"banned_ids bans all V={vocab} ids; nothing is left to sample")
    return banned
