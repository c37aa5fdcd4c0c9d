"""qstar-kernels: fused kernels for Quiet-STaR.

Public ops:
    thought_attention(q, k, v, *, key_padding_mask=None, scale=None, sliding_window=None,
                      return_lse=False, backend=None)
    mixed_token_logprobs(h_base, h_thought, w, weight, target, *, ignore_index=-100, backend=None)
    sample_thought_tokens(h, weight, *, banned_ids=None, temperature=1.0, logprob_temperature=3.0,
                          generator=None, backend=None)

Dense masks for callers that need them: build_thought_mask, build_additive_thought_mask.
The dense references live in :mod:`qstar_kernels.reference`. Which backend runs an op:
:mod:`qstar_kernels.dispatch`.
"""

from . import reference
from .attention import thought_attention
from .dispatch import (
    BACKENDS,
    LM_HEAD_BACKENDS,
    BackendUnavailableError,
    available_backends,
    available_lm_head_backends,
)
from .masks import build_additive_thought_mask, build_thought_mask
from .mixing import mixed_token_logprobs
from .sampling import draw_sampling_seed, sample_thought_tokens

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "LM_HEAD_BACKENDS",
    "available_backends",
    "available_lm_head_backends",
    "build_additive_thought_mask",
    "build_thought_mask",
    "draw_sampling_seed",
    "mixed_token_logprobs",
    "reference",
    "sample_thought_tokens",
    "thought_attention",
]
