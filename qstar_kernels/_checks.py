"""Argument checks shared by the public ops."""

from __future__ import annotations

import torch


def reject_non_number(name: str, x, what: str) -> None:
    """Reject what only looks like a number: bools (also NumPy's and 0-d bool tensors), strings,
    arrays or tensors with dimensions, complex values, and tensors that require grad (the ops are
    not differentiable in them, and a gradient would be dropped silently).

    ``what`` completes the message "``name`` must be ...", e.g. "None or a real number".
    """
    bad = isinstance(x, (bool, str, bytes)) or type(x).__name__ == "bool_"
    if isinstance(x, torch.Tensor):
        bad = bad or x.dim() != 0 or x.dtype == torch.bool or x.is_complex() or x.requires_grad
    elif getattr(x, "ndim", 0) != 0 or getattr(getattr(x, "dtype", None), "kind", "") in ("b", "c"):
        bad = True
    if bad:
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}")
