"""Dense PyTorch references: the executable specifications every backend is tested against.

Slow by design and never optimised (``kernels.md`` section 4).
"""

from .attention import (
    build_additive_thought_mask,
    build_thought_mask,
    thought_attention_reference,
    thought_mask_mod,
)

__all__ = [
    "build_additive_thought_mask",
    "build_thought_mask",
    "thought_attention_reference",
    "thought_mask_mod",
]
