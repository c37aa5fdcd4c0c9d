"""The rollout's KV cache: one block of ``L`` keys per step, addressed by step.

A ``transformers.DynamicCache`` appends on every ``update``. That is right for a straight rollout,
but not when a step is recomputed in the backward (gradient checkpointing): the replay would append
the step's keys a second time. :class:`RolloutCache` stores each step's block at its index
(``cache.step``, set by the rollout before each pass) and returns the concatenation of blocks
``0 .. step``; a replay of step ``a`` sees exactly the keys the first pass saw (its own block is
recomputed, with identical values, and used but not stored: storing it would keep the recomputed
step's whole autograd graph, and so its activations, alive until the backward ends). Only the
blocks are kept, so under checkpointing the memory held between forward and backward is one
``L``-long block of keys and values per layer and step.

Both caches keep one object per layer. transformers >= 4.56 builds every ``Cache`` that way and
dispatches ``update`` to the layers itself; on 4.53 .. 4.55 :class:`_LayeredCache` does the
dispatch, so the caches work across the whole supported range.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

try:  # transformers >= 4.56: a Cache is a list of layer objects and dispatches to them
    from transformers.cache_utils import DynamicLayer as _LayerBase

    _LAYERED = True
except ImportError:  # 4.53 .. 4.55: _LayeredCache dispatches to its layers itself
    _LayerBase = object
    _LAYERED = False


class _Clock:
    __slots__ = ("step",)

    def __init__(self) -> None:
        self.step = 0


class _RolloutLayer(_LayerBase):
    """One layer's blocks; ``update`` writes block ``clock.step`` and returns blocks ``0..step``."""

    def __init__(self, clock: _Clock):
        super().__init__()
        self.clock = clock
        self.key_blocks: list[torch.Tensor] = []
        self.value_blocks: list[torch.Tensor] = []

    def update(self, key_states, value_states, *args, **kwargs):
        if _LAYERED and not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.clock.step
        if step == len(self.key_blocks):
            self.key_blocks.append(key_states)
            self.value_blocks.append(value_states)
        elif step < len(self.key_blocks):  # a recompute of an earlier step (gradient checkpointing)
            if key_states.shape != self.key_blocks[step].shape:
                raise RuntimeError(
                    f"RolloutCache: step {step} replayed with keys of shape {tuple(key_states.shape)}, "
                    f"the first pass had {tuple(self.key_blocks[step].shape)}"
                )
            # Not stored: the replay's keys carry the recomputation's autograd graph, and a cache
            # that kept them would keep every recomputed step's activations alive until the end of
            # the backward (then checkpointing saved little). The stored block holds the same values.
            if step == 0:
                return key_states, value_states
            keys = torch.cat([*self.key_blocks[:step], key_states], dim=-2)
            values = torch.cat([*self.value_blocks[:step], value_states], dim=-2)
            return keys, values
        else:
            raise RuntimeError(
                f"RolloutCache: step {step} written before step {len(self.key_blocks)}; "
                "steps must run in order"
            )
        if step == 0:
            return key_states, value_states
        keys = torch.cat(self.key_blocks[: step + 1], dim=-2)  # (B, Hkv, (step+1)*L, D)
        values = torch.cat(self.value_blocks[: step + 1], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        blocks = self.key_blocks[: self.clock.step]
        return sum(int(k.shape[-2]) for k in blocks)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        self.key_blocks, self.value_blocks = [], []
        if _LAYERED:
            super().reset()


class _LayeredCache(Cache):
    """A ``Cache`` over one layer object per decoder layer, on every supported transformers."""

    def __init__(self, layers: list) -> None:
        if _LAYERED:
            super().__init__(layers=layers)
        else:
            super().__init__()
            self.layers = layers

    if not _LAYERED:  # what transformers >= 4.56's Cache does for us

        def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
            return self.layers[layer_idx].update(key_states, value_states)

        def get_seq_length(self, layer_idx: int | None = 0) -> int:
            return self.layers[layer_idx or 0].get_seq_length()

        def get_max_cache_shape(self) -> int | None:
            return None


class RolloutCache(_LayeredCache):
    """A cache for the Quiet-STaR rollout: set ``cache.step = a`` before step ``a``'s pass."""

    def __init__(self, config) -> None:
        self._clock = _Clock()
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__([_RolloutLayer(self._clock) for _ in range(n_layers)])

    @property
    def step(self) -> int:
        return self._clock.step

    @step.setter
    def step(self, value: int) -> None:
        self._clock.step = int(value)


class _BufferedLayer(_LayerBase):
    """One layer's keys in a preallocated buffer: ``update`` writes in place, ``truncate`` drops a
    suffix by moving the length back (no copy, no ``torch.cat`` of the whole cache per token)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if _LAYERED and not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._kbuf is None:
            B, H, _, D = key_states.shape
            self._kbuf = key_states.new_empty(B, H, self.capacity, D)
            self._vbuf = value_states.new_empty(
                B, value_states.shape[1], self.capacity, value_states.shape[-1]
            )
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(
                f"ThoughtBranchCache: {end} keys exceed the capacity {self.capacity} it was created with"
            )
        self._kbuf[:, :, self.length : end] = key_states
        self._vbuf[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._kbuf[:, :, :end]
        self.values = self._vbuf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def truncate(self, length: int) -> None:
        if self._kbuf is None:
            return
        self.length = int(length)
        self.keys = self._kbuf[:, :, : self.length]
        self.values = self._vbuf[:, :, : self.length]


class ThoughtBranchCache(_LayeredCache):
    """The decode cache of generation with thoughts: the text's keys, then a private branch.

    Generation appends the text token and the thought (``<start> t_1 .. t_n <end>``) of the newest
    position, then :meth:`drop_branch` cuts the cache back to the text, so later text never attends
    to an earlier thought. The keys live in a buffer of ``capacity`` positions allocated once, so
    dropping a branch copies nothing.
    """

    def __init__(self, config, capacity: int) -> None:
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__([_BufferedLayer(capacity) for _ in range(n_layers)])
        self.text_length = 0

    def commit_text(self, n_tokens: int) -> None:
        """The first ``n_tokens`` new keys of the last forward are text; they stay."""
        self.text_length += int(n_tokens)

    def drop_branch(self) -> None:
        """Forget every key after the text (the newest position's thought)."""
        for layer in self.layers:
            layer.truncate(self.text_length)
