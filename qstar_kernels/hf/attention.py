"""The attention and mask functions that a patched model's layers call through transformers'
``AttentionInterface`` / ``AttentionMaskInterface``.

Outside a ``thought_step`` block both functions hand every argument, unchanged, to the functions
registered for ``"sdpa"`` when the patch was applied, so an ordinary forward, training step or
``generate`` computes exactly what the unpatched SDPA model computes. Inside a block:

* the mask function returns None: no mask of any kind is built;
* the attention function checks what it was given against the thought-step contract and calls
  :func:`qstar_kernels.thought_attention` with the block's key padding mask, the layer's ``scaling``
  and its ``sliding_window`` (the window applies to the text block, ``i - j < W``, which is how
  transformers >= 4.53 defines it too).

The authors' dense mask. A caller who builds the dense ``(B, 1, L, (a+1)L)`` thought mask and passes
it as ``attention_mask`` (outside a block) gets the same answer as the unpatched model: the mask is
handed to SDPA unchanged. That is the slow path, and the first time it happens a warning says so. The
masks that transformers built itself (ordinary forwards, ``generate``) are recognised and never
warned about.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..attention import thought_attention
from ..dispatch import warn_once
from .thought import ThoughtStep, active_thought_step

__all__ = ["make_attention_function", "make_mask_function", "DENSE_MASK_FALLBACK_MESSAGE"]

#: Keyword arguments that change the attention math in ways thought attention does not implement.
_UNSUPPORTED_FEATURES = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "cu_seq_lens_q": "packed sequences (cu_seq_lens_q)",
    "cu_seq_lens_k": "packed sequences (cu_seq_lens_k)",
    "head_mask": "a head mask",
}

DENSE_MASK_FALLBACK_MESSAGE = (
    "qstar_kernels.hf: a dense 4-D attention_mask of shape {shape} ({L} queries, {Lk} = {n} x {L} keys) "
    "was passed to a patched model outside a thought_step block. It looks like the authors' dense "
    "Quiet-STaR thought mask, so it is handed to SDPA unchanged: the result is right, but this is the "
    "slow path (the mask costs O(L^2 a) memory and SDPA attends over all (a+1)L keys). For the fused "
    "kernel, drop attention_mask and wrap the forward in "
    "qstar_kernels.hf.thought_step(key_padding_mask=<the (B, L) text mask>, step=a). "
    "(This warning is shown once per process.)"
)

# Masks that a patched mask function built, by id (the values are weak, so nothing is kept alive).
_BUILT_MASKS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _remember(mask) -> None:
    if isinstance(mask, torch.Tensor):
        _BUILT_MASKS[id(mask)] = mask


def _built_by_transformers(mask: torch.Tensor) -> bool:
    return _BUILT_MASKS.get(id(mask)) is mask


def make_mask_function(delegate: Callable) -> Callable:
    """A mask function for ``AttentionMaskInterface``: ``delegate`` outside a thought step, None inside."""

    def qstar_mask(*args, **kwargs):
        if active_thought_step() is not None:
            attention_mask = kwargs.get("attention_mask")
            if attention_mask is not None:
                raise ValueError(
                    "qstar_kernels.hf: inside a thought_step block call the model with attention_mask=None; "
                    "the text's padding goes to thought_step(key_padding_mask=...) as a (B, L) mask. "
                    f"Got an attention_mask of shape {tuple(attention_mask.shape)}"
                )
            return None
        mask = delegate(*args, **kwargs)
        _remember(mask)
        return mask

    qstar_mask.__qualname__ = qstar_mask.__name__ = "qstar_sdpa_mask"
    qstar_mask._qstar_delegate = delegate
    return qstar_mask


def make_attention_function(delegate: Callable, in_scope: Callable[[torch.nn.Module], bool]) -> Callable:
    """An attention function for ``AttentionInterface``.

    ``delegate`` (transformers' SDPA function) runs every ordinary forward. ``in_scope(module)`` says
    whether the layer belongs to a patched model; a thought step on a layer that is not raises.
    """

    def qstar_attention(module, query, key, value, attention_mask, **kwargs):
        step = active_thought_step()
        if step is None:
            if (
                isinstance(attention_mask, torch.Tensor)
                and attention_mask.dim() == 4
                and not _built_by_transformers(attention_mask)
                and in_scope(module)
            ):
                _note_custom_mask(attention_mask)
            return delegate(module, query, key, value, attention_mask, **kwargs)
        if not in_scope(module):
            cfg = getattr(module, "config", None)
            raise RuntimeError(
                f"qstar_kernels.hf: a thought_step block reached the attention layer {type(module).__name__} "
                f"(model_type {getattr(cfg, 'model_type', None)!r}) of a model that is not patched. Patch "
                "it with qstar_kernels.hf.apply_qstar_kernels(model)"
            )
        return _thought_forward(step, module, query, key, value, attention_mask, **kwargs)

    qstar_attention.__qualname__ = qstar_attention.__name__ = "qstar_sdpa_attention"
    qstar_attention._qstar_delegate = delegate
    return qstar_attention


def _note_custom_mask(mask: torch.Tensor) -> None:
    """A 4-D mask the caller built. Warn (once) when it has the shape of a dense thought mask."""
    L, Lk = mask.shape[-2], mask.shape[-1]
    if L > 1 and Lk >= 2 * L and Lk % L == 0:
        warn_once(
            "hf-dense-mask",
            DENSE_MASK_FALLBACK_MESSAGE.format(shape=tuple(mask.shape), L=L, Lk=Lk, n=Lk // L),
            stacklevel=3,
        )


def _thought_forward(state: ThoughtStep, module, query, key, value, attention_mask, **kwargs):
    """Thought attention for one layer. query (B, Hq, L, D); key/value (B, Hkv, (a+1)L, D)."""
    layer = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if attention_mask is not None:
        raise ValueError(
            f"qstar_kernels.hf: {layer} got an attention_mask of shape {tuple(attention_mask.shape)} inside "
            "a thought_step block. Pass either a dense mask (outside a block: the slow SDPA path) or the "
            "(B, L) key padding mask to thought_step (the fused path), not both"
        )
    if not getattr(module, "is_causal", True):
        raise ValueError(f"qstar_kernels.hf: {layer} is not causal; thought attention needs a causal decoder")
    dropout = kwargs.get("dropout", 0.0) or 0.0
    if dropout > 0.0:
        raise ValueError(
            f"qstar_kernels.hf: {layer} asks for attention dropout p={dropout} (config.attention_dropout in "
            "training mode), which thought attention does not implement. Set "
            "model.config.attention_dropout = 0.0 (and the layers' attention_dropout), or run the "
            "thought steps in eval mode"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            "qstar_kernels.hf: output_attentions=True is not supported inside a thought_step block: thought "
            "attention never forms the attention matrix. Leave it False there"
        )
    for name, what in _UNSUPPORTED_FEATURES.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"qstar_kernels.hf: {layer} passes {name}= ({what}), which thought attention does not "
                "implement; this architecture cannot run thought steps through the patch"
            )

    B, Hq, L, D = query.shape
    Lk = key.shape[2]
    keep = state.keep_on(query.device)
    if keep is not None and tuple(keep.shape) != (B, L):
        raise ValueError(
            f"qstar_kernels.hf: thought_step(key_padding_mask=...) has shape {tuple(keep.shape)}, but the "
            f"forward has batch {B} and {L} new tokens per row: the mask must be (B, L) = ({B}, {L}) of the "
            "text, and every thought step feeds exactly one new token per text position"
        )
    if Lk % L != 0 or (state.step is not None and Lk != (state.step + 1) * L):
        want = (
            f"{(state.step + 1) * L} = (step {state.step} + 1) x L" if state.step is not None else "(a+1) x L"
        )
        raise ValueError(
            f"qstar_kernels.hf: {layer} sees {Lk} keys with L = {L} new tokens; a thought step needs {want} "
            "keys: the text block plus one block of L per earlier step. Pass the DynamicCache of the "
            "previous steps as the cache (past_key_values=, or cache= where transformers renamed it: see "
            "qstar_kernels.hf.cache_keyword) with use_cache=True. A cache with sliding-window layers (the "
            "model's own DynamicCache(config=...) when config.sliding_window is set) drops old keys: create "
            "the cache with DynamicCache() instead"
        )
    if not query.dtype == key.dtype == value.dtype:
        # Under torch.autocast, RoPE (float32 cos/sin) promotes q and k back to float32 while v stays
        # in the autocast dtype; SDPA would compute in the autocast dtype, and so does this.
        device_type = query.device.type
        dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else value.dtype
        )
        query, key, value = (t.to(dtype) for t in (query, key, value))
    window = kwargs.get("sliding_window")
    if window is not None and window <= 0:
        window = None
    out = thought_attention(
        query, key, value, key_padding_mask=keep, scale=kwargs.get("scaling"), sliding_window=window
    )  # (B, Hq, L, D)
    state.calls += 1
    return out.transpose(1, 2).contiguous(), None  # (B, L, Hq, D), no attention weights
