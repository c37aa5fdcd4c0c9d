"""Quiet-STaR, the method: config, model wrapper, training loop, generation and evaluation.

This package builds on the public ops of :mod:`qstar_kernels` and never names a backend.
The training loop, generation and evaluation land in later work; for now it exposes the
attention op the rollout will use.
"""

from qstar_kernels import thought_attention

__all__ = ["thought_attention"]
__version__ = "0.1.0"
