"""Train a Quiet-STaR model: ``python -m qstar.train`` (or ``qstar-train``).

    python -m qstar.train --preset tiny-demo                      # the embedded demo, CPU, minutes
    python -m qstar.train --preset default --model PATH --data corpus.jsonl --output-dir runs/x
    torchrun --nproc-per-node 2 -m qstar.train --distributed ddp ...   # or fsdp2
    python -m qstar.train --resume latest --output-dir runs/x     # continue exactly
    python -m qstar.train ... --lora-r 16 --lora-alpha 32         # LoRA adapters (qstar.lora)

One optimizer step, read top to bottom in :func:`train`:

1. the sampler hands this rank its micro-batches of the step's global batch;
2. each micro-batch runs the objective (by default the whole Quiet-STaR forward: think, talk,
   learn) and backward, its loss divided by the number of accumulation steps (the model's loss is
   a mean over the micro-batch's tokens, so the step's loss is the mean of the micro-batch means:
   the authors' normalisation);
3. the gradient norm is clipped; if the loss or the norm is not finite on ANY rank, every rank skips
   the update (NaN/Inf guard) and the skip is logged and counted;
4. AdamW steps, the learning rate follows linear warmup then linear decay;
5. metrics go to the progress bar, ``metrics.csv`` (+ TensorBoard/wandb when asked), sample thoughts
   to ``thoughts.txt``; checkpoints are written atomically and resume exactly.

The objective is a parameter (:mod:`qstar.objective`); the rooms around the loop are
:mod:`qstar.loading` (the model), :mod:`qstar.distributed` (processes, DDP/FSDP2),
:mod:`qstar.checkpoint` (save and resume) and :mod:`qstar.metrics` (the CSV and the plot).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    adopt_checkpoint,
    load_trainer_state,
    read_trainer_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
)
from .cli import ArgumentParser, check_output_dir, run_cli
from .config import (
    DISTRIBUTED,
    FSDP_UNITS,
    PRECISIONS,
    PRESETS,
    QuietStarConfig,
    RunConfig,
    TrainingConfig,
    get_preset,
)
from .data import DEMO_CORPUS, GlobalBatchSampler
from .distributed import Dist, gradient_sync, meta_copy, setup_distributed, unwrap, wrap_model
from .faults import fault_point
from .interrupt import StopOnSignal
from .loading import build_model, check_model_arg
from .lora import add_lora, has_lora, trainable_parameters
from .metrics import MetricsWriter, csv_fields, plot_metrics, read_metrics
from .objective import NextTokenObjective, Objective, QuietStarObjective, non_finite
from .run_dir import claim_output_dir

log = logging.getLogger("qstar.train")


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


def _autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _setup(run: RunConfig) -> Dist:
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    dist = setup_distributed(run.distributed, run.device)
    if run.cpu_threads is not None and dist.device.type == "cpu":
        torch.set_num_threads(run.cpu_threads)
    return dist


def train(
    method: QuietStarConfig, training: TrainingConfig, run: RunConfig, objective: Objective | None = None
) -> TrainResult:
    """Train ``objective`` (default: :class:`~qstar.objective.QuietStarObjective`) to
    ``training.max_steps``, from scratch or from ``run.resume``.

    The run locks its output directory and refuses one holding a previous run unless resuming or
    ``run.overwrite`` (:mod:`qstar.run_dir`, ``OutputDirError``). SIGINT/SIGTERM stop it after the
    current step with a checkpoint (:mod:`qstar.interrupt`, ``TrainingInterrupted``)."""
    run.validate()
    objective = objective if objective is not None else QuietStarObjective()
    dist = _setup(run)
    with claim_output_dir(run, dist, objective.samples_file), StopOnSignal(dist) as stop:
        return _train(method, training, run, objective, dist, stop)


def _check_positions(model, training: TrainingConfig, method: QuietStarConfig) -> None:
    """The rollout's positions (a window, then one per thought and talk step) fit the model's."""
    limit = getattr(model.base_model.config, "max_position_embeddings", None)
    need = training.seq_len + method.n_thought_tokens + method.n_talk_tokens + 2
    if isinstance(limit, int) and need > limit:
        raise ValueError(
            f"--seq-len {training.seq_len}: with {method.n_thought_tokens} thought and "
            f"{method.n_talk_tokens} talk tokens the rollout needs {need} positions, the model has "
            f"{limit} (max_position_embeddings): give --seq-len {max(1, limit - need + training.seq_len)} "
            "or less"
        )


def _train(
    method: QuietStarConfig, training: TrainingConfig, run: RunConfig, objective: Objective, dist: Dist, stop
) -> TrainResult:
    out = Path(run.output_dir)
    checkpoint = resolve_checkpoint(run.resume, run.output_dir, dist) if run.resume else None  # verified
    if checkpoint is not None:  # the checkpoint's configs win; only max_steps may change
        saved = read_trainer_state(checkpoint)
        max_steps = training.max_steps
        training = TrainingConfig.from_dict(saved["training"])
        training.max_steps = max_steps
        method = QuietStarConfig.from_dict(saved["method"])
        trained_with = saved.get("objective", QuietStarObjective.name)
        if trained_with != objective.name:
            raise ValueError(
                f"--resume: {checkpoint} was trained with the objective {trained_with!r}, this run's is "
                f"{objective.name!r} (give the same --objective)"
            )
        del saved
    accum = accumulation_steps(training, dist.world_size)

    # Seeds: the same model on every rank; thought sampling differs per rank.
    random.seed(training.seed)
    torch.manual_seed(training.seed)
    model = build_model(run.model, method, training.seed, checkpoint)  # a LoRA checkpoint has its adapters
    if training.lora_r and not has_lora(model):
        add_lora(
            model, r=training.lora_r, alpha=training.lora_alpha, dropout=training.lora_dropout,
            target_modules=training.lora_target_modules, base=run.model, seed=training.seed,
        )  # fmt: skip
    _check_positions(model, training, method)
    tokenizer = getattr(model, "tokenizer", None)
    if training.precision == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to(dist.device)
    export_template = meta_copy(model) if dist.mode == "fsdp2" and dist.is_main else None
    model = wrap_model(
        model, dist, fsdp_unit=run.fsdp_unit, find_unused_parameters=objective.unused_parameters
    )
    optimizer, scheduler = build_optimizer(model, training, dist.device)
    generator = torch.Generator(dist.device).manual_seed(training.seed + 1 + dist.rank)

    if tokenizer is None:
        raise ValueError("the model has no tokenizer (model.tokenizer is None): the trainer needs one")
    rows = objective.dataset(run, training, tokenizer)  # {name: (N, ...)}
    n_rows = len(next(iter(rows.values())))
    sampler = GlobalBatchSampler(
        n_rows, training.batch_size, training.micro_batch_size,
        seed=training.seed, rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip

    step, skipped_total = 0, 0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint, model, optimizer, scheduler, dist, generator)
        step, skipped_total = state["step"], state["skipped_total"]
        sampler.load_state_dict(state["sampler"])
        if dist.is_main:
            log.info("resumed from %s at step %d", checkpoint, step)
            # A rollback: 'latest' names the checkpoint resumed from before the logs are cut back to
            # it, so a crash never leaves 'latest' at a later step than the logs.
            adopt_checkpoint(out, checkpoint)

    config_dump = {"method": method.to_dict(), "training": training.to_dict(), "run": dataclasses.asdict(run)}
    fields = csv_fields(objective.stat_names)
    writer = (
        MetricsWriter(out, step, run.report_to, config_dump, fields, objective.samples_file)
        if dist.is_main
        else None
    )
    if dist.is_main:
        n_params = trainable_parameters(unwrap(model))
        log.info(
            "%d windows of %d tokens; %d processes (%s), %d accumulation steps of %d sequences; %s params, "
            "%s trained", n_rows, training.seq_len, dist.world_size, dist.mode, accum,
            training.micro_batch_size, f"{n_params['total']:,}", f"{n_params['trainable']:,}",
        )  # fmt: skip

    from tqdm.auto import tqdm

    bar = tqdm(
        total=training.max_steps, initial=step, disable=not (dist.is_main and run.progress), desc="train"
    )
    history, consecutive, last_ckpt = [], 0, None
    params = [p for p in model.parameters() if p.requires_grad]
    stopping = stop.requested()  # a signal during the setup: no step
    while step < training.max_steps and not stopping:
        t0 = time.perf_counter()
        model.train()
        stats, n_tokens = [], 0
        for i, idx in enumerate(sampler.next_batch()):
            batch = {name: t[idx].to(dist.device) for name, t in rows.items()}  # (b, ...) each
            with gradient_sync(model, dist, i == accum - 1), _autocast(training.precision, dist.device):
                result = objective(model, batch, generator)
                (result.loss / accum).backward()
            stats.append(result.stats)
            n_tokens += result.n_tokens
        stats = torch.stack(stats).mean(0)  # means over this rank's micro-batches
        bad_parts = non_finite(objective.stat_names, stats, objective.guarded)

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

        row = {"step": step, "lr": lr, **dict(zip(objective.stat_names, stats.tolist()))}
        row.update(grad_norm=grad_norm, tokens_per_s=flags[1].item() / (time.perf_counter() - t0))
        row.update(skipped=int(skip), skipped_total=skipped_total)
        history.append(row)
        bar.update(1)
        bar.set_postfix(**objective.postfix(row))

        if dist.is_main and (step % training.log_every == 0 or step in (1, training.max_steps) or skip):
            writer.write(row)
            bar.write(
                f"step {step}/{training.max_steps} | {objective.summary(row)} | lr {lr:.3g} | "
                f"|g| {grad_norm:.3g} | {row['tokens_per_s']:.0f} tok/s | skipped {skipped_total}"
            )
            samples = objective.samples(result, batch, tokenizer, training.log_sample_thoughts)
            for t in samples:
                bar.write(f"  {objective.sample_label} {t}")
            writer.write_samples(step, samples)
        del result

        stopping = stop.requested()  # SIGINT/SIGTERM: save this step and stop
        if step % training.save_every == 0 or step == training.max_steps or stopping:
            fault_point("save")
            state = {
                "step": step,
                "skipped_total": skipped_total,
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "world_size": dist.world_size,
                "rng": rng_state(generator),
                "training": training.to_dict(),
                "method": method.to_dict(),
                "run": dataclasses.asdict(run),
                "objective": objective.name,
            }
            last_ckpt = save_checkpoint(out, step, state, model, optimizer, dist, export_template)
            stopping = stopping or stop.requested()  # a signal during the save: this step is saved
    bar.close()

    if dist.is_main:
        writer.close()
        if run.plot and writer.path.is_file() and read_metrics(writer.path):
            title = f"{objective.name}: {run.model} on {Path(run.data).name}"
            png = plot_metrics(writer.path, out / "metrics.png", title=title, panels=objective.panels)
            log.info("wrote %s and %s", writer.path, png)
    dist.barrier()
    if stopping:
        stop.exit(step, last_ckpt, resumable=(out / "latest").is_file())  # raises TrainingInterrupted
    return TrainResult(out, step, skipped_total, history, last_ckpt)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

#: ``--objective``: what the loop optimises (:mod:`qstar.objective`).
OBJECTIVES = {"quietstar": QuietStarObjective, "next-token": NextTokenObjective}

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
    "lora_r": ("training", "lora_r", int),
    "lora_alpha": ("training", "lora_alpha", float),
    "lora_dropout": ("training", "lora_dropout", float),
    "lora_target_modules": ("training", "lora_target_modules", str),
}


def parse_args(argv=None):
    p = ArgumentParser(
        prog="qstar-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="default: default")
    p.add_argument("--model", default=None, help="HF model path/directory, a .gguf file, 'smollm2', or "
                   "'tiny' (tiny-demo's default)")  # fmt: skip
    p.add_argument("--data", default=None, help=".txt/.jsonl files or directories (comma-separated), or a "
                   "datasets name; default: the shipped word problems ('word-problems'), or with the tiny "
                   "model the shipped arithmetic corpus")  # fmt: skip
    p.add_argument("--text-field", default="text", help="the text field of .jsonl records / dataset rows")
    p.add_argument("--data-split", default="train", help="the split of a datasets name")
    p.add_argument("--output-dir", default=None, help="default: runs/<preset>")
    p.add_argument("--resume", default=None, help="'latest', a checkpoint dir, or an output dir")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds "
                   "a previous run: remove its checkpoints and logs first")  # fmt: skip
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
    p.add_argument("--objective", default="quietstar", choices=sorted(OBJECTIVES),
                   help="quietstar (default) or next-token: a fine-tune without thoughts")  # fmt: skip
    for name, (_, _, typ) in OVERRIDES.items():
        kw = {"choices": PRECISIONS} if name == "precision" else {}
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, **kw)
    return p.parse_args(argv)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def configs_from_args(args) -> tuple[QuietStarConfig, TrainingConfig, RunConfig]:
    """The three configs of parsed ``args``: the preset, with the given flags on top. Every value
    is checked here (by the configs' ``validate``); an error names the flag."""
    preset = get_preset(args.preset)
    method, training = preset.method, preset.training
    changes = {"method": {}, "training": {}}
    for name, (which, fld, _) in OVERRIDES.items():
        value = getattr(args, name)
        if value is not None:
            changes[which][fld] = value
    if args.gradient_checkpointing:
        changes["method"]["gradient_checkpointing"] = True
    flags = {fld: _flag(name) for name, (_, fld, _) in OVERRIDES.items()}
    try:
        method = dataclasses.replace(method, **changes["method"])  # validates
        training = dataclasses.replace(training, **changes["training"])
    except (TypeError, ValueError) as err:  # "learning_rate must be ..." -> "--lr: learning_rate must be ..."
        field_name = str(err).split(" ", 1)[0]
        if field_name in flags and field_name in {**changes["method"], **changes["training"]}:
            raise type(err)(f"{flags[field_name]}: {err}") from None
        raise
    if training.seq_len < method.n_talk_tokens + 2:
        raise ValueError(
            f"--seq-len ({training.seq_len}) must be at least --n-talk-tokens + 2 "
            f"({method.n_talk_tokens} + 2): a reward needs a full talk window"
        )
    if args.model is None and args.preset != "tiny-demo" and args.resume is None:
        raise ValueError(
            f"--model is required with --preset {args.preset} (an HF path or directory, a .gguf file, "
            "'smollm2' or 'tiny')"
        )
    tiny_threads = 1 if args.preset == "tiny-demo" else None
    run = RunConfig(
        model=args.model or "tiny",
        data=args.data or (str(DEMO_CORPUS) if args.model in (None, "tiny") else "word-problems"),
        text_field=args.text_field,
        data_split=args.data_split,
        output_dir=args.output_dir or f"runs/{args.preset}",
        resume=args.resume,
        distributed=args.distributed,
        fsdp_unit=args.fsdp_unit,
        report_to=[r.strip() for r in args.report_to.split(",") if r.strip()],
        device=args.device,
        cpu_threads=args.cpu_threads if args.cpu_threads is not None else tiny_threads,
        progress=not args.no_progress,
        plot=not args.no_plot,
        overwrite=args.overwrite,
    )
    run.validate()
    check_output_dir("--output-dir", run.output_dir)
    if run.resume is None:
        check_model_arg(run.model)  # a missing directory fails here, before the output dir is made
    return method, training, run


#: the configs a checkpoint keeps as JSON beside its trainer state (``<name>_config.json``).
CONFIG_FILES = ("training", "method", "run")


def saved_configs(run: RunConfig) -> tuple[Path, dict] | None:
    """On ``--resume``: the checkpoint's path and its ``{training,method,run}_config.json`` (JSON
    only); None when they cannot be found (the resume itself then reports what is wrong)."""
    path = Path(run.output_dir) if run.resume == "latest" else Path(run.resume)
    try:
        if (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()
        return path, {
            which: json.loads((path / f"{which}_config.json").read_text()) for which in CONFIG_FILES
        }
    except (OSError, ValueError):
        return None


def resume_overrides(args, found: tuple[Path, dict] | None) -> list[str]:
    """On ``--resume``: one warning per given flag that the checkpoint's saved configuration
    (``found``, from :func:`saved_configs`) overrides (every ``TrainingConfig`` and
    ``QuietStarConfig`` flag but ``--max-steps``, and ``--model``: the weights come from the
    checkpoint); empty when it could not be read (the resume itself then reports what is wrong)."""
    if found is None:
        return []
    path, saved = found
    given = {name: (which, fld, getattr(args, name)) for name, (which, fld, _) in OVERRIDES.items()}
    given.pop("max_steps")
    if args.gradient_checkpointing:
        given["gradient_checkpointing"] = ("method", "gradient_checkpointing", True)
    if args.model is not None:
        given["model"] = ("run", "model", args.model)
    lines = []
    for name, (which, fld, value) in given.items():
        if value is None or fld not in saved[which]:
            continue
        old = saved[which][fld]
        if value != old:
            lines.append(
                f"{_flag(name)} {value!r} is ignored: resuming from {path} uses the checkpoint's "
                f"{fld} = {old!r}"
            )
    return lines


def main(argv=None) -> TrainResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    method, training, run = configs_from_args(args)
    if run.resume is not None:
        found = saved_configs(run)
        for line in resume_overrides(args, found):
            log.warning("%s", line)
        if args.data is None and found is not None and isinstance(found[1]["run"].get("data"), str):
            run.data = found[1]["run"]["data"]  # the default --data of a resume is the run's own
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return train(method, training, run, OBJECTIVES[args.objective]())
    finally:
        if owns_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    """The ``qstar-train`` console script: exit status 0 on success; an error is one line on stderr
    with exit status 2 (bad input) or 1 (anything else), see :mod:`qstar.cli`."""
    return run_cli("qstar-train", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
