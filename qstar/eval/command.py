"""Evaluate a Quiet-STaR model with and without thoughts: ``python -m qstar.eval`` (or ``qstar-eval``).

    python -m qstar.eval --model tiny --tasks gsm8k,csqa --gsm8k tests/fixtures/gsm8k_test.jsonl \\
        --csqa tests/fixtures/csqa_validation.jsonl                       # try it, CPU, seconds
    python -m qstar.eval --model runs/x --tasks gsm8k,csqa,gsm8k-cot,perplexity --text notes.txt

Four tasks, each reported with and without thoughts (``docs/evaluation.md``):

``gsm8k``, ``csqa``: the authors' "zero-shot direct" metric (``eval_helpers.compute_metrics``).
    The prompt holds the gold answer (GSM8K ``"Q: {question}\\nA: {number}\\n"``, CommonsenseQA
    ``"Q: {question}\\n(A) ..\\n(E) ..\\nA: {letter}\\n"``); one teacher-forced eval forward gives, at
    every position, the next-token distribution of the base model (``base_hidden``) and of the
    model with its thought mixed in (``mixed_hidden``). The score of an example is the product,
    over the answer tokens, of the probability of the gold token renormalised over a small allowed
    set (the 10 digits and newline, or the letters A-E and newline); the metric is its mean: an
    expected accuracy, not an exact match of generated text.
``gsm8k-cot``: the authors' zero-shot chain of thought with a majority vote
    (``zero-shotcot-eval.py``): sample a rationale after ``"Q: {q}\\nA: Let's think step by step."``,
    append ``"\\nTherefore, the answer (arabic numerals) is"``, sample a few more tokens, take the
    first integer; the majority of ``k`` samples must equal the gold number.
``perplexity``: on a text file, per-token NLL without and with thoughts, both perplexities, and the
    gain ``log p_with - log p_without`` per token, averaged in buckets of difficulty (equal-count
    quantiles of the no-thought NLL): the paper reports that thoughts help most on hard tokens.

The metrics in detail: :mod:`qstar.eval.direct`, :mod:`qstar.eval.cot`, :mod:`qstar.eval.perplexity`
(``--help`` prints them too).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..cli import ArgumentParser, check_output_dir, device_arg, run_cli
from ..loading import load_model
from .cot import __doc__ as _cot_doc
from .cot import evaluate_cot
from .data import (
    csqa_direct_prompt,
    gsm8k_direct_prompt,
    gsm8k_gold,
    load_csqa,
    load_gsm8k,
    load_texts,
    shuffled_indices,
)
from .direct import AnswerTokens, answer_token_ids, evaluate_direct
from .direct import __doc__ as _direct_doc
from .forward import require_tokenizer
from .perplexity import __doc__ as _perplexity_doc
from .perplexity import evaluate_perplexity
from .report import cot_report, direct_report, perplexity_report, plot_report

log = logging.getLogger("qstar.eval")

TASKS = ("gsm8k", "csqa", "gsm8k-cot", "perplexity")
#: ``--help``: this module's overview, then each metric's details.
DESCRIPTION = "\n".join(d for d in (__doc__, _direct_doc, _cot_doc, _perplexity_doc) if d)


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"{flag} must be comma-separated token ids, got {text!r}") from err


def parse_args(argv=None):
    p = ArgumentParser(
        prog="qstar-eval", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a save_pretrained / checkpoint / output directory, the "
                   "authors' checkpoint directory, an HF model, a .gguf file, 'smollm2' (zero mixing head), "
                   "or 'tiny'")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="a tokenizer path or name replacing the model's")
    p.add_argument("--tasks", default="gsm8k,csqa", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--gsm8k", default="gsm8k", help="GSM8K .jsonl file or datasets name (default gsm8k)")
    p.add_argument("--gsm8k-config", default="main", help="the datasets config of --gsm8k (default main)")
    p.add_argument("--gsm8k-split", default="test")
    p.add_argument("--csqa", default="tau/commonsense_qa", help="CommonsenseQA .jsonl file or datasets name")
    p.add_argument("--csqa-config", default=None)
    p.add_argument("--csqa-split", default="validation")
    p.add_argument("--text", default=None, help="perplexity: a .txt (blank-line separated) or .jsonl file")
    p.add_argument("--text-field", default="text", help="the text field of --text .jsonl records")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N examples (documents) per task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward / generate call")
    p.add_argument("--max-length", type=int, default=256, help="tokens per prompt (last kept) / text window")
    p.add_argument("--digit-ids", default=None, help="override the numeric allowed ids (comma-separated)")
    p.add_argument("--letter-ids", default=None, help="override the letter allowed ids (comma-separated)")
    p.add_argument("--thought-temperature", type=float, default=None,
                   help="eval thought temperature (default: the model config's; authors: 1)")  # fmt: skip
    p.add_argument("--cot-votes", type=int, default=8, help="samples per question for the majority vote")
    p.add_argument("--cot-max-new-tokens", type=int, default=384, help="rationale tokens per sample")
    p.add_argument("--cot-answer-tokens", type=int, default=12, help="tokens after the final-answer text")
    p.add_argument("--cot-temperature", type=float, default=0.9)
    p.add_argument("--cot-limit", type=int, default=128, help="CoT questions (the authors' 128)")
    p.add_argument("--cot-shuffle-seed", type=int, default=42, help="datasets-shuffle seed; -1: no shuffle")
    p.add_argument("--buckets", type=int, default=5, help="perplexity: difficulty buckets (quantiles)")
    p.add_argument("--seed", type=int, default=0, help="thought and sample randomness")
    p.add_argument("--output-dir", default="runs/eval")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads on the CPU")
    p.add_argument("--no-thoughts", action="store_true", help="run the base pass only ('with thoughts' "
                   "then equals 'without'): for a model whose mixing head is untrained")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _check_args(args) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown task(s) {unknown or tasks!r}; choose from {', '.join(TASKS)}")
    if "perplexity" in tasks and not args.text:
        raise ValueError("--tasks perplexity needs --text (a .txt or .jsonl file)")
    for flag in ("limit", "cot_limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    for flag in ("batch_size", "cot_votes", "cot_max_new_tokens", "cot_answer_tokens", "buckets"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_length < 3:
        raise ValueError(f"--max-length must be >= 3, got {args.max_length}")
    if not (math.isfinite(args.cot_temperature) and args.cot_temperature >= 0):
        raise ValueError(f"--cot-temperature must be a finite number >= 0, got {args.cot_temperature}")
    t = args.thought_temperature
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise ValueError(f"--thought-temperature must be a finite number >= 0, got {t}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise ValueError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    if args.no_thoughts and "gsm8k-cot" in tasks:
        raise ValueError("--no-thoughts: gsm8k-cot compares generation with and without thoughts; drop one")
    if args.no_thoughts and args.thought_temperature is not None:
        raise ValueError("--thought-temperature: no thoughts are run with --no-thoughts; drop one")
    check_output_dir("--output-dir", args.output_dir)
    return list(dict.fromkeys(tasks))


def run(args) -> dict:
    """Run the tasks of parsed ``args``; write ``eval.json`` (and ``eval.png``) to ``--output-dir``."""
    tasks = _check_args(args)
    t_start = time.perf_counter()
    # Read the data first: a bad file fails before the model loads.
    data: dict = {}
    if "gsm8k" in tasks or "gsm8k-cot" in tasks:
        data["gsm8k"] = load_gsm8k(args.gsm8k, config=args.gsm8k_config, split=args.gsm8k_split)
    if "csqa" in tasks:
        data["csqa"] = load_csqa(args.csqa, config=args.csqa_config, split=args.csqa_split)
    if "perplexity" in tasks:
        data["text"] = load_texts(args.text, text_field=args.text_field)
    digit_ids = _int_list(args.digit_ids, "--digit-ids")
    letter_ids = _int_list(args.letter_ids, "--letter-ids")

    device = device_arg(args.device)
    if args.cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, device=device, dtype=dtype, seed=args.seed, tokenizer=args.tokenizer)
    if args.thought_temperature is not None:
        model.config.eval_thought_temperature = float(args.thought_temperature)
    tok = require_tokenizer(model)
    progress = not args.no_progress

    def gen(offset: int) -> torch.Generator:
        """One generator per task: each task's randomness does not depend on the others."""
        return torch.Generator(device=device).manual_seed(args.seed + offset)

    def limited(items: list) -> list:
        return items if args.limit is None else items[: args.limit]

    report: dict = {
        "model": args.model,
        "model_info": {
            "n_thought_tokens": model.config.n_thought_tokens,
            "eval_thought_temperature": model.config.eval_thought_temperature,
            "thoughts": not args.no_thoughts,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
        },
        "settings": {**vars(args), "tasks": tasks},
        "versions": {"torch": torch.__version__},
        "tasks": {},
    }
    direct = {
        "gsm8k": lambda r: gsm8k_direct_prompt(r["question"], r["answer"]),
        "csqa": lambda r: csqa_direct_prompt(r["question"], r["choices"], r["answerKey"]),
    }
    if "gsm8k" in tasks or "csqa" in tasks:
        derived = answer_token_ids(tok) if digit_ids is None or letter_ids is None else None
        allowed = AnswerTokens(
            numeric=digit_ids if digit_ids is not None else derived.numeric,
            letters=letter_ids if letter_ids is not None else derived.letters,
        )
    for offset, (name, prompt) in enumerate(direct.items()):
        if name not in tasks:
            continue
        res = evaluate_direct(
            model,
            [prompt(r) for r in limited(data[name])],
            answer_tokens=allowed,
            batch_size=args.batch_size,
            max_length=args.max_length,
            generator=gen(offset),
            progress=progress,
            desc=name,
            think=not args.no_thoughts,
        )
        report["tasks"][name] = direct_report(res, getattr(args, name))
        log.info(
            "%s zero-shot direct: %.4f without, %.4f with thoughts",
            name,
            res.without_thoughts,
            res.with_thoughts,
        )
    if "gsm8k-cot" in tasks:
        recs = data["gsm8k"]
        order = shuffled_indices(len(recs), None if args.cot_shuffle_seed < 0 else args.cot_shuffle_seed)
        order = limited(order[: args.cot_limit])
        questions = [recs[i]["question"] for i in order]
        golds = [gsm8k_gold(recs[i]["answer"]) for i in order]
        kw = dict(
            votes=args.cot_votes,
            max_new_tokens=args.cot_max_new_tokens,
            answer_tokens=args.cot_answer_tokens,
            temperature=args.cot_temperature,
            batch_size=args.batch_size,
            progress=progress,
        )
        without = evaluate_cot(model, questions, golds, think=False, generator=gen(2), **kw)
        with_ = evaluate_cot(model, questions, golds, think=True, generator=gen(2), **kw)
        report["tasks"]["gsm8k-cot"] = cot_report(args.gsm8k, args.cot_votes, order, without, with_)
        log.info(
            "gsm8k CoT maj@%d: %.4f without, %.4f with thoughts",
            args.cot_votes,
            without.accuracy,
            with_.accuracy,
        )
    if "perplexity" in tasks:
        res = evaluate_perplexity(
            model,
            limited(data["text"]),
            max_length=args.max_length,
            batch_size=args.batch_size,
            n_buckets=args.buckets,
            generator=gen(3),
            progress=progress,
            think=not args.no_thoughts,
        )
        report["tasks"]["perplexity"] = perplexity_report(res, args.text)
        log.info(
            "perplexity: %.4f without, %.4f with thoughts; mean gain %+.4f nats/token",
            res.perplexity_without, res.perplexity_with, res.mean_gain,
        )  # fmt: skip
    report["seconds"] = time.perf_counter() - t_start
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not args.no_plot:
        plot_report(report, out / "eval.png")
    log.info("wrote %s", out / "eval.json")
    return report


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parse_args(argv))


def cli(argv: list[str] | None = None) -> int:
    """The ``qstar-eval`` console script: exit status 0 on success; an error is one line on stderr
    with exit status 2 (bad input) or 1 (anything else), see :mod:`qstar.cli`."""
    return run_cli("qstar-eval", main, argv)
