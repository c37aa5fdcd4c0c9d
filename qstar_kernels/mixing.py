"""``mixed_token_logprobs``: the mixing head, the LM head, the log-softmax and the target gather,
fused (``kernels.md`` section 2, ``quietstar.md`` section 6).

Shapes::

    h_base, h_thought: (N, H)     w: (N,) or (N, 1), unbounded     weight: (V, H), the LM head
    target: (N,) int64, ignore_index marks rows without a target
    logp:   (N,) float32 (float64 for float64 inputs), 0 at ignored rows
"""

from __future__ import annotations

import torch

from . import _lm_head_dispatch as _d
from .backends.lm_head_chunked import MixedTokenLogprobs
from .reference import mixed_token_logprobs_reference

__all__ = ["mixed_token_logprobs"]

_INDEX_DTYPES = (torch.int64, torch.int32)


def _validate(h_base, h_thought, w, weight, target, ignore_index, backend):
    _d.check_matrix("h_base", h_base, "(N, H)")
    N, H = h_base.shape
    if H < 1:
        raise ValueError(f"h_base must have H >= 1 features, got shape {_d.shape_of(h_base)}")
    if h_thought is None:
        if w is not None:
            raise ValueError(
                "w must be None when h_thought is None (plain log-probabilities of h_base), "
                f"got a {type(w).__name__}"
            )
    else:
        _d.check_matrix("h_thought", h_thought, "(N, H)")
        if h_thought.shape != h_base.shape:
            raise ValueError(
                f"h_thought must have h_base's shape {_d.shape_of(h_base)} (N, H), "
                f"got {_d.shape_of(h_thought)}"
            )
        _d.check_same("h_thought", h_thought, "h_base", h_base)
        if w is None:
            raise ValueError("w must be a (N,) or (N, 1) tensor when h_thought is given, got None")
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a torch.Tensor of shape (N,) or (N, 1), got {type(w).__name__}")
        if w.dtype not in _d.SUPPORTED_DTYPES:
            raise TypeError(
                f"w must have a floating dtype in {[str(d) for d in _d.SUPPORTED_DTYPES]}, got {w.dtype}"
            )
        if w.shape not in ((N,), (N, 1)):
            raise ValueError(f"w must have shape (N,) or (N, 1) with N={N}, got {_d.shape_of(w)}")
        _d.check_same("w", w, "h_base", h_base, dtype=False)
    _d.check_matrix("weight", weight, "(V, H)")
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (V, H) with V >= 1 and H={H} (h_base.shape[1]), "
            f"got {_d.shape_of(weight)}"
        )
    _d.check_same("weight", weight, "h_base", h_base)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of shape (N,), got {type(target).__name__}")
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"target must have an integer dtype (torch.int64 or torch.int32), got {target.dtype}")
    if target.shape != (N,):
        raise ValueError(
            f"target must have shape (N,) with N={N} (h_base.shape[0]), got {_d.shape_of(target)}"
        )
    _d.check_same("target", target, "h_base", h_base, dtype=False)
    ignore_index = _d.as_int("ignore_index", ignore_index)
    _d.check_backend_arg(backend)
    V = weight.shape[0]
    if N:
        bad = ((target < 0) | (target >= V)) & (target != ignore_index)
        if bool(bad.any()):
            first = int(target[bad.nonzero()[0, 0]])
            raise ValueError(
                f"target values must be in [0, V={V}) or equal ignore_index={ignore_index}, got {first}"
            )
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
    head equals mixing the logits (``quietstar.md`` section 6).

    Args:
        h_base: ``(N, H)`` hidden states of the base (no-thought) pass.
        h_thought: ``(N, H)`` hidden states after the thought, or None for the plain
            log-probabilities of ``h_base`` (then ``w`` must be None too).
        w: ``(N,)`` or ``(N, 1)`` mixing weights, unbounded (any floating dtype).
        weight: ``(V, H)`` LM-head weight, the dtype of ``h_base``.
        target: ``(N,)`` int64 (or int32) ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: the target value of rows without a target.
        backend: ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or None (by
            device; see :mod:`qstar_kernels._lm_head_dispatch` for the environment variables).

    Returns:
        ``(N,)`` float32 (float64 for float64 inputs) log-probabilities, differentiable in
        ``h_base``, ``h_thought``, ``w`` and ``weight``. The fused backends compute the backward
        from recomputed logit tiles (first order only; ``reference`` supports higher orders).
    """
    ignore_index = _validate(h_base, h_thought, w, weight, target, ignore_index, backend)
    chosen = _d.select_backend("mixed_token_logprobs", backend, h_base.device, h_base.dtype)
    target = target.to(torch.int64)
    if chosen == "reference":
        return mixed_token_logprobs_reference(h_base, h_thought, w, weight, target, ignore_index=ignore_index)
    return MixedTokenLogprobs.apply(
        h_base, h_thought, w, weight, target, ignore_index, lm_head_passes(chosen)
    )


def lm_head_passes(name: str):
    """The passes of a fused backend (shared with sampling)."""
    if name == "torch":
        from .backends.lm_head_torch import TorchPasses

        return TorchPasses()
    if name == "cpu":
        from .backends.lm_head_cpu import CpuPasses

        return CpuPasses()
    if name == "triton":
        from .backends.lm_head_triton import TritonPasses

        return TritonPasses()
    if name == "cuda":
        from .backends.lm_head_cuda import CudaPasses

        return CudaPasses()
    raise AssertionError(name)
