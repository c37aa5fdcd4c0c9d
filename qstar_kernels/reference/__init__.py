"""Dense PyTorch references: the executable specifications every backend is tested against.

Slow by design and never optimised (``docs/kernels.md``, "Backends").
"""

from .attention import (
    build_additive_thought_mask,
    build_thought_mask,
    thought_attention_reference,
    thought_mask_mod,
)
from .mixing import mixed_token_logprobs_reference
from .sampling import sample_thought_tokens_reference, thought_gumbel_noise

__all__ = [
    "build_additive_thought_mask",
    "build_thought_mask",
    "mixed_token_logprobs_reference",
    "sample_thought_tokens_reference",
    "thought_attention_reference",
    "thought_gumbel_noise",
    "thought_mask_mod",
]
