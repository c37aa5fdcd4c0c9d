"""The settings of a STaR run: :class:`StarConfig`, one field per ``qstar-star`` flag."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import PRECISIONS

__all__ = ["METHODS", "StarConfig"]

METHODS = ("star", "direct")


@dataclass
class StarConfig:
    """Every knob of a STaR run (``qstar-star --help`` names each flag)."""

    model: str = "tiny"
    task: str = "word-problems"
    train: str | None = None
    heldout: str | None = None
    exemplars_file: str | None = None
    n_exemplars: int | None = None
    train_size: int | None = None
    heldout_size: int | None = None
    ops: tuple[int, ...] = (1, 2, 3)
    #: word problems: only these templates (None: all).
    templates: tuple[str, ...] | None = None
    output_dir: str = "runs/star"
    method: str = "star"
    iterations: int = 3
    rationalization: bool = True
    #: samples per training problem (rationale phase) and per hinted problem (rationalization).
    samples: int = 4
    rationalization_samples: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 96
    #: held-out majority vote over this many samples (0: greedy only).
    majority_samples: int = 4
    #: generated rows per decode call.
    batch_size: int = 16
    #: prompt the fine-tuned models with the exemplars too (the default: zero-shot, as trained).
    few_shot_after_training: bool = False
    #: True: every iteration fine-tunes the starting model (the paper); False: the previous one.
    restart: bool = True
    steps: int = 40
    step_growth: float = 0.2
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    train_batch_size: int = 8
    micro_batch_size: int = 8
    seq_len: int = 256
    save_every: int = 50
    precision: str = "fp32"
    seed: int = 0
    device: str | None = None
    #: the fine-tune's ``RunConfig.distributed``; only "none" so far (``docs/star.md``, "Fine-tuning").
    distributed: str = "none"
    cpu_threads: int | None = None
    progress: bool = True
    plot: bool = True
    #: evaluate the starting model (iteration 0, the few-shot baseline); off when another run did.
    evaluate_start: bool = True
    resume: bool = False
    overwrite: bool = False
    #: fields that may differ on resume (everything else must match the saved config).
    resumable_changes: tuple[str, ...] = field(
        default=(
            "iterations",
            "resume",
            "overwrite",
            "progress",
            "plot",
            "device",
            "cpu_threads",
        ),  # not batch_size: a sampling phase resumes by batch index
        repr=False,
    )

    def validate(self) -> None:
        def positive(name, value, low=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")

        for name in (
            "iterations",
            "samples",
            "max_new_tokens",
            "batch_size",
            "steps",
            "train_batch_size",
            "micro_batch_size",
            "seq_len",
            "save_every",
        ):
            positive(name, getattr(self, name))
        for name in ("rationalization_samples", "majority_samples", "warmup_steps", "seed"):
            positive(name, getattr(self, name), 0)
        for name, value, low_ok in (
            ("lr", self.learning_rate, False),
            ("weight_decay", self.weight_decay, True),
            ("step_growth", self.step_growth, True),
        ):
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and not low_ok):
                bound = ">= 0" if low_ok else "> 0"
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {bound}, got {value!r}")
        if self.train_batch_size % self.micro_batch_size:
            raise ValueError(
                f"--train-batch-size ({self.train_batch_size}) must be a multiple of --micro-batch-size "
                f"({self.micro_batch_size})"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.temperature, int | float) and 0 <= self.temperature < math.inf):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if self.temperature == 0 and (self.samples > 1 or self.majority_samples > 1):
            raise ValueError(
                "--temperature 0 is greedy: every sample would be the same; give a "
                "temperature > 0 or --samples 1 --majority-samples 0"
            )
        if self.distributed != "none":
            raise ValueError(
                f"distributed must be 'none', got {self.distributed!r}: the STaR loop runs in one process "
                "(its sampling and files are not rank-aware yet)"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --overwrite starts afresh")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("resumable_changes")
        d["ops"] = list(self.ops)
        d["templates"] = None if self.templates is None else list(self.templates)
        return d
