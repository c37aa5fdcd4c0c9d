"""What the training loop optimises: an :class:`Objective`, and Quiet-STaR's.

The loop (:func:`qstar.train.train`) owns everything around the loss: the data order, gradient
accumulation, DDP/FSDP2, clipping, the NaN/Inf guard, the schedule, checkpoints and exact resume,
``metrics.csv`` and the progress bar. An objective owns the loss and what is logged about it:

* ``dataset(run, training, tokenizer) -> dict[str, Tensor]``: the training rows, every tensor
  ``(N, ...)`` with the same ``N``; the loop's sampler draws row indices, and a micro-batch is
  those rows of every tensor, on the device. The default reads ``run.data`` into fixed windows
  (:mod:`qstar.data`): ``{"input_ids": (N, L), "attention_mask": (N, L)}``.
* ``objective(model, batch, generator) -> ObjectiveOutput``: one micro-batch's ``loss`` (a
  scalar mean over the micro-batch; the loop divides it by the accumulation steps and calls
  ``backward``), its ``stats`` (a float64 vector in the order of ``stat_names``, which starts
  with ``"loss"``), ``n_tokens`` (for tokens/s) and an ``output`` kept for ``samples``. Call
  ``model(...)`` itself, not a submodule: under DDP/FSDP2 ``model`` is the wrapper, whose hooks
  synchronise the gradients. ``generator`` is this rank's sampling generator (checkpointed).
* ``guarded``: the statistics whose non-finite value (on any rank) skips the step.
* how it logs: ``summary(row)`` (the middle of the log line), ``postfix(row)`` (the progress bar),
  ``panels`` (the plot: ``(title, columns)`` pairs), ``samples(out, batch, tokenizer, n)`` with
  ``samples_file``/``sample_label`` (decoded samples, written every log step), ``name``.

:class:`QuietStarObjective` (the default) runs the whole Quiet-STaR forward (think, talk, learn:
``docs/algorithm.md``, "The objective"). :class:`NextTokenObjective` is the fine-tune without
thoughts (the base pass alone, through the same fused log-prob op): the baseline of the real-model
experiment and STaR's fine-tuning step. Another objective (DPO, say) subclasses :class:`Objective`
the same way and reuses everything the loop owns.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import RunConfig, TrainingConfig
from .data import load_documents, make_windows

__all__ = [
    "LOSS_PARTS",
    "STAT_NAMES",
    "NextTokenObjective",
    "Objective",
    "ObjectiveOutput",
    "QuietStarObjective",
    "sample_thoughts",
]


@dataclass
class ObjectiveOutput:
    """One micro-batch under an objective."""

    loss: torch.Tensor  # (): differentiable, a mean over the micro-batch
    stats: torch.Tensor  # (len(stat_names),) float64 on the CPU, detached
    n_tokens: int  # tokens of the micro-batch, for tokens/s
    output: Any = None  # what samples() reads (the model's output)


class Objective(abc.ABC):
    """The loss of a micro-batch and what is logged about it (module docstring)."""

    name: str = "objective"
    stat_names: tuple[str, ...] = ("loss",)
    guarded: tuple[str, ...] = ("loss",)
    panels: tuple[tuple[str, tuple[str, ...]], ...] = (("loss", ("loss",)),)
    samples_file: str | None = None
    sample_label: str = "sample"
    #: True when a step leaves some trainable parameters without a gradient (DDP must then look
    #: for them: ``find_unused_parameters``).
    unused_parameters: bool = False

    def dataset(self, run: RunConfig, training: TrainingConfig, tokenizer) -> dict[str, torch.Tensor]:
        """``run.data``'s documents as fixed windows of ``training.seq_len`` tokens."""
        documents = load_documents(run.data, text_field=run.text_field, split=run.data_split)
        windows = make_windows(documents, tokenizer, training.seq_len, training.seed)
        return {"input_ids": windows.input_ids, "attention_mask": windows.attention_mask}

    @abc.abstractmethod
    def __call__(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> ObjectiveOutput:
        """The loss and statistics of one micro-batch."""

    def summary(self, row: dict) -> str:
        return f"loss {row['loss']:.4f}"

    def postfix(self, row: dict) -> dict[str, str]:
        return {"loss": f"{row['loss']:.3f}"}

    def samples(self, out: ObjectiveOutput, batch: dict, tokenizer, n: int) -> list[str]:
        return []


# --------------------------------------------------------------------------------------------------
# Quiet-STaR
# --------------------------------------------------------------------------------------------------

STAT_NAMES = (
    "loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "reward_std", "reward_max",
    "advantage_mean", "advantage_positive", "mixing_weight_mean", "mixing_weight_std",
)  # fmt: skip
LOSS_PARTS = ("loss", "base_nll", "talk_nll", "policy_loss")


def batch_stats(out) -> torch.Tensor:
    """The logged statistics of one Quiet-STaR forward, as a float64 vector (order of STAT_NAMES)."""
    f = lambda t: t.detach().double()  # noqa: E731
    rewards, adv, w = f(out.rewards), f(out.advantages), f(out.mixing_weights)
    return torch.stack([
        f(out.loss), f(out.base_nll), f(out.talk_nll).mean(), f(out.policy_loss),
        rewards.mean(), rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()), rewards.max(),
        adv.mean(), (adv > 0).double().mean(), w.mean(), w.std() if w.numel() > 1 else w.new_zeros(()),
    ]).cpu()  # fmt: skip


def sample_thoughts(out, input_ids, attention_mask, tokenizer, n: int, context: int = 24) -> list[str]:
    """``n`` thoughts of the first row, at evenly spaced real positions, decoded with their context:
    ``...context<|startthought|>thought<|endthought|>next tokens``. Uses no RNG."""
    if n == 0 or out.thought_tokens is None:
        return []
    n_real = int(attention_mask[0].sum())
    ids = input_ids[0, :n_real].tolist()
    thoughts = out.thought_tokens[:, 0, :].T.tolist()  # (L, n_thought_tokens): row 0's thought per position
    positions = sorted({int(round((k + 1) * (n_real - 2) / (n + 1))) for k in range(n)})
    dec = (lambda t: tokenizer.decode(t)) if tokenizer is not None else (lambda t: " ".join(map(str, t)))
    lines = []
    for j in positions:
        ctx, nxt = dec(ids[max(0, j - context + 1) : j + 1]), dec(ids[j + 1 : j + 5])
        lines.append(f"pos {j}: {ctx!r} <|startthought|>{dec(thoughts[j])!r}<|endthought|> {nxt!r}")
    return lines


class QuietStarObjective(Objective):
    """The whole Quiet-STaR forward on a window batch: think, talk, learn (the model's ``loss``)."""

    name = "Quiet-STaR"
    stat_names = STAT_NAMES
    guarded = LOSS_PARTS
    panels = (
        ("NLL (nats/token)", ("base_nll", "talk_nll")),
        ("total loss (NLL + policy weight x policy loss)", ("loss",)),
        ("reward (talk log-prob gain over the base)", ("reward_mean", "reward_max")),
        ("mixing weight (mean)", ("mixing_weight_mean",)),
    )
    samples_file = "thoughts.txt"
    sample_label = "thought"

    def __call__(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> ObjectiveOutput:
        mask = batch["attention_mask"]
        out = model(batch["input_ids"], attention_mask=mask, generator=generator)
        return ObjectiveOutput(out.loss, batch_stats(out), int(mask.sum()), out)

    def summary(self, row: dict) -> str:
        return (
            f"loss {row['loss']:.4f} | base {row['base_nll']:.4f} | talk {row['talk_nll']:.4f} | "
            f"policy {row['policy_loss']:.3g} | reward {row['reward_mean']:+.4f} | "
            f"w {row['mixing_weight_mean']:+.4f}"
        )

    def postfix(self, row: dict) -> dict[str, str]:
        return {"loss": f"{row['loss']:.3f}", "w": f"{row['mixing_weight_mean']:+.3f}"}

    def samples(self, out: ObjectiveOutput, batch: dict, tokenizer, n: int) -> list[str]:
        return sample_thoughts(out.output, batch["input_ids"], batch["attention_mask"], tokenizer, n)


# --------------------------------------------------------------------------------------------------
# Fine-tuning without thoughts
# --------------------------------------------------------------------------------------------------


class NextTokenObjective(Objective):
    """Plain next-token NLL of the base model, no thoughts: ``model(..., think=False)``.

    The loss is the mean ``-log p(x_{j+1})`` over the real targets, computed by the fused log-prob
    op (no ``(N, V)`` logits). A dataset row may carry ``labels`` ``(N, L)`` (HF convention, -100
    ignored): then only those tokens count, e.g. a rationale and answer but not their question. The
    mixing head and meta embeddings get no gradient and stay as they are.
    """

    name = "next-token NLL (no thoughts)"
    unused_parameters = True  # the mixing head and meta embeddings
    stat_names = ("loss",)
    guarded = ("loss",)
    panels = (("NLL (nats/token)", ("loss",)),)

    def __call__(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> ObjectiveOutput:
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, L) each
        labels = batch.get("labels")  # (B, L) or None
        out = model(ids, attention_mask=mask, labels=labels, think=False)
        # n_tokens counts the real tokens read, as QuietStarObjective does (tokens/s compare)
        return ObjectiveOutput(out.loss, out.loss.detach().double().reshape(1).cpu(), int(mask.sum()), out)

    def summary(self, row: dict) -> str:
        return f"nll {row['loss']:.4f}"


def non_finite(names: Sequence[str], stats: torch.Tensor, guarded: Sequence[str]) -> list[str]:
    """The ``guarded`` statistics that are NaN or infinite in ``stats`` (ordered as ``names``)."""
    values = dict(zip(names, stats.tolist()))
    return [name for name in guarded if not math.isfinite(values[name])]
