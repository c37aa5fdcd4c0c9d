"""Mixed LM-head log-probabilities, the executable specification (``docs/kernels.md``,
"Contract: mixed LM-head log-probabilities").

The mixing head of Quiet-STaR (``docs/algorithm.md``, "The mixing head") interpolates hidden
states, then applies the bias-free LM head::

    h_mix  = (1 - w) * h_base + w * h_thought          # w unbounded, one scalar per row
    logits = h_mix @ weight.T                           # (N, V): materialised here, on purpose
    logp   = log_softmax(logits)[target]                # 0 where target == ignore_index

Dense and slow by design; every fused backend is tested against it.
"""

from __future__ import annotations

import torch

__all__ = ["mixed_token_logprobs_reference"]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixed_token_logprobs_reference(
    h_base: torch.Tensor,
    h_thought: torch.Tensor | None,
    w: torch.Tensor | None,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``(N,)`` log-probabilities of ``target`` under the mixed LM head; float32 math (float64 for
    float64 inputs). ``h_thought=None`` (with ``w=None``) gives the plain log-probabilities of
    ``h_base``. Differentiable through autograd, to any order."""
    dtype = _math_dtype(h_base.dtype)
    h = h_base.to(dtype)
    if h_thought is not None:
        w = w.to(dtype).reshape(-1, 1)  # (N, 1)
        h = (1 - w) * h + w * h_thought.to(dtype)
    logits = h @ weight.to(dtype).T  # (N, V)
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, V)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    picked = logp_all.gather(1, safe[:, None])[:, 0]
    return torch.where(keep, picked, torch.zeros_like(picked))
