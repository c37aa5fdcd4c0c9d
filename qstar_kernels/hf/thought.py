"""Marking a forward as a Quiet-STaR thought step: the ``thought_step`` context manager.

A Quiet-STaR rollout (``docs/algorithm.md``, "The parallel rollout") runs the model once per step
on ``L`` new tokens, one per text position, with a ``DynamicCache`` that holds the keys of every
earlier step: the text block, then one block of ``L`` per step. Inside ``thought_step(...)`` a patched model

* builds no attention mask at all (its mask function returns None), and
* computes attention with :func:`qstar_kernels.thought_attention`: causal over the text block, plus
  each position's own key in every later block.

The marker lives in a :class:`contextvars.ContextVar`, so it reaches every attention layer whatever
the model does with its keyword arguments, and it is local to the thread (and asyncio task) that
entered it. The mask functions of transformers never see a model's keyword arguments, which is why a
keyword argument alone could not stop the dense mask from being built.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator

import torch

__all__ = ["thought_step", "ThoughtStep", "active_thought_step"]


class ThoughtStep:
    """What one ``thought_step(...)`` block told the patched attention layers.

    Attributes:
        key_padding_mask: the ``(B, L)`` keep mask of the text as given (True/1 = real token), or None.
        step: the step index ``a`` (0 = the text pass), or None to take it from the cache length.
        calls: how many attention layers computed thought attention inside the block so far.
    """

    __slots__ = ("key_padding_mask", "step", "calls", "_keep_by_device")

    def __init__(self, key_padding_mask: torch.Tensor | None, step: int | None):
        self.key_padding_mask = key_padding_mask
        self.step = step
        self.calls = 0
        self._keep_by_device: dict[torch.device, torch.Tensor] = {}

    def keep_on(self, device: torch.device) -> torch.Tensor | None:
        """The key padding mask as a bool tensor on ``device`` (converted once per device and block)."""
        if self.key_padding_mask is None:
            return None
        keep = self._keep_by_device.get(device)
        if keep is None:
            keep = self.key_padding_mask.to(device=device, dtype=torch.bool)
            self._keep_by_device[device] = keep
        return keep

    def __repr__(self) -> str:
        shape = None if self.key_padding_mask is None else tuple(self.key_padding_mask.shape)
        return f"ThoughtStep(key_padding_mask shape={shape}, step={self.step}, calls={self.calls})"


_ACTIVE: contextvars.ContextVar[ThoughtStep | None] = contextvars.ContextVar(
    "qstar_kernels_thought_step", default=None
)


def active_thought_step() -> ThoughtStep | None:
    """The ``ThoughtStep`` of the enclosing ``thought_step`` block, or None outside one."""
    return _ACTIVE.get()


def _check_key_padding_mask(m) -> torch.Tensor | None:
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise TypeError(
            f"thought_step: key_padding_mask must be a (B, L) torch.Tensor (True/1 = real token) or None, "
            f"got {type(m).__name__}"
        )
    if m.dtype != torch.bool and (m.dtype.is_floating_point or m.dtype.is_complex):
        raise TypeError(
            "thought_step: key_padding_mask must be bool (True = real token) or an integer 0/1 tensor "
            f"like a tokenizer's attention_mask, got dtype {m.dtype}"
        )
    if m.dim() != 2:
        raise ValueError(
            "thought_step: key_padding_mask must be 2-D (B, L): the padding of the text, one row per "
            f"sequence; got shape {tuple(m.shape)}. Pass the text's mask, not a dense 4-D attention mask"
        )
    if m.shape[1] < 1:
        raise ValueError(
            f"thought_step: key_padding_mask must have L >= 1 columns, got shape {tuple(m.shape)}"
        )
    return m


def _check_step(step) -> int | None:
    if step is None:
        return None
    if isinstance(step, bool) or (isinstance(step, torch.Tensor) and step.dtype == torch.bool):
        raise TypeError(f"thought_step: step must be None or an int >= 0, got {step!r}")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(
            f"thought_step: step must be None or an int >= 0, got {type(step).__name__} {step!r}"
        ) from None
    if step < 0:
        raise ValueError(f"thought_step: step must be >= 0 (0 = the text pass), got {step}")
    return step


@contextlib.contextmanager
def thought_step(key_padding_mask: torch.Tensor | None = None, *, step: int | None = None):
    """Run the enclosed forward of a patched model as Quiet-STaR thought step ``step``.

    Args:
        key_padding_mask: ``(B, L)`` padding mask of the text, True (or 1) for real tokens, the same
            at every step (a tokenizer's ``attention_mask`` works). None means no padding.
        step: the step index ``a``: 0 for the text pass, then 1, 2, ... The cache must then hold
            ``a * L`` keys before the forward (``(a + 1) * L`` after it); None skips that check and
            takes ``a`` from the cache length.

    Inside the block, call the model with ``L`` new tokens per row, ``position_ids`` ``j + a``,
    the ``DynamicCache`` of the earlier steps as its cache (keyword :func:`cache_keyword`:
    ``cache`` or ``past_key_values``), ``use_cache=True`` and no ``attention_mask``. Every patched
    attention layer then calls :func:`qstar_kernels.thought_attention` and no dense mask is built.

    Raises at the end of the block if no patched attention layer ran in it (an unpatched model would
    have computed plain causal attention over the whole cache). Blocks do not nest.

    Yields the :class:`ThoughtStep` (its ``calls`` counts the attention layers that ran).
    """
    keep = _check_key_padding_mask(key_padding_mask)
    step = _check_step(step)
    if _ACTIVE.get() is not None:
        raise RuntimeError(
            "thought_step: blocks do not nest; this forward is already inside "
            f"{_ACTIVE.get()!r}. Use one thought_step block per model forward"
        )
    state = ThoughtStep(keep, step)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
    if state.calls == 0:
        raise RuntimeError(
            "thought_step: no patched attention layer ran inside this block, so the forward (if any) "
            "computed ordinary causal attention, not the thought pattern. Patch the model first with "
            "qstar_kernels.hf.apply_qstar_kernels(model) (or apply_qstar_kernels_to_mistral(...)), and call "
            "it inside the block. A model patched without an instance must use attn_implementation='sdpa'"
        )
