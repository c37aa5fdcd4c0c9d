"""One-call patches for Hugging Face causal LMs, and their undo.

Two ways, both through transformers' registries (``AttentionInterface`` and
``AttentionMaskInterface``), never by rebinding a module's globals or a class's methods:

* **An instance** (``apply_qstar_kernels(model)``, or ``apply_qstar_kernels_to_mistral(model)``):
  the attention function and the mask function are registered under the name ``"qstar_sdpa"`` and
  the model is switched to it (``set_attn_implementation`` on 5.x, its configs on 4.53). Nothing
  else in the process changes. Its original implementation is remembered and restored on revert.
* **An architecture** (``apply_qstar_kernels_to_mistral()`` without a model): the functions
  registered for ``"sdpa"`` (transformers' default) are wrapped, and the wrappers act for layers
  whose ``config.model_type`` was patched (here ``"mistral"``). So every Mistral model that uses SDPA
  attention goes through qstar_kernels: the ones created afterwards, and also those that already
  exist. Models of other architectures, and models loaded with another implementation (``"eager"``,
  flash attention), are not touched.

In both cases an ordinary forward calls transformers' own SDPA function with the same arguments, so
it is unchanged; only a forward inside :func:`qstar_kernels.hf.thought_step` takes the fused path.

``revert_qstar_kernels()`` undoes everything: instances get their implementation back, ``"sdpa"``
gets its original functions back, and ``"qstar_sdpa"`` leaves both registries.
"""

from __future__ import annotations

import logging
import threading
import weakref

from ._compat import (
    check_transformers_version,
    set_attn_implementation,
    uses_attention_interface,
)
from .attention import make_attention_function, make_mask_function

logger = logging.getLogger("qstar_kernels.hf")

__all__ = [
    "ATTN_IMPLEMENTATION",
    "apply_qstar_kernels",
    "apply_qstar_kernels_to_mistral",
    "apply_qstar_kernels_to_llama",
    "apply_qstar_kernels_to_qwen2",
    "revert_qstar_kernels",
    "is_patched",
    "patched_model_types",
]

#: The name the patched instances use in ``AttentionInterface`` / ``AttentionMaskInterface``.
ATTN_IMPLEMENTATION = "qstar_sdpa"

_lock = threading.RLock()
# The functions registered for "sdpa" before this module touched anything (captured once).
_originals: dict[str, object] = {}
# Patched instances -> their attention implementation before the patch.
_instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model_type values whose SDPA layers the global "sdpa" wrappers act for.
_global_types: set[str] = set()
_global_wrappers: dict[str, object] = {}


def _interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionInterface, AttentionMaskInterface


def _capture_originals() -> None:
    if _originals:
        return
    attn_iface, mask_iface = _interfaces()
    _originals["attention"] = attn_iface._global_mapping["sdpa"]
    _originals["mask"] = mask_iface._global_mapping["sdpa"]


def _register_instance_name() -> None:
    attn_iface, mask_iface = _interfaces()
    if attn_iface._global_mapping.get(ATTN_IMPLEMENTATION) is None:
        attn_iface.register(
            ATTN_IMPLEMENTATION, make_attention_function(_originals["attention"], lambda module: True)
        )
    if mask_iface._global_mapping.get(ATTN_IMPLEMENTATION) is None:
        mask_iface.register(ATTN_IMPLEMENTATION, make_mask_function(_originals["mask"]))


def _check_model(model, fn_name: str):
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"{fn_name}: model must be a transformers PreTrainedModel (e.g. MistralForCausalLM), "
            f"got {type(model).__name__}"
        )
    cls = type(model)
    if not uses_attention_interface(cls):
        raise ValueError(
            f"{fn_name}: {cls.__name__} does not dispatch its attention through transformers' "
            "AttentionInterface, so it cannot be patched"
        )
    if not getattr(model, "_supports_sdpa", False):
        raise ValueError(
            f"{fn_name}: {cls.__name__} does not support SDPA attention (_supports_sdpa is False); the patch "
            "runs ordinary forwards through SDPA"
        )
    if not any(getattr(m, "is_causal", None) is True for m in model.modules()):
        raise ValueError(
            f"{fn_name}: {cls.__name__} (model_type {getattr(model.config, 'model_type', None)!r}) has no "
            "causal attention layer; Quiet-STaR thought attention needs a causal decoder"
        )


def apply_qstar_kernels(model):
    """Patch one model instance of any architecture that uses the standard attention interface.

    Ordinary forwards are unchanged (transformers' SDPA function runs them; a model that used
    ``"eager"`` or flash attention now runs SDPA, and gets its implementation back on revert); a
    forward inside :func:`qstar_kernels.hf.thought_step` computes the thought pattern with
    :func:`qstar_kernels.thought_attention`. Calling it again on the same model does nothing.

    Returns the model.
    """
    check_transformers_version()
    _check_model(model, "apply_qstar_kernels")
    with _lock:
        current = model.config._attn_implementation
        if current == ATTN_IMPLEMENTATION:
            if model in _instances:
                return model
            current = "sdpa"  # set to our name by hand: SDPA is what it runs outside thought steps
        _capture_originals()
        _register_instance_name()
        if current != "sdpa":
            logger.info(
                "qstar_kernels.hf: %s used attn_implementation=%r; patched, its ordinary forwards run SDPA "
                "(revert_qstar_kernels restores %r)",
                type(model).__name__,
                current,
                current,
            )
        set_attn_implementation(model, ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"apply_qstar_kernels: transformers did not switch {type(model).__name__} to "
                f"{ATTN_IMPLEMENTATION!r} (it stayed {model.config._attn_implementation!r})"
            )
        _instances[model] = current
    return model


def _in_global_scope(module) -> bool:
    return getattr(getattr(module, "config", None), "model_type", None) in _global_types


def _install_global(model_type: str) -> None:
    attn_iface, mask_iface = _interfaces()
    with _lock:
        _capture_originals()
        if not _global_wrappers:
            _global_wrappers["attention"] = make_attention_function(_originals["attention"], _in_global_scope)
            _global_wrappers["mask"] = make_mask_function(_originals["mask"])
            attn_iface.register("sdpa", _global_wrappers["attention"])
            mask_iface.register("sdpa", _global_wrappers["mask"])
        _global_types.add(model_type)


def _apply_to(model_type: str, model, fn_name: str):
    check_transformers_version()
    if model is None:
        _install_global(model_type)
        return None
    found = getattr(getattr(model, "config", None), "model_type", None)
    if found != model_type:
        raise ValueError(
            f"{fn_name}: expected a model with model_type {model_type!r}, got {type(model).__name__} "
            f"(model_type {found!r}); use qstar_kernels.hf.apply_qstar_kernels(model) for any architecture"
        )
    return apply_qstar_kernels(model)


def apply_qstar_kernels_to_mistral(model=None):
    """Patch a Mistral model instance, or (without one) every Mistral model that uses SDPA attention.

    With ``model`` it is :func:`apply_qstar_kernels` plus a check that the model is a Mistral. Without,
    models created afterwards (and existing ones) with the default ``attn_implementation="sdpa"`` are
    patched. Returns the model (or None).
    """
    return _apply_to("mistral", model, "apply_qstar_kernels_to_mistral")


def apply_qstar_kernels_to_llama(model=None):
    """Like :func:`apply_qstar_kernels_to_mistral`, for Llama (``model_type "llama"``)."""
    return _apply_to("llama", model, "apply_qstar_kernels_to_llama")


def apply_qstar_kernels_to_qwen2(model=None):
    """Like :func:`apply_qstar_kernels_to_mistral`, for Qwen2 (``model_type "qwen2"``)."""
    return _apply_to("qwen2", model, "apply_qstar_kernels_to_qwen2")


def patched_model_types() -> frozenset[str]:
    """The model types patched without an instance (by the ``apply_qstar_kernels_to_*()`` calls)."""
    return frozenset(_global_types)


def is_patched(model) -> bool:
    """Whether ``model``'s thought steps would run the fused path (instance or architecture patch)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == ATTN_IMPLEMENTATION:
        return True
    return impl == "sdpa" and getattr(model.config, "model_type", None) in _global_types


def _revert_instance(model, original) -> None:
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        set_attn_implementation(model, original)


def revert_qstar_kernels(model=None) -> None:
    """Undo the patches.

    With ``model``: restore that instance's attention implementation (a model patched only through
    its architecture is left as it is: revert without an argument for that). Without: restore every
    patched instance still alive, give ``"sdpa"`` its original functions back, and remove
    ``"qstar_sdpa"`` from both registries.
    """
    with _lock:
        if model is not None:
            original = _instances.pop(model, None)
            if original is not None:
                _revert_instance(model, original)
            return
        for inst, original in list(_instances.items()):
            _revert_instance(inst, original)
        _instances.clear()
        if not _originals:
            return  # nothing was ever registered
        attn_iface, mask_iface = _interfaces()
        if _global_wrappers:
            for iface, kind in ((attn_iface, "attention"), (mask_iface, "mask")):
                if iface._global_mapping.get("sdpa") is _global_wrappers[kind]:
                    iface.register("sdpa", _originals[kind])
                else:
                    logger.warning(
                        "qstar_kernels.hf: the %s function registered for 'sdpa' was replaced after the "
                        "patch by %r; leaving it in place",
                        kind,
                        iface._global_mapping.get("sdpa"),
                    )
            _global_wrappers.clear()
        _global_types.clear()
        # GeneralInterface has register() but no unregister(): remove our key from the class mapping.
        attn_iface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
        mask_iface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
        _originals.clear()
