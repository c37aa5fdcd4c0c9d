"""Train a Quiet-STaR model: ``python -m qstar.train`` (or ``qstar-train``).

    python -m qstar.train --preset tiny-demo                      # the embedded demo, CPU, minutes
    python -m qstar.train --preset default --model PATH --data corpus.jsonl --output-dir runs/x
    torchrun --nproc-per-node 2 -m qstar.train --distributed ddp ...   # or fsdp2
    python -m qstar.train --resume latest --output-dir runs/x     # continue exactly

One optimizer step, read top to bottom in :func:`train`:

1. the sampler hands this rank its micro-batches of the step's global batch;
2. each micro-batch runs the whole Quiet-STaR forward (think, talk, learn) and backward, its loss
   divided by the number of accumulation steps (the model's loss is a mean over the micro-batch's
   tokens, so the step's loss is the mean of the micro-batch means: the authors' normalisation);
3. the gradient norm is clipped; if the loss or the norm is not finite on ANY rank, every rank skips
   the update (NaN/Inf guard) and the skip is logged and counted;
4. AdamW steps, the learning rate follows linear warmup then linear decay;
5. metrics go to the progress bar, ``metrics.csv`` (+ TensorBoard/wandb when asked), sample thoughts
   to ``thoughts.txt``; checkpoints are written atomically and resume exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qstar.config import PRECISIONS, QuietStarConfig, TrainingConfig, get_preset
from qstar.data import DEMO_CORPUS, GlobalBatchSampler, load_documents, make_windows

log = logging.getLogger("qstar.train")

DISTRIBUTED = ("auto", "none", "ddp", "fsdp2")
FSDP_UNITS = ("layer", "model")
REPORTERS = ("tensorboard", "wandb")
CSV_FIELDS = [
    "step", "lr", "loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "reward_std",
    "reward_max", "advantage_mean", "advantage_positive", "mixing_weight_mean", "mixing_weight_std",
    "grad_norm", "tokens_per_s", "skipped", "skipped_total",
]  # fmt: skip


@dataclass
class RunConfig:
    """Where the run reads and writes, and how it is spread over processes."""

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
    #: --distributed fsdp2: "layer" shards each decoder layer and the root as FSDP2 units (the
    #: default), "model" the whole model as one unit.
    fsdp_unit: str = "model"
    report_to: list[str] = field(default_factory=list)
    device: str | None = None
    #: torch intra-op threads on the CPU (None: torch's default). The tiny model's ops are too small
    #: for threads: on a busy 2-core machine 2 OpenMP threads made a demo step 70x slower (31 s vs
    #: 0.43 s with 1 thread; 0.33 s vs 0.43 s when the machine is quiet), so tiny-demo uses 1.
    cpu_threads: int | None = None
    progress: bool = True
    plot: bool = True

    def validate(self) -> None:
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"--distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if self.fsdp_unit not in FSDP_UNITS:
            raise ValueError(f"--fsdp-unit must be one of {FSDP_UNITS}, got {self.fsdp_unit!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be >= 1, got {self.cpu_threads}")
        for r in self.report_to:
            if r not in REPORTERS:
                raise ValueError(f"--report-to must name some of {REPORTERS}, got {r!r}")


# --------------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    mode: str  # "none" | "ddp" | "fsdp2"
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.mode != "none":
            torch.distributed.barrier()


def setup_distributed(mode: str, device: str | None) -> Dist:
    """Initialise the process group under torchrun (nccl on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ValueError(f"--distributed none, but WORLD_SIZE={world}: use ddp or fsdp2 under torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if mode == "none":
        return Dist("none", 0, 1, dev)
    if not torch.distributed.is_initialized():
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(mode, torch.distributed.get_rank(), torch.distributed.get_world_size(), dev)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def build_model(run: RunConfig, method: QuietStarConfig, seed: int, checkpoint: Path | None = None):
    """A ``QuietStarForCausalLM``: from a checkpoint, from an HF model, or the tiny random Mistral."""
    from qstar.model import QuietStarForCausalLM as cls

    if checkpoint is not None:
        return cls.from_pretrained(str(checkpoint / "model"))
    if run.model == "tiny":
        from qstar.tiny import tiny_mistral, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_mistral(len(tokenizer), seed=seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(run.model).exists() and os.environ.get("HF_HUB_OFFLINE"):
            log.warning(
                "--model %r is not a local directory; offline, only the local cache is read", run.model
            )
        tokenizer = AutoTokenizer.from_pretrained(run.model)
        base = AutoModelForCausalLM.from_pretrained(
            run.model, dtype=torch.float32, attn_implementation="sdpa"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new heads' initialisation does not depend on the caller
        return cls.from_base(base, tokenizer, method)


def wrap_model(model, dist: Dist, *, find_unused_parameters: bool = False, fsdp_unit: str = "model"):
    """DDP, or FSDP2 (``fully_shard`` on the whole model as one unit, or per decoder layer and on
    the root with ``fsdp_unit="layer"``; see below)."""
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if dist.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # "layer": each decoder layer is a unit (its parameters are gathered for its call and freed
        # after it, in the forward and again in the backward), and the root holds the rest
        # (embeddings, heads, final norm). Each layer runs once per rollout step, so a micro-batch
        # all-gathers each layer once per step in the forward and once per step in the backward.
        # Its gradient is reduce-scattered once: autograd sums a parameter's uses and accumulates
        # it once, and on the engine's ready queue (later-created nodes first) that happens before
        # the layer's last post-backward, step 0's. FSDP2 unshards a layer in the backward from
        # hooks on its outputs, but the KV cache carries gradient into the key/value projections
        # outside them (later steps read step a's keys; the last layer's output at the step after
        # the last thought token gets no gradient at all), so on its own the k/v backward meets
        # freed parameter storage; _unshard_before_kv_backward gathers the layer's parameters in
        # the backward of its key/value projections' outputs.
        # "model": the whole model is one unit, gathered once per micro-batch and held through its
        # backward, one reduce-scatter: more memory, far less communication.
        # tests/test_train_distributed.py checks both against one process's gradients, with and
        # without gradient checkpointing. "model" is the default: "layer"'s single reduce-scatter
        # rests on the autograd engine's node order, which no API promises; a change there would
        # drop gradient contributions silently.
        if fsdp_unit not in FSDP_UNITS:
            raise ValueError(f"fsdp_unit must be one of {FSDP_UNITS}, got {fsdp_unit!r}")
        if fsdp_unit == "layer":
            for layer in model.decoder.layers:
                fully_shard(layer)
                _unshard_before_kv_backward(layer)
        fully_shard(model)
    return model


class _UnshardInBackward(torch.autograd.Function):
    """Identity; its backward all-gathers ``module``'s parameters (FSDP2 ``unshard``, a no-op when
    they are gathered). On a projection's output it runs just before the projection's backward:
    no node created between the two (no other call's post-backward reshard) can run in between."""

    @staticmethod
    def forward(ctx, module, x):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.module.unshard()
        return None, grad


def _unshard_before_kv_backward(layer) -> None:
    """Gather ``layer``'s parameters before the backward of its key/value projections."""
    names = [n for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in _KV_PROJECTIONS]
    if not names:
        raise ValueError(
            f"no key/value projection ({', '.join(_KV_PROJECTIONS)}) in {type(layer).__name__}; "
            "use --fsdp-unit model"
        )

    def hook(module, args, output):
        if torch.is_grad_enabled() and output.requires_grad:
            return _UnshardInBackward.apply(layer, output)
        return output

    for n in names:
        layer.get_submodule(n).register_forward_hook(hook)


_KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj")


def _meta_copy(model):
    """A copy of ``model`` with every parameter and buffer on the meta device, made without copying
    any data (for exporting an FSDP2-sharded model with ``save_pretrained``)."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "base_model") else model


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------


def lr_lambda(training: TrainingConfig):
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then linear decay to 0 over
    ``decay_steps`` (or constant when it is None). Optimizer step s (from 0) uses lr * f(s)."""
    warmup, decay = training.warmup_steps, training.decay_steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay is None:
            return 1.0
        return max(0.0, 1.0 - (step - warmup) / decay)

    return f


def build_optimizer(model, training: TrainingConfig, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=training.learning_rate,
        betas=training.adam_betas,
        eps=training.adam_eps,
        weight_decay=training.weight_decay,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(training))
    return optimizer, scheduler


def accumulation_steps(training: TrainingConfig, world_size: int) -> int:
    per_step = training.micro_batch_size * world_size
    if training.batch_size % per_step:
        raise ValueError(
            f"--batch-size ({training.batch_size}) must be a multiple of --micro-batch-size x processes "
            f"({training.micro_batch_size} x {world_size} = {per_step})"
        )
    return training.batch_size // per_step


# --------------------------------------------------------------------------------------------------
# Checkpoints: written into a temporary directory, then renamed into place (atomic)
# --------------------------------------------------------------------------------------------------


def _rng_state(generator: torch.Generator) -> dict:
    """Python's, torch's (CPU and CUDA) and the thought-sampling generator's; numpy is not used."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "sampling": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampling"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _full_state_dicts(model, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def save_checkpoint(out: Path, step: int, state: dict, model, optimizer, dist: Dist, export_template) -> Path:
    """``<out>/checkpoint-<step>/``: ``model/`` (save_pretrained), ``trainer_state.pt`` (optimizer,
    scheduler, counters, data position, configs), ``rng_state_<rank>.pt``; then ``<out>/latest``."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    model_sd, optim_sd = _full_state_dicts(model, optimizer)  # every rank takes part
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(state.pop("rng"), tmp / f"rng_state_{dist.rank}.pt")
    if dist.is_main:
        if export_template is None:
            unwrap(model).save_pretrained(str(tmp / "model"))
        else:  # FSDP2: the parameters are sharded; fill an unsharded copy on this rank only
            export = export_template.to_empty(device="cpu")
            export.load_state_dict(model_sd)
            export.save_pretrained(str(tmp / "model"))
            export.to("meta")
        torch.save({**state, "optimizer": optim_sd}, tmp / "trainer_state.pt")
        for name in ("training", "method", "run"):
            (tmp / f"{name}_config.json").write_text(json.dumps(state[name], indent=2, sort_keys=True) + "\n")
    dist.barrier()
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(out / "latest", final.name + "\n")
    dist.barrier()
    return final


def resolve_checkpoint(resume: str, output_dir: str) -> Path:
    """``latest`` -> ``<output_dir>/latest``'s target; an output directory -> its latest; else the path."""
    path = Path(output_dir) if resume == "latest" else Path(resume)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise ValueError(
            f"--resume {resume!r}: expected a checkpoint directory (with trainer_state.pt) or an output "
            f"directory with a 'latest' file, got {str(path)!r}"
        )
    return path


def load_trainer_state(checkpoint: Path, model, optimizer, scheduler, dist: Dist, generator) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    scheduler.load_state_dict(state["scheduler"])
    rng_file = checkpoint / f"rng_state_{dist.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False), generator)
    else:
        log.warning(
            "%s not found (saved with fewer processes?): fresh RNG streams on rank %d", rng_file, dist.rank
        )
    return state


# --------------------------------------------------------------------------------------------------
# Metrics, sample thoughts, plot
# --------------------------------------------------------------------------------------------------


def _batch_stats(out) -> torch.Tensor:
    """The logged statistics of one forward, as a float64 vector (order of STAT_NAMES)."""
    f = lambda t: t.detach().double()  # noqa: E731
    rewards, adv, w = f(out.rewards), f(out.advantages), f(out.mixing_weights)
    return torch.stack([
        f(out.loss), f(out.base_nll), f(out.talk_nll).mean(), f(out.policy_loss),
        rewards.mean(), rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()), rewards.max(),
        adv.mean(), (adv > 0).double().mean(), w.mean(), w.std() if w.numel() > 1 else w.new_zeros(()),
    ]).cpu()  # fmt: skip


STAT_NAMES = [
    "loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "reward_std", "reward_max",
    "advantage_mean", "advantage_positive", "mixing_weight_mean", "mixing_weight_std",
]  # fmt: skip
LOSS_PARTS = ("loss", "base_nll", "talk_nll", "policy_loss")


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


class MetricsWriter:
    """``metrics.csv`` (rewritten up to the resume step, then appended), TensorBoard, wandb."""

    def __init__(self, out: Path, start_step: int, report_to: list[str], config: dict):
        self.path = out / "metrics.csv"
        rows = []
        if start_step > 0 and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("--report-to tensorboard, but tensorboard is not installed") from err
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("--report-to wandb, but wandb is not installed") from err
            self.wandb = wandb.init(project="qstar", dir=str(out), config=config, resume="allow")

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def plot_metrics(csv_path: Path, png_path: Path, title: str = "") -> Path:
    """Base and talk NLL, the total loss, the reward and the mixing weight over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for key in ("base_nll", "talk_nll"):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_title("NLL (nats/token)")
    axes[0].legend()
    axes[1].plot(steps, [r["loss"] for r in rows])
    axes[1].set_title("total loss (NLL + policy weight x policy loss)")
    axes[2].plot(steps, [r["reward_mean"] for r in rows], label="mean")
    axes[2].plot(steps, [r["reward_max"] for r in rows], label="max", alpha=0.5)
    axes[2].set_title("reward (talk log-prob gain over the base)")
    axes[2].legend()
    axes[3].plot(steps, [r["mixing_weight_mean"] for r in rows])
    axes[3].set_title("mixing weight (mean)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    skipped: int
    history: list[dict]  # one dict per optimizer step of this run (all ranks' means)
    checkpoint: Path | None


def _grad_sync(model, dist: Dist, sync: bool):
    """No gradient all-reduce on the accumulation micro-batches before the last."""
    if dist.mode == "ddp" and not sync:
        return model.no_sync()
    if dist.mode == "fsdp2":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _non_finite_parts(stats: torch.Tensor) -> list[str]:
    return [name for name, v in zip(LOSS_PARTS, stats[: len(LOSS_PARTS)].tolist()) if not math.isfinite(v)]


def train(method: QuietStarConfig, training: TrainingConfig, run: RunConfig) -> TrainResult:
    run.validate()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    dist = setup_distributed(run.distributed, run.device)
    if run.cpu_threads is not None and dist.device.type == "cpu":
        torch.set_num_threads(run.cpu_threads)
    out = Path(run.output_dir)
    checkpoint = resolve_checkpoint(run.resume, run.output_dir) if run.resume else None
    if checkpoint is not None:  # the checkpoint's configs win; only max_steps may change
        saved = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
        max_steps = training.max_steps
        training = TrainingConfig.from_dict(saved["training"])
        training.max_steps = max_steps
        method = QuietStarConfig.from_dict(saved["method"])
        del saved
    accum = accumulation_steps(training, dist.world_size)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # Seeds: the same model on every rank; thought sampling differs per rank.
    random.seed(training.seed)
    torch.manual_seed(training.seed)
    model = build_model(run, method, training.seed, checkpoint)
    tokenizer = getattr(model, "tokenizer", None)
    if training.precision == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to(dist.device)
    export_template = _meta_copy(model) if dist.mode == "fsdp2" and dist.is_main else None
    model = wrap_model(model, dist, fsdp_unit=run.fsdp_unit)
    optimizer, scheduler = build_optimizer(model, training, dist.device)
    generator = torch.Generator(dist.device).manual_seed(training.seed + 1 + dist.rank)

    documents = load_documents(run.data, text_field=run.text_field, split=run.data_split)
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (model.tokenizer is None): the trainer needs one")
    windows = make_windows(documents, tokenizer, training.seq_len, training.seed)
    sampler = GlobalBatchSampler(
        len(windows), training.batch_size, training.micro_batch_size,
        seed=training.seed, rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip

    step, skipped_total = 0, 0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint, model, optimizer, scheduler, dist, generator)
        step, skipped_total = state["step"], state["skipped_total"]
        sampler.load_state_dict(state["sampler"])
        if dist.is_main:
            log.info("resumed from %s at step %d", checkpoint, step)

    config_dump = {"method": method.to_dict(), "training": training.to_dict(), "run": dataclasses.asdict(run)}
    writer = MetricsWriter(out, step, run.report_to, config_dump) if dist.is_main else None
    if dist.is_main:
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        log.info(
            "%d windows of %d tokens; %d processes (%s), %d accumulation steps of %d sequences; %s params",
            len(windows), training.seq_len, dist.world_size, dist.mode, accum, training.micro_batch_size,
            f"{n_params:,}",
        )  # fmt: skip

    from tqdm.auto import tqdm

    bar = tqdm(
        total=training.max_steps, initial=step, disable=not (dist.is_main and run.progress), desc="train"
    )
    history, consecutive, last_ckpt = [], 0, None
    params = [p for p in model.parameters() if p.requires_grad]
    while step < training.max_steps:
        t0 = time.perf_counter()
        model.train()
        stats, n_tokens = [], 0
        for i, idx in enumerate(sampler.next_batch()):
            input_ids = windows.input_ids[idx].to(dist.device)  # (b, L)
            attention_mask = windows.attention_mask[idx].to(dist.device)
            with _grad_sync(model, dist, i == accum - 1), _autocast(training.precision, dist.device):
                out_ = model(input_ids, attention_mask=attention_mask, generator=generator)
                (out_.loss / accum).backward()
            stats.append(_batch_stats(out_))
            n_tokens += int(attention_mask.sum())
            last_out, last_ids, last_mask = out_, input_ids, attention_mask
        stats = torch.stack(stats).mean(0)  # means over this rank's micro-batches
        bad_parts = _non_finite_parts(stats)

        max_norm = training.max_grad_norm if training.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            bad_parts.append("grad_norm")

        # All ranks agree on skipping, and log the mean statistics of all ranks.
        flags = torch.tensor([float(bool(bad_parts)), float(n_tokens)], dtype=torch.float64)
        if dist.mode != "none":
            torch.distributed.all_reduce(stats)
            torch.distributed.all_reduce(flags)
            stats /= dist.world_size
        skip = flags[0].item() > 0
        if skip:
            skipped_total += 1
            consecutive += 1
            log.warning(
                "step %d: non-finite %s on %s; the update is skipped (%d in a row, %d in all)",
                step + 1, ", ".join(bad_parts) or "values", "this rank" if bad_parts else "another rank",
                consecutive, skipped_total,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            if consecutive >= training.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"{consecutive} consecutive steps (up to step {step + 1}) had a non-finite loss or "
                    f"gradient norm (max_consecutive_skips={training.max_consecutive_skips}); stopping"
                )
        else:
            consecutive = 0
            optimizer.step()
        lr = scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # after a skipped first step torch warns of the order
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()  # the schedule follows the step count, skipped steps included
        optimizer.zero_grad(set_to_none=True)
        step += 1

        row = {"step": step, "lr": lr, **dict(zip(STAT_NAMES, stats.tolist()))}
        row.update(grad_norm=grad_norm, tokens_per_s=flags[1].item() / (time.perf_counter() - t0))
        row.update(skipped=int(skip), skipped_total=skipped_total)
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", w=f"{row['mixing_weight_mean']:+.3f}")

        if dist.is_main and (step % training.log_every == 0 or step in (1, training.max_steps) or skip):
            writer.write(row)
            line = (
                f"step {step}/{training.max_steps} | loss {row['loss']:.4f} | base {row['base_nll']:.4f} "
                f"| talk {row['talk_nll']:.4f} | policy {row['policy_loss']:.3g} | reward "
                f"{row['reward_mean']:+.4f} | w {row['mixing_weight_mean']:+.4f} | lr {lr:.3g} | "
                f"|g| {grad_norm:.3g} | {row['tokens_per_s']:.0f} tok/s | skipped {skipped_total}"
            )
            thoughts = sample_thoughts(last_out, last_ids, last_mask, tokenizer, training.log_sample_thoughts)
            bar.write(line)
            for t in thoughts:
                bar.write("  thought " + t)
            with (out / "thoughts.txt").open("a") as f:
                f.write("\n".join([f"step {step}"] + thoughts) + "\n")
        del last_out

        if step % training.save_every == 0 or step == training.max_steps:
            state = {
                "step": step,
                "skipped_total": skipped_total,
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "world_size": dist.world_size,
                "rng": _rng_state(generator),
                "training": training.to_dict(),
                "method": method.to_dict(),
                "run": dataclasses.asdict(run),
            }
            last_ckpt = save_checkpoint(out, step, state, model, optimizer, dist, export_template)
    bar.close()

    if dist.is_main:
        writer.close()
        if run.plot and writer.path.is_file() and read_metrics(writer.path):
            png = plot_metrics(
                writer.path, out / "metrics.png", title=f"Quiet-STaR: {run.model} on {Path(run.data).name}"
            )
            log.info("wrote %s and %s", writer.path, png)
    dist.barrier()
    return TrainResult(out, step, skipped_total, history, last_ckpt)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

#: CLI flag -> (config, field, type). Given flags override the preset.
OVERRIDES = {
    "lr": ("training", "learning_rate", float),
    "weight_decay": ("training", "weight_decay", float),
    "warmup_steps": ("training", "warmup_steps", int),
    "max_grad_norm": ("training", "max_grad_norm", float),
    "batch_size": ("training", "batch_size", int),
    "micro_batch_size": ("training", "micro_batch_size", int),
    "max_steps": ("training", "max_steps", int),
    "seq_len": ("training", "seq_len", int),
    "precision": ("training", "precision", str),
    "seed": ("training", "seed", int),
    "log_every": ("training", "log_every", int),
    "save_every": ("training", "save_every", int),
    "log_sample_thoughts": ("training", "log_sample_thoughts", int),
    "max_consecutive_skips": ("training", "max_consecutive_skips", int),
    "n_thought_tokens": ("method", "n_thought_tokens", int),
    "n_talk_tokens": ("method", "n_talk_tokens", int),
    "n_rationales": ("method", "n_rationales", int),
    "policy_loss_weight": ("method", "policy_loss_weight", float),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="qstar-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="default", help="paper | default | tiny-demo (default: default)")
    p.add_argument("--model", default=None, help="HF model path/directory, or 'tiny' (tiny-demo's default)")
    p.add_argument("--data", default=None, help=".txt/.jsonl files or directories (comma-separated), or a "
                   "datasets name; default: the shipped arithmetic corpus")  # fmt: skip
    p.add_argument("--text-field", default="text", help="the text field of .jsonl records / dataset rows")
    p.add_argument("--data-split", default="train", help="the split of a datasets name")
    p.add_argument("--output-dir", default=None, help="default: runs/<preset>")
    p.add_argument("--resume", default=None, help="'latest', a checkpoint dir, or an output dir")
    p.add_argument("--distributed", default="auto", choices=DISTRIBUTED)
    p.add_argument(
        "--fsdp-unit",
        default="model",
        choices=FSDP_UNITS,
        help="fsdp2 units: model (one unit, the default) or layer (per decoder layer + root)",
    )
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads on the CPU (tiny-demo: 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each rollout step")
    p.add_argument("--report-to", default="", help="comma-separated: tensorboard, wandb")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no metrics.png at the end")
    for name, (_, _, typ) in OVERRIDES.items():
        kw = {"choices": PRECISIONS} if name == "precision" else {}
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, **kw)
    return p.parse_args(argv)


def configs_from_args(args) -> tuple[QuietStarConfig, TrainingConfig, RunConfig]:
    preset = get_preset(args.preset)
    method, training = preset.method, preset.training
    changes = {"method": {}, "training": {}}
    for name, (which, fld, _) in OVERRIDES.items():
        value = getattr(args, name)
        if value is not None:
            changes[which][fld] = value
    if args.gradient_checkpointing:
        changes["method"]["gradient_checkpointing"] = True
    method = dataclasses.replace(method, **changes["method"])  # validates
    training = dataclasses.replace(training, **changes["training"])
    if args.model is None and args.preset != "tiny-demo" and args.resume is None:
        raise ValueError(
            f"--model is required with --preset {args.preset} (an HF path or directory, or 'tiny')"
        )
    run = RunConfig(
        model=args.model or "tiny",
        data=args.data or str(DEMO_CORPUS),
        text_field=args.text_field,
        data_split=args.data_split,
        output_dir=args.output_dir or f"runs/{args.preset}",
        resume=args.resume,
        distributed=args.distributed,
        fsdp_unit=args.fsdp_unit,
        report_to=[r.strip() for r in args.report_to.split(",") if r.strip()],
        device=args.device,
        cpu_threads=args.cpu_threads or (1 if args.preset == "tiny-demo" else None),
        progress=not args.no_progress,
        plot=not args.no_plot,
    )
    run.validate()
    return method, training, run


def main(argv=None) -> TrainResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    method, training, run = configs_from_args(args)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return train(method, training, run)
    finally:
        if owns_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cli() -> int:
    """The ``qstar-train`` console script: exit status 0 on success (``main`` returns the result)."""
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
