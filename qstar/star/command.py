"""The STaR loop from the command line: ``qstar-star`` (or ``python -m qstar.star``).

    qstar-star --model tiny --iterations 2 --output-dir runs/star          # the shipped word problems
    qstar-star --model smollm2 --ops 1 --train-size 200 --output-dir runs/star-smollm2
    qstar-star --model path/to/hf-model --task gsm8k --train train.jsonl --heldout test.jsonl
    qstar-star --model path/to/hf-model --task csqa --train train.jsonl --heldout dev.jsonl
    qstar-star --output-dir runs/star --resume                             # continue after a crash
    qstar-star ... --method direct                # the baseline: fine-tune on answers alone

Writes ``report.csv``, ``report.json`` and ``accuracy.png`` (accuracy per iteration), every sample
(``iteration-<n>/samples.jsonl``) and a trainer checkpoint per iteration (``iteration-<n>/train``);
``docs/star.md`` describes them. Errors are one line on stderr (exit status 2 for bad input).
"""

from __future__ import annotations

import argparse
import logging

from ..cli import ArgumentParser, check_output_dir, run_cli
from .config import METHODS, StarConfig
from .loop import run_star
from .tasks import TASKS

__all__ = ["cli", "main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
    d = StarConfig()
    p = ArgumentParser(
        prog="qstar-star", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a(
        "--model",
        default=d.model,
        help="'tiny', 'smollm2', a .gguf file or an HF model directory/name (default: tiny)",
    )
    a("--task", default=d.task, choices=TASKS, help="default: word-problems (the shipped corpus)")
    a(
        "--train",
        help="training problems, a JSONL file (gsm8k: question/answer; csqa: question/choices/answerKey)",
    )
    a("--heldout", help="held-out problems, a JSONL file of the same format")
    a(
        "--exemplars-file",
        help="few-shot exemplars (JSONL; csqa: with a 'rationale' field); default: the "
        "first training records (gsm8k), or the shipped ones (csqa)",
    )
    a("--exemplars", dest="n_exemplars", type=int, help="number of few-shot exemplars (default 4; csqa 3)")
    a("--train-size", type=int, help="use the first N training problems (default: all)")
    a("--heldout-size", type=int, help="use the first N held-out problems (default: all)")
    a("--ops", default="1,2,3", help="word problems: the allowed numbers of operations (default 1,2,3)")
    a(
        "--templates",
        help="word problems: only these templates, comma-separated (e.g. place_donation,age_future)",
    )
    a(
        "--no-start-eval",
        dest="evaluate_start",
        action="store_false",
        help="skip evaluating the starting model",
    )
    a("--output-dir", default=d.output_dir, help=f"default: {d.output_dir}")
    a(
        "--method",
        default=d.method,
        choices=METHODS,
        help="star (default) or direct: one fine-tune on the answers alone (the no-rationale baseline)",
    )
    a("--iterations", type=int, default=d.iterations, help=f"outer iterations (default {d.iterations})")
    a("--no-rationalization", dest="rationalization", action="store_false", help="skip rationalization")
    a("--samples", type=int, default=d.samples, help=f"rationales per training problem (default {d.samples})")
    a(
        "--rationalization-samples",
        type=int,
        default=d.rationalization_samples,
        help=f"rationalizations per unsolved problem (default {d.rationalization_samples})",
    )
    a("--temperature", type=float, default=d.temperature, help=f"default {d.temperature}")
    a("--top-p", type=float, default=d.top_p, help=f"default {d.top_p}")
    a(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"per completion (default {d.max_new_tokens})",
    )
    a(
        "--majority-samples",
        type=int,
        default=d.majority_samples,
        help=f"held-out majority vote over N samples; 0: greedy only (default {d.majority_samples})",
    )
    a("--batch-size", type=int, default=d.batch_size, help=f"rows per decode call (default {d.batch_size})")
    a(
        "--few-shot-after-training",
        action="store_true",
        help="prompt fine-tuned models with the exemplars too",
    )
    a(
        "--continue",
        dest="restart",
        action="store_false",
        help="fine-tune the previous iteration's model instead of the starting one",
    )
    a("--steps", type=int, default=d.steps, help=f"fine-tuning steps of iteration 1 (default {d.steps})")
    a(
        "--step-growth",
        type=float,
        default=d.step_growth,
        help=f"more steps per iteration (default {d.step_growth})",
    )
    a("--lr", dest="learning_rate", type=float, default=d.learning_rate, help=f"default {d.learning_rate}")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup-steps", type=int, default=d.warmup_steps)
    a(
        "--train-batch-size",
        type=int,
        default=d.train_batch_size,
        help=f"examples per step (default {d.train_batch_size})",
    )
    a("--micro-batch-size", type=int, default=d.micro_batch_size)
    a(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help=f"longest training example in tokens (default {d.seq_len})",
    )
    a("--save-every", type=int, default=d.save_every, help="trainer checkpoint interval (steps)")
    a("--precision", default=d.precision, choices=("fp32", "bf16-mixed", "bf16"))
    a("--seed", type=int, default=d.seed)
    a("--device", default=None)
    a("--cpu-threads", type=int, default=None)
    a("--no-progress", dest="progress", action="store_false")
    a("--no-plot", dest="plot", action="store_false")
    a("--resume", action="store_true", help="continue the run in --output-dir")
    a("--overwrite", action="store_true", help="remove a previous run in --output-dir first")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> StarConfig:
    try:
        ops = tuple(int(x) for x in args.ops.split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"--ops must be comma-separated numbers of operations (1, 2, 3), got {args.ops!r}"
        ) from None
    fields = {k: v for k, v in vars(args).items() if k not in ("ops", "templates")}
    templates = tuple(t.strip() for t in args.templates.split(",") if t.strip()) if args.templates else None
    config = StarConfig(ops=ops, templates=templates, **fields)
    config.validate()
    check_output_dir("--output-dir", config.output_dir)
    return config


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(parse_args(argv))
    result = run_star(config)
    for row in result.rows:
        print(
            f"iteration {row['iteration']}: held-out greedy {row['heldout_greedy']:.3f}"
            + (f", majority {row['heldout_majority']:.3f}" if row.get("heldout_majority") is not None else "")
            + (f"; train {row['train_accuracy']:.3f}" if row.get("train_accuracy") is not None else "")
        )
    print(f"report: {result.output_dir / 'report.csv'}")
    return result


def cli(argv: list[str] | None = None) -> int:
    """The ``qstar-star`` console script (errors: one line, :mod:`qstar.cli`)."""
    return run_cli("qstar-star", main, argv)
