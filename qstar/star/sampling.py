"""Sampling rationales: batched, with a KV cache, k samples per prompt, stopped at the end of the answer.

The sampler is :func:`qstar.generate` with ``think=False`` (the base model alone: a KV-cached decode,
left-padded batches, temperature and top-p, stop strings): nothing STaR-specific is needed below it.
A batch of ``batch_size`` rows is one call; row ``r`` of the flattened work list is prompt ``r // k``,
sample ``r % k``, so the k samples of a prompt sit side by side and share its padding.

Every batch draws from its own generator, seeded from ``(seed, label, batch index)``
(:func:`batch_seed`): the samples of a batch do not depend on which batches ran before, so a loop
that resumes in the middle of a sampling phase draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..generation import generate
from .tasks import STOP_STRINGS

__all__ = ["Completion", "batch_seed", "cut_completion", "majority", "sample_batches"]


@dataclass
class Completion:
    """One sampled completion: ``text`` (cut before the stop string, surrounding whitespace kept
    off the end) and why it ended (``"stop"``, ``"eos"`` or ``"length"``: a completion that ran out of
    tokens is never kept)."""

    text: str
    finish_reason: str

    @property
    def finished(self) -> bool:
        return self.finish_reason in ("stop", "eos")


def batch_seed(seed: int, label: str, index: int) -> int:
    """A 63-bit seed for batch ``index`` of the phase ``label`` (e.g. ``"it2/rationale"``)."""
    digest = hashlib.sha256(f"{seed}/{label}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cut_completion(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` up to the first stop string, trailing whitespace removed."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut].rstrip()


def sample_batches(
    model,
    prompts: Sequence[str],
    *,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    label: str,
    skip: set[int] | frozenset = frozenset(),
    progress: bool = True,
) -> Iterator[tuple[int, list[int], list[Completion]]]:
    """Sample ``k`` completions of every prompt (``temperature`` 0: greedy, then ``k`` should be 1),
    ``batch_size`` rows per call. Yields ``(batch index, prompt index of each row, completions)`` per
    batch, in order, skipping the batch indices in ``skip`` (already done). A tqdm bar counts rows."""
    if k < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"k, batch_size and max_new_tokens must be >= 1, got {k}, {batch_size}, {max_new_tokens}"
        )
    rows = [p for p in range(len(prompts)) for _ in range(k)]
    starts = list(range(0, len(rows), batch_size))
    from tqdm.auto import tqdm

    done_rows = sum(min(batch_size, len(rows) - starts[b]) for b in skip if b < len(starts))
    bar = tqdm(total=len(rows), initial=done_rows, desc=label, unit="sample", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        for b, start in enumerate(starts):
            if b in skip:
                continue
            chunk = rows[start : start + batch_size]
            generator = torch.Generator(model.lm_head_weight.device).manual_seed(batch_seed(seed, label, b))
            out = generate(
                model,
                [prompts[p] for p in chunk],
                max_new_tokens=max_new_tokens,
                think=False,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                stop_strings=STOP_STRINGS,
                generator=generator,
            )
            completions = [Completion(cut_completion(t), r) for t, r in zip(out.texts, out.finish_reasons)]
            bar.update(len(chunk))
            yield b, chunk, completions
    finally:
        bar.close()
        model.train(was_training)


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer that is not None (a tie goes to the one seen first); None when no
    sample had an answer."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)
