"""STaR's fine-tuning step: next-token NLL on the kept rationales and answers, through the trainer.

:class:`StarObjective` is :class:`~qstar.objective.NextTokenObjective` (``model(..., think=False)``,
the loss through the fused log-prob op ``qstar_kernels.mixed_token_logprobs``: no ``(N, V)``
logits) over rows built from ``(prompt, completion)`` pairs: ``labels`` are -100 on the prompt and
the padding, so only the rationale and answer tokens count (:func:`build_rows`). Handing it to
:func:`qstar.train.train` gives the fine-tune the trainer's checkpoints, exact resume, NaN/Inf
guard, DDP/FSDP2 and progress bar.

The number of steps grows each outer iteration (:func:`steps_for_iteration`; the paper: 40 steps,
then 20% more per iteration), and each iteration starts again from the original model unless the
loop is told to continue from the previous one (:mod:`qstar.star.loop`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ..config import RunConfig, TrainingConfig
from ..forward_inputs import IGNORE
from ..objective import NextTokenObjective

log = logging.getLogger("qstar.star")

__all__ = ["StarObjective", "build_rows", "steps_for_iteration"]

#: what closes every training completion: the blank line after which the sampler stops.
END_OF_EXAMPLE = "\n\n"


def steps_for_iteration(iteration: int, base_steps: int, growth: float) -> int:
    """Optimizer steps of outer iteration ``iteration`` (1, 2, ...): ``ceil(base_steps * (1 +
    growth) ** (iteration - 1))``. ``growth`` 0.2 is the paper's 20% more per iteration."""
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
        raise ValueError(f"iteration must be an int >= 1, got {iteration!r}")
    if isinstance(base_steps, bool) or not isinstance(base_steps, int) or base_steps < 1:
        raise ValueError(f"--steps must be an int >= 1, got {base_steps!r}")
    if not (isinstance(growth, int | float) and math.isfinite(growth) and growth >= 0):
        raise ValueError(f"--step-growth must be a finite number >= 0, got {growth!r}")
    return math.ceil(base_steps * (1.0 + growth) ** (iteration - 1) - 1e-9)


def build_rows(
    examples: Sequence[tuple[str, str]], tokenizer, seq_len: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Training rows of ``(prompt, completion)`` pairs: ``{"input_ids", "attention_mask", "labels"}``,
    each ``(N, L)`` with ``L`` the longest example (at most ``seq_len``), right-padded. The prompt is
    encoded as the sampler encodes it (with the tokenizer's special tokens), the completion and
    :data:`END_OF_EXAMPLE` after it without; labels are the ids on the completion and -100 on the
    prompt and the padding. A pair longer than ``seq_len`` loses the start of its prompt; one whose
    completion alone does not fit is dropped. Returns the rows and the number dropped."""
    if not examples:
        raise ValueError("no training examples: nothing to fine-tune on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs: list[tuple[list[int], int]] = []  # (ids, number of prompt ids)
    dropped = 0
    for prompt, completion in examples:
        p = list(tokenizer.encode(prompt))
        c = list(tokenizer.encode(completion + END_OF_EXAMPLE, add_special_tokens=False))
        if len(c) >= seq_len:
            dropped += 1
            continue
        p = p[len(p) + len(c) - seq_len :] if len(p) + len(c) > seq_len else p
        seqs.append((p + c, len(p)))
    if not seqs:
        raise ValueError(f"every training example is longer than --seq-len {seq_len}: raise it")
    L = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.int64)  # (N, L)
    mask = torch.zeros(len(seqs), L, dtype=torch.int64)  # (N, L)
    labels = torch.full((len(seqs), L), IGNORE, dtype=torch.int64)  # (N, L)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, n_prompt : len(s)] = torch.tensor(s[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, dropped


class StarObjective(NextTokenObjective):
    """Next-token NLL on the rationale and answer tokens of STaR's kept examples (module docstring)."""

    name = "STaR fine-tune (NLL of rationales and answers)"

    def __init__(self, examples: Sequence[tuple[str, str]]):
        self.examples = list(examples)
        self.dropped = 0

    def dataset(self, run: RunConfig, training: TrainingConfig, tokenizer) -> dict[str, torch.Tensor]:
        """The rows of :func:`build_rows`; fewer rows than one batch (an early iteration may keep only
        a few rationales) are repeated until they fill one: the trainer's sampler needs a batch."""
        rows, self.dropped = build_rows(self.examples, tokenizer, training.seq_len)
        n = len(rows["input_ids"])
        if n < training.batch_size:
            reps = math.ceil(training.batch_size / n)
            log.warning("%d training examples, fewer than one batch of %d: each is repeated %d times", n,
                        training.batch_size, reps)  # fmt: skip
            rows = {k: v.repeat(reps, 1) for k, v in rows.items()}  # (reps * n, L) each
        return rows
