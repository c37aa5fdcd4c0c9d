"""The transformers versions this integration supports, and the few places where they differ.

Supported: ``transformers >= 4.53, < 6`` (the ``hf`` extra in ``pyproject.toml`` names the same
range; a test keeps the two equal). 4.53 is the first release whose models build their masks through
``masking_utils`` with an ``AttentionMaskInterface``, so one attention function and one mask function
serve every architecture that uses the standard attention interface.

What differs inside the range, and how it is handled here:

* ``PreTrainedModel.set_attn_implementation`` exists in 5.x only; on 4.53 the implementation name
  is set on the configs of the model and its sub-models, which is what the attention layers read.
* 5.x can tell whether a model class dispatches through ``AttentionInterface``
  (``_can_set_attn_implementation``); on 4.53 the same question is answered from the class's
  module source.
* The KV cache keyword: recent 5.x releases take ``cache=`` and warn (``FutureWarning``) on every
  call that ``past_key_values=`` goes away in 5.40; 4.53 .. early 5.x know only ``past_key_values=``
  and would silently drop an unknown ``cache=`` into ``**kwargs``. :func:`cache_keyword` reads the
  name from the model's ``forward`` signature, so one call works across the whole range.
"""

from __future__ import annotations

import inspect
import sys

MIN_TRANSFORMERS = "4.53"
#: Exclusive upper bound.
MAX_TRANSFORMERS = "6"
SUPPORTED_RANGE = f">={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}"


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is outside the range this integration supports."""


def transformers_version() -> str:
    """The installed transformers version, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "qstar_kernels.hf needs Hugging Face transformers "
            f"({SUPPORTED_RANGE}): pip install 'qstar-kernels[hf]' (or 'transformers{SUPPORTED_RANGE}')"
        ) from exc
    return str(transformers.__version__)


def check_transformers_version() -> str:
    """Return the installed transformers version; raise UnsupportedTransformersError outside the range."""
    from packaging.version import InvalidVersion, Version

    found = transformers_version()
    try:
        v = Version(found)
    except InvalidVersion:
        raise UnsupportedTransformersError(
            f"qstar_kernels.hf supports transformers{SUPPORTED_RANGE}; cannot parse the installed "
            f"version {found!r}"
        ) from None
    # Compare the release only, so that 5.3.0.dev0 counts as 5.3 (and 4.53.0.dev0 as 4.53).
    release = Version(".".join(str(p) for p in v.release))
    if not (Version(MIN_TRANSFORMERS) <= release < Version(MAX_TRANSFORMERS)):
        where = getattr(sys.modules.get("transformers"), "__file__", "?")
        raise UnsupportedTransformersError(
            f"qstar_kernels.hf supports transformers{SUPPORTED_RANGE}, found {found} ({where}). "
            f"Install a supported version: pip install 'transformers{SUPPORTED_RANGE}'"
        )
    return found


def uses_attention_interface(model_cls: type) -> bool:
    """Whether the model class's attention layers look their function up in ``AttentionInterface``."""
    can_set = getattr(model_cls, "_can_set_attn_implementation", None)
    if can_set is not None:  # transformers 5.x
        return bool(can_set())
    module = sys.modules.get(model_cls.__module__)
    if module is None:
        return False
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


_CACHE_KEYWORDS: dict[type, str] = {}


def cache_keyword(model) -> str:
    """The keyword under which ``model``'s ``forward`` takes the KV cache: ``"cache"`` where the
    installed transformers names it so, else ``"past_key_values"``.

        out = decoder(inputs_embeds=x, **{cache_keyword(decoder): cache}, use_cache=True)
    """
    cls = type(model)
    name = _CACHE_KEYWORDS.get(cls)
    if name is None:
        try:
            params = inspect.signature(cls.forward).parameters  # follows the decorators' __wrapped__
        except (TypeError, ValueError):
            params = {}
        name = "cache" if "cache" in params else "past_key_values"
        _CACHE_KEYWORDS[cls] = name
    return name


def set_attn_implementation(model, name: str) -> None:
    """Switch ``model`` (and its sub-models) to the registered attention implementation ``name``."""
    if hasattr(model, "set_attn_implementation"):  # transformers 5.x
        model.set_attn_implementation(name)
        return
    # transformers 4.53: the attention layers read config._attn_implementation at every call.
    from transformers import PreTrainedModel

    seen = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and id(module.config) not in seen:
            seen.add(id(module.config))
            module.config._attn_implementation = name
