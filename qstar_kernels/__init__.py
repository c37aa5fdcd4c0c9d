"""qstar-kernels: fused kernels for Quiet-STaR.

Public ops:
    thought_attention(q, k, v, *, key_padding_mask=None, scale=None, sliding_window=None,
                      return_lse=False, backend=None)

Dense masks for callers that need them: build_thought_mask, build_additive_thought_mask.
The dense references live in :mod:`qstar_kernels.reference`.
"""

from . import reference
from .attention import BACKENDS, BackendUnavailableError, available_backends, thought_attention
from .masks import build_additive_thought_mask, build_thought_mask

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "build_additive_thought_mask",
    "build_thought_mask",
    "reference",
    "thought_attention",
]
