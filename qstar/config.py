"""Every knob of Quiet-STaR under one name each, and the presets.

Two dataclasses: :class:`QuietStarConfig` is the method (what one forward computes) and
:class:`TrainingConfig` is the optimisation around it (optimizer, batch, data, precision). A
preset fills both:

* ``"paper"`` is the authors' configuration and arithmetic (``docs/method.md``, "Presets"),
  quirks included: thoughts are sampled even in evaluation (their ``tau=0.001`` is a no-op), NLL
  means over the non-zero loss entries, every label equal to the pad id ignored, one-hot matmuls
  for step inputs, pure bf16 weights and optimizer state, lr 1e-6, policy weight 1e6.
* ``"default"`` is what we recommend. It keeps the objective but fixes the bugs: greedy thoughts
  in evaluation when the eval temperature is 0, NLL means over the real target tokens, a real
  token equal to the pad id (an EOS inside a text) is predicted, gathers instead of one-hot matmuls,
  fp32 master weights with bf16 autocast (on a GPU).
* ``"tiny-demo"`` is ``default`` shrunk to run on a laptop CPU in minutes (short thoughts, short
  windows, fp32, a larger learning rate).

Meta-token embeddings are saved and restored by ``save_pretrained``/``from_pretrained`` in every
preset: the authors' loader resets them on load (quirk 6), a loading bug rather than part of the
algorithm, and no preset reproduces it. See the README's "Presets" table for every difference.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

NLL_NORMALIZATIONS = ("nonzero", "tokens")
EMBEDDING_LOOKUPS = ("gather", "one_hot")
BASELINES = ("mean_rationales", "none")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive(name: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> None:
    """``value`` is an int (``integer``) or a finite number, > 0 (>= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        want = "an int" if integer else "a finite number"
        raise TypeError(f"{name} must be {want} {bound}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        want = "" if integer else "a finite number "
        raise ValueError(f"{name} must be {want}{bound}, got {value!r}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _check_text(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {type(value).__name__} {value!r}")


@dataclass
class QuietStarConfig:
    """The method: what one Quiet-STaR forward computes (``docs/algorithm.md``).

    The authors' names are given in brackets where they differ.
    """

    # --- thought and talk lengths (docs/algorithm.md, "Notation") --------------------------
    #: sampled thought tokens per position, excluding <start> and <end> [n_ahead - 3].
    n_thought_tokens: int = 9
    #: teacher-forced talk predictions per position (non-myopic window) [n_ahead_talk].
    n_talk_tokens: int = 4
    #: rationales sampled per sequence; the rewards' baseline is their mean [n_passes].
    n_rationales: int = 2
    #: in eval mode the authors override K := 1 and P := 1 (docs/algorithm.md, "Eval-mode overrides").
    eval_n_talk_tokens: int = 1
    eval_n_rationales: int = 1

    # --- meta tokens (docs/algorithm.md, "Meta tokens") -----------------------------------------
    start_token: str = "<|startthought|>"
    end_token: str = "<|endthought|>"
    #: both meta embeddings start from the embedding of the first token of this string
    #: ("---", three ASCII hyphens, in the authors' code).
    meta_init_string: str = "---"
    #: the meta embeddings are stored divided by this and multiplied back in forward, which
    #: scales their effective Adam learning rate by the same factor [embedding_scale].
    meta_embedding_scale: float = 100.0

    # --- mixing head (docs/algorithm.md, "The mixing head") -------------------------------------
    #: Linear layers of the head on [h_base ; h_thought] (3: 2H->H, ReLU, H->H, ReLU, H->1).
    mixing_head_layers: int = 3
    #: width of the hidden layers (None: the model's hidden size).
    mixing_head_hidden_size: int | None = None
    #: the last layer starts at zero, so w = 0 and the model starts as the base LM.
    mixing_head_zero_init: bool = True

    # --- sampling and REINFORCE (docs/algorithm.md, "The objective") ----------------------------
    #: thought tokens are sampled from softmax(z / thought_temperature) in training.
    thought_temperature: float = 1.0
    #: and in eval mode; 0 is greedy. The authors' eval sets tau=0.001, which hard Gumbel
    #: ignores: their eval thoughts are sampled at 1 (quirk 1), so "paper" uses 1.0.
    eval_thought_temperature: float = 0.0
    #: the policy log-probabilities are log_softmax(z / reinforce_temperature) [reinforce_temperature].
    reinforce_temperature: float = 3.0
    #: weight of the REINFORCE term in the loss [policy_loss_beta].
    policy_loss_weight: float = 1e6
    #: weight of the base pass's plain next-token NLL [original_loss_weight].
    base_loss_weight: float = 0.5
    #: weight of the mean talk NLL (the authors: 1 - original_loss_weight).
    talk_loss_weight: float = 0.5
    #: only rationales better than the baseline are reinforced [remove_negative_rewards].
    clip_negative_advantages: bool = True
    #: the baseline subtracted from each reward: the mean over the n_rationales copies [trice_mode];
    #: like the authors, only when n_rationales > 1 (one rationale: the raw reward).
    baseline: str = "mean_rationales"

    # --- arithmetic choices (docs/algorithm.md, "The authors' quirks") --------------------------
    #: "nonzero": sum / count of non-zero entries (the authors' loss_mean, quirk 15);
    #: "tokens": sum / count of real target tokens.
    nll_normalization: str = "tokens"
    #: ignore every label equal to the pad id, padding or not (the authors, quirk 14: their pad id
    #: is their EOS, so an EOS inside a text is never predicted). False: only padding
    #: (attention_mask 0) and -100 labels are ignored.
    ignore_pad_labels: bool = False
    #: how sampled and teacher-forced tokens become the next step's input embeddings:
    #: "one_hot" (the authors' (N, V) @ E matmul) or "gather" (E[t]); the values are identical.
    embedding_lookup: str = "gather"

    # --- memory -----------------------------------------------------------------------------------
    #: recompute each rollout step's transformer activations in the backward (step-level
    #: checkpointing; the cache keeps only each step's new keys and values).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("n_thought_tokens", "n_talk_tokens", "n_rationales", "eval_n_talk_tokens"):
            _check_positive(name, getattr(self, name), integer=True)
        _check_positive("eval_n_rationales", self.eval_n_rationales, integer=True)
        _check_positive("mixing_head_layers", self.mixing_head_layers, integer=True)
        if self.mixing_head_hidden_size is not None:
            _check_positive("mixing_head_hidden_size", self.mixing_head_hidden_size, integer=True)
        _check_positive("meta_embedding_scale", self.meta_embedding_scale)
        _check_positive("thought_temperature", self.thought_temperature, allow_zero=True)
        _check_positive("eval_thought_temperature", self.eval_thought_temperature, allow_zero=True)
        _check_positive("reinforce_temperature", self.reinforce_temperature)
        for name in ("policy_loss_weight", "base_loss_weight", "talk_loss_weight"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        _check_choice("baseline", self.baseline, BASELINES)
        _check_choice("nll_normalization", self.nll_normalization, NLL_NORMALIZATIONS)
        _check_choice("embedding_lookup", self.embedding_lookup, EMBEDDING_LOOKUPS)
        bools = (
            "mixing_head_zero_init",
            "clip_negative_advantages",
            "gradient_checkpointing",
            "ignore_pad_labels",
        )
        for name in bools:
            _check_bool(name, getattr(self, name))
        for name in ("start_token", "end_token", "meta_init_string"):
            _check_text(name, getattr(self, name))
        if self.start_token == self.end_token:
            raise ValueError(f"start_token and end_token must differ, both are {self.start_token!r}")

    @property
    def n_ahead(self) -> int:
        """The authors' ``n_ahead``: sampled thought tokens + <start> + <end> + the base pass."""
        return self.n_thought_tokens + 3

    @property
    def n_steps(self) -> int:
        """Transformer passes per training forward: ``n_ahead + n_talk_tokens - 1``."""
        return self.n_ahead + self.n_talk_tokens - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuietStarConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuietStarConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> QuietStarConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class TrainingConfig:
    """The optimisation around the method (``docs/training.md``)."""

    learning_rate: float = 1e-6
    weight_decay: float = 0.001
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 20
    #: linear decay to 0 over this many optimizer steps after warmup (the authors: 100000,
    #: so the rate is effectively constant); None keeps it constant.
    decay_steps: int | None = 100000
    max_grad_norm: float = 1.0
    #: unique sequences per optimizer step, over all processes and accumulation steps.
    batch_size: int = 8
    #: unique sequences per forward per process (each becomes n_rationales rows).
    micro_batch_size: int = 4
    max_steps: int = 100
    #: tokens per training window; longer documents contribute one random window.
    seq_len: int = 256
    #: "fp32": fp32 weights and math; "bf16-mixed": fp32 master weights with bf16 autocast;
    #: "bf16": pure bf16 weights and optimizer state (the authors).
    precision: str = "bf16-mixed"
    seed: int = 42
    log_every: int = 10
    save_every: int = 100
    #: decoded sample thoughts written to the log at each log step.
    log_sample_thoughts: int = 2
    #: the NaN/Inf guard skips a step whose loss or gradient norm is not finite, and stops
    #: training with an error after this many skipped steps in a row.
    max_consecutive_skips: int = 10
    #: LoRA (the ``lora`` extra, :mod:`qstar.lora`): the adapters' rank; 0 trains the full model.
    #: The mixing head and the meta embeddings always train in full.
    lora_r: int = 0
    #: the adapters' scale is ``lora_alpha / lora_r``.
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    #: comma-separated module names of the base model (``q_proj,v_proj``), or ``all-linear`` (every
    #: linear layer of the decoder; never the LM head or the embeddings, which the fused ops read).
    lora_target_modules: str = "all-linear"

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("adam_eps", self.adam_eps)
        betas = self.adam_betas
        if len(betas) != 2 or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        _check_positive("warmup_steps", self.warmup_steps, allow_zero=True, integer=True)
        if self.decay_steps is not None:
            _check_positive("decay_steps", self.decay_steps, integer=True)
        _check_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        for name in ("batch_size", "micro_batch_size", "max_steps", "seq_len", "log_every", "save_every"):
            _check_positive(name, getattr(self, name), integer=True)
        _check_positive("log_sample_thoughts", self.log_sample_thoughts, allow_zero=True, integer=True)
        _check_positive("max_consecutive_skips", self.max_consecutive_skips, integer=True)
        _check_positive("seed", self.seed, allow_zero=True, integer=True)
        if self.seed >= 2**62:
            raise ValueError(f"seed must be < 2**62, got {self.seed}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (an input and its next token), got {self.seq_len}")
        _check_choice("precision", self.precision, PRECISIONS)
        _check_positive("lora_r", self.lora_r, allow_zero=True, integer=True)
        _check_positive("lora_alpha", self.lora_alpha)
        if not (isinstance(self.lora_dropout, int | float) and 0 <= self.lora_dropout < 1):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.lora_target_modules, str) or not [
            m for m in self.lora_target_modules.split(",") if m.strip()
        ]:
            raise ValueError(
                "lora_target_modules must be comma-separated module names or 'all-linear', "
                f"got {self.lora_target_modules!r}"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainingConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class Preset:
    name: str
    method: QuietStarConfig
    training: TrainingConfig
    #: what this preset changes relative to "paper", one line each (README table).
    differences: list[str] = field(default_factory=list)


def _paper() -> Preset:
    method = QuietStarConfig(
        n_thought_tokens=9,
        n_talk_tokens=4,
        n_rationales=2,
        eval_thought_temperature=1.0,
        nll_normalization="nonzero",
        ignore_pad_labels=True,
        embedding_lookup="one_hot",
    )
    training = TrainingConfig(precision="bf16")
    return Preset("paper", method, training, [])


def _default() -> Preset:
    method = QuietStarConfig(
        eval_thought_temperature=0.0, nll_normalization="tokens", embedding_lookup="gather"
    )
    training = TrainingConfig(precision="bf16-mixed")
    diffs = [
        "eval thoughts greedy (eval_thought_temperature=0); the authors sample them at 1",
        "NLL means over real target tokens; the authors divide by the count of non-zero losses",
        "a real token equal to the pad id (an EOS inside a text) is predicted; the authors ignore every "
        "label equal to the pad id, their EOS",
        "step inputs by gather E[t]; the authors use a one-hot (N, V) @ E matmul (same values)",
        "fp32 master weights with bf16 autocast; the authors keep pure bf16 weights and Adam state",
    ]
    return Preset("default", method, training, diffs)


def _tiny_demo() -> Preset:
    base = _default()
    # The policy weight is 100, not 1e6: with 1e6 and clipping at 1 the update direction is the
    # policy gradient as soon as any reward is non-zero, and on this tiny random model the NLL then
    # climbs back (measured: base NLL 3.45 -> 3.97 over 5 steps at lr 3e-3). At 100 the two terms
    # are of similar size and the NLL falls steadily (4.6 -> ~1.7 in 100 steps).
    method = dataclasses.replace(
        base.method, n_thought_tokens=4, n_talk_tokens=2, n_rationales=2, policy_loss_weight=100.0
    )
    training = TrainingConfig(
        learning_rate=2e-3,
        weight_decay=0.0,
        warmup_steps=10,
        decay_steps=None,
        batch_size=8,
        micro_batch_size=8,
        max_steps=120,
        seq_len=48,
        precision="fp32",
        log_every=5,
        save_every=60,
    )
    diffs = base.differences + [
        "4 thought tokens, 2 talk tokens, 48-token windows, 120 steps of 8 sequences",
        "policy loss weight 100 instead of 1e6 (the tiny model's NLL climbs back at 1e6)",
        "fp32, lr 2e-3 constant after 10 warmup steps, no weight decay",
    ]
    return Preset("tiny-demo", method, training, diffs)


PRESETS = {"paper": _paper, "default": _default, "tiny-demo": _tiny_demo}


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (``"paper"``, ``"default"``, ``"tiny-demo"``)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------
# The run: where the trainer reads and writes, and how it is spread over processes
# --------------------------------------------------------------------------------------------------

from .data import DEMO_CORPUS  # noqa: E402  (kept beside RunConfig, its only user here)

DISTRIBUTED = ("auto", "none", "ddp", "fsdp2")
FSDP_UNITS = ("layer", "model")
REPORTERS = ("tensorboard", "wandb")


@dataclass
class RunConfig:
    """Where the run reads and writes, and how it is spread over processes (``python -m qstar.train``)."""

    #: an HF model path or directory, or "tiny" for a random tiny Mistral (qstar.tiny).
    model: str = "tiny"
    #: local .txt/.jsonl files or directories (comma-separated) or a datasets name.
    data: str = str(DEMO_CORPUS)
    text_field: str = "text"
    data_split: str = "train"
    output_dir: str = "runs/qstar"
    #: a checkpoint directory, an output directory, or "latest" (this output directory's latest).
    resume: str | None = None
    #: "auto" picks ddp under torchrun (WORLD_SIZE > 1) and none otherwise.
    distributed: str = "auto"
    #: --distributed fsdp2: "model" shards the whole model as one FSDP2 unit (the default), "layer"
    #: each decoder layer and the root as units (qstar.distributed.wrap_model says why "model").
    fsdp_unit: str = "model"
    report_to: list[str] = field(default_factory=list)
    device: str | None = None
    #: torch intra-op threads on the CPU (None: torch's default). The tiny model's ops are too small
    #: for threads: on a busy 2-core machine 2 OpenMP threads made a demo step 70x slower (31 s vs
    #: 0.43 s with 1 thread; 0.33 s vs 0.43 s when the machine is quiet), so tiny-demo uses 1.
    cpu_threads: int | None = None
    progress: bool = True
    plot: bool = True
    #: a fresh run into an output directory holding a previous run removes it (qstar.run_dir).
    overwrite: bool = False

    def validate(self) -> None:
        """Each field's type and range; the messages name the command-line flags."""
        for flag, name in (("--model", "model"), ("--data", "data"), ("--text-field", "text_field")):
            _check_text(flag, getattr(self, name))
        for flag, name in (("--data-split", "data_split"), ("--output-dir", "output_dir")):
            _check_text(flag, getattr(self, name))
        _check_text("--resume", self.resume, optional=True)
        _check_text("--device", self.device, optional=True)
        _check_choice("--distributed", self.distributed, DISTRIBUTED)
        _check_choice("--fsdp-unit", self.fsdp_unit, FSDP_UNITS)
        if self.cpu_threads is not None:
            _check_positive("--cpu-threads", self.cpu_threads, integer=True)
        if isinstance(self.report_to, str) or not isinstance(self.report_to, list | tuple):
            raise TypeError(f"--report-to must be a list of names, got {self.report_to!r}")
        for r in self.report_to:
            if r not in REPORTERS:
                raise ValueError(f"--report-to must name some of {REPORTERS}, got {r!r}")
        _check_bool("progress", self.progress)
        _check_bool("plot", self.plot)
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"--device {self.device!r}: not a device ({err})") from None
