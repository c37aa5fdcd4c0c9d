"""The mixing head: how a thought's state and the base state become one prediction.

Quiet-STaR predicts the next token from ``(1 - w) h_base + w h_thought``, where the weight
``w = head([h_base ; h_thought])`` comes from a small MLP (``docs/algorithm.md``, "The mixing head").
This module holds that head and the one definition of the mixed state and its logits, shared by the
training forward (:mod:`qstar.model`) and generation (:mod:`qstar.generation`), so the two agree to
the last bit given the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuietStarConfig

__all__ = ["build_mixing_head", "init_mixing_head", "mix_hidden", "mixed_logits"]


def mix_hidden(h_base: torch.Tensor, h_thought: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(1 - w) * h_base + w * h_thought`` in float32, float64 for float64 states (``w`` has one
    entry per row: ``(..., 1)``).

    The one definition of the mixed state shared by the forward's ``logits`` and generation, so the
    two agree to the last bit given the same inputs (the fused kernel mixes in float32 too:
    ``docs/kernels.md``, "Contract: mixed LM-head log-probabilities").
    """
    dtype = torch.float64 if h_base.dtype == torch.float64 else torch.float32
    w = w.to(dtype)
    return (1 - w) * h_base.to(dtype) + w * h_thought.to(dtype)


def mixed_logits(mixed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``mixed @ weight.T`` of a mixed state, float32 (float64 for a float64 model). The
    matmul runs in the weight's dtype: no float32 copy of a bf16 LM head."""
    out = F.linear(mixed.to(weight.dtype), weight)
    return out if out.dtype == torch.float64 else out.float()


def build_mixing_head(hidden_size: int, config: QuietStarConfig) -> nn.Sequential:
    """The mixing head on ``[h_base ; h_thought]``: Linear(2H, W), ReLU, ..., Linear(W, 1, no bias).

    With the default 3 layers this is the authors' head (``talk_head[0]``): the state-dict keys
    ``0.weight, 0.bias, 2.weight, 2.bias, 4.weight`` match theirs.
    """
    width = config.mixing_head_hidden_size or hidden_size
    layers: list[nn.Module] = []
    fan_in = 2 * hidden_size
    for _ in range(config.mixing_head_layers - 1):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1, bias=False))
    return nn.Sequential(*layers)


def init_mixing_head(head: nn.Sequential, std: float, zero_last: bool) -> None:
    """HF's ``_init_weights`` for the hidden layers (N(0, std), bias 0); the last layer zero when
    ``zero_last`` (then ``w = 0`` at the start: the model begins as the base model)."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin in linears:
            lin.weight.normal_(0.0, std)
            if lin.bias is not None:
                lin.bias.zero_()
        if zero_last:
            linears[-1].weight.zero_()
