"""``mixed_token_logprobs``: the mixing head, the LM head, the log-softmax and the target gather,
fused (``docs/kernels.md``, "Contract: mixed LM-head log-probabilities"; ``docs/algorithm.md``,
"The mixing head"). The backend comes from :mod:`qstar_kernels.dispatch`; the fused backends run
the tiled algorithm behind the custom op ``qstar::mixed_token_logprobs_fwd``.

Shapes::

    h_base, h_thought: (N, H)     w: (N,) or (N, 1), unbounded     weight: (V, H), the LM head
    target: (N,) int64, ignore_index marks rows without a target
    logp:   (N,) float32 (float64 for float64 inputs), 0 at ignored rows
"""

from __future__ import annotations

import torch

from . import _checks as _c
from . import custom_ops, dispatch
from .reference import mixed_token_logprobs_reference

__all__ = ["mixed_token_logprobs"]


def _validate(h_base, h_thought, w, weight, target, ignore_index, backend):
    _c.check_matrix("h_base", h_base, "(N, H)")
    N, H = h_base.shape
    if H < 1:
        raise ValueError(f"h_base must have H >= 1 features, got shape {_c.shape_of(h_base)}")
    if h_thought is None:
        if w is not None:
            raise ValueError(
                "w must be None when h_thought is None (plain log-probabilities of h_base), "
                f"got a {type(w).__name__}"
            )
    else:
        _c.check_matrix("h_thought", h_thought, "(N, H)")
        if h_thought.shape != h_base.shape:
            raise ValueError(
                f"h_thought must have h_base's shape {_c.shape_of(h_base)} (N, H), "
                f"got {_c.shape_of(h_thought)}"
            )
        _c.check_same("h_thought", h_thought, "h_base", h_base)
        if w is None:
            raise ValueError("w must be a (N,) or (N, 1) tensor when h_thought is given, got None")
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a torch.Tensor of shape (N,) or (N, 1), got {type(w).__name__}")
        _c.check_floating("w", w)
        if w.shape not in ((N,), (N, 1)):
            raise ValueError(f"w must have shape (N,) or (N, 1) with N={N}, got {_c.shape_of(w)}")
        _c.check_same("w", w, "h_base", h_base, dtype=False)
    _c.check_matrix("weight", weight, "(V, H)")
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (V, H) with V >= 1 and H={H} (h_base.shape[1]), "
            f"got {_c.shape_of(weight)}"
        )
    _c.check_same("weight", weight, "h_base", h_base)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of shape (N,), got {type(target).__name__}")
    if target.dtype not in _c.INDEX_DTYPES:
        raise TypeError(f"target must have an integer dtype (torch.int64 or torch.int32), got {target.dtype}")
    if target.shape != (N,):
        raise ValueError(
            f"target must have shape (N,) with N={N} (h_base.shape[0]), got {_c.shape_of(target)}"
        )
    _c.check_same("target", target, "h_base", h_base, dtype=False)
    ignore_index = _c.as_int("ignore_index", ignore_index)
    _c.check_backend_arg(backend)
    # The target values are checked where the work starts (check_target_values), once.
    return ignore_index


def mixed_token_logprobs(
    h_base: torch.Tensor,
    h_thought: torch.Tensor | None,
    w: torch.Tensor | None,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor:
    """Log-probabilities of ``target`` under the mixed LM head, without an ``(N, V)`` tensor.

    ``logp[i] = log_softmax(((1 - w[i]) * h_base[i] + w[i] * h_thought[i]) @ weight.T)[target[i]]``,
    and ``0`` where ``target[i] == ignore_index``. Mixing hidden states before the bias-free LM
    head equals mixing the logits (``docs/algorithm.md``, "The mixing head").

    Args:
        h_base: ``(N, H)`` hidden states of the base (no-thought) pass.
        h_thought: ``(N, H)`` hidden states after the thought, or None for the plain
            log-probabilities of ``h_base`` (then ``w`` must be None too).
        w: ``(N,)`` or ``(N, 1)`` mixing weights, unbounded (any floating dtype).
        weight: ``(V, H)`` LM-head weight, the dtype of ``h_base``.
        target: ``(N,)`` int64 (or int32) ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: the target value of rows without a target.
        backend: ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or None (by
            device; see :mod:`qstar_kernels.dispatch` for the environment variables).

    Returns:
        ``(N,)`` float32 (float64 for float64 inputs) log-probabilities, differentiable in
        ``h_base``, ``h_thought``, ``w`` and ``weight``. The fused backends compute the backward
        from recomputed logit tiles (first order only; ``reference`` supports higher orders).
    """
    ignore_index = _validate(h_base, h_thought, w, weight, target, ignore_index, backend)
    chosen = dispatch.select_backend("mixed_token_logprobs", backend, h_base.device, h_base.dtype)
    target = target.to(torch.int64)
    if chosen == "reference":
        _c.check_target_values(target, weight.shape[0], ignore_index)
        return mixed_token_logprobs_reference(h_base, h_thought, w, weight, target, ignore_index=ignore_index)
    logp, _ = custom_ops.mixed_token_logprobs_fwd(h_base, h_thought, w, weight, target, ignore_index, chosen)
    return logp
