"""Quiet-STaR thought attention for Hugging Face causal LMs, in one call.

    from qstar_kernels.hf import apply_qstar_kernels_to_mistral, cache_keyword, thought_step

    apply_qstar_kernels_to_mistral(model)          # or apply_qstar_kernels(model) for any architecture
    with thought_step(key_padding_mask=keep, step=a):
        out = model(inputs_embeds=..., position_ids=pos + a, **{cache_keyword(model): cache}, use_cache=True)

``cache_keyword(model)`` is ``"cache"`` on the transformers releases that renamed the keyword and
``"past_key_values"`` on the older ones (both take the same ``DynamicCache``).

Ordinary forwards, training and ``generate`` are unchanged; inside ``thought_step`` the attention is
:func:`qstar_kernels.thought_attention` and no dense mask is built. ``revert_qstar_kernels()`` undoes
every patch. Supported: transformers >= 4.53, < 6 (``pip install 'qstar-kernels[hf]'``).

Importing this package does not import transformers; the ``apply_*`` calls do, and check its version.
"""

from ._compat import (
    SUPPORTED_RANGE,
    UnsupportedTransformersError,
    cache_keyword,
    check_transformers_version,
)
from .attention import DENSE_MASK_FALLBACK_MESSAGE
from .patch import (
    ATTN_IMPLEMENTATION,
    apply_qstar_kernels,
    apply_qstar_kernels_to_llama,
    apply_qstar_kernels_to_mistral,
    apply_qstar_kernels_to_qwen2,
    is_patched,
    patched_model_types,
    revert_qstar_kernels,
)
from .thought import ThoughtStep, active_thought_step, thought_step

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DENSE_MASK_FALLBACK_MESSAGE",
    "SUPPORTED_RANGE",
    "ThoughtStep",
    "UnsupportedTransformersError",
    "active_thought_step",
    "apply_qstar_kernels",
    "apply_qstar_kernels_to_llama",
    "apply_qstar_kernels_to_mistral",
    "apply_qstar_kernels_to_qwen2",
    "cache_keyword",
    "check_transformers_version",
    "is_patched",
    "patched_model_types",
    "revert_qstar_kernels",
    "thought_step",
]
