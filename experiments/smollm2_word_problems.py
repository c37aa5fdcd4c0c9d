"""What thinking does on a real model: Quiet-STaR fine-tuning of SmolLM2-135M on word problems.

Three models are evaluated on the held-out word problems (``word-problems-heldout``, 200 problems
that share none with the 2000 training problems):

* ``untouched``: SmolLM2-135M-Instruct as installed (the "before" column);
* ``quietstar``: Quiet-STaR fine-tuning (``qstar-train --preset default``) on ``word-problems``;
* ``no-thoughts``: the same data, the same optimiser settings, no thoughts
  (``qstar-train --objective next-token``), given the same compute.

**Matched compute.** A Quiet-STaR step over one window runs the 30 decoder layers over the window
``n_rationales * (n_thought_tokens + 3 + n_talk_tokens - 1)`` times (each rationale copy: the text
pass, ``<start>``, the thought tokens, ``<end>`` and the talk steps but the first, which reuses
``<end>``), forward and backward: 16 passes at the settings below. A step without thoughts runs one.
So the baseline trains on 16 windows for each window of the Quiet-STaR run. That counts what
dominates on this model (the layers' matmuls); the attention over the longer thought keys, the
LM-head work of the talk steps and REINFORCE are extra on the Quiet-STaR side, and the measured
seconds of both runs are reported beside it.

**Why these settings** (2-core CPU, fp32, about 24 s per Quiet-STaR step): 4 thought and 2 talk
tokens, 2 rationales and 128-token windows (one problem per window) are the real-model benchmark's
settings; 60 steps of 2 problems (120 problems) is what about half an hour of this CPU buys (it was
shared with other work during the run, so the measured seconds are indicative only), the matched
baseline about as long again. The learning rate is 1e-5 (the paper's 1e-6 was for a 7B model
over many more steps: at 1e-6 a zero-initialised mixing head barely moves in 80 steps), with 10
warmup steps, for both runs. Everything else is the ``default`` preset, including the paper's policy
weight 1e6 and gradient clipping at 1.

Each stage is skipped when its output exists, so an interrupted run continues where it stopped::

    python experiments/smollm2_word_problems.py                   # all stages, then the report
    python experiments/smollm2_word_problems.py --stages report   # redraw from finished runs

Outputs: ``--work`` (default ``runs/smollm2-experiment``) holds the trained models and eval reports;
``--results`` (default ``experiments/results/smollm2_word_problems``) gets ``summary.json``,
``results.csv``, ``thoughts.md`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import format_machine, machine_info  # noqa: E402  (the benchmarks' machine description)

from qstar.durable import write_atomic  # noqa: E402
from qstar.word_problems import load_split  # noqa: E402

HELDOUT = ROOT / "qstar" / "demo_data" / "word_problems_heldout.jsonl"

#: the Quiet-STaR run (and, where shared, the baseline's).
SETTINGS = {
    "n_thought_tokens": 4, "n_talk_tokens": 2, "n_rationales": 2, "seq_len": 128,
    "batch_size": 2, "max_steps": 60, "lr": 1e-5, "warmup_steps": 10, "threads": 2,
    "baseline_batch_size": 8,
}  # fmt: skip


def passes_per_window(s: dict) -> int:
    """Decoder passes over one window in a Quiet-STaR training step (module docstring)."""
    return s["n_rationales"] * (s["n_thought_tokens"] + 3 + s["n_talk_tokens"] - 1)


def baseline_steps(s: dict) -> int:
    windows = passes_per_window(s) * s["batch_size"] * s["max_steps"]
    return math.ceil(windows / s["baseline_batch_size"])


def train_command(out: Path, s: dict, objective: str) -> list[str]:
    common = [
        sys.executable, "-m", "qstar.train", "--preset", "default", "--model", "smollm2",
        "--data", "word-problems", "--seq-len", str(s["seq_len"]), "--precision", "fp32",
        "--cpu-threads", str(s["threads"]), "--lr", str(s["lr"]), "--warmup-steps", str(s["warmup_steps"]),
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    if objective == "quietstar":
        return common + [
            "--n-thought-tokens", str(s["n_thought_tokens"]), "--n-talk-tokens", str(s["n_talk_tokens"]),
            "--n-rationales", str(s["n_rationales"]), "--batch-size", str(s["batch_size"]),
            "--micro-batch-size", str(s["batch_size"]), "--max-steps", str(s["max_steps"]),
            "--log-every", "5", "--save-every", "20",
        ]  # fmt: skip
    b = s["baseline_batch_size"]
    return common + [
        "--objective", "next-token", "--batch-size", str(b), "--micro-batch-size", str(b // 2),
        "--max-steps", str(baseline_steps(s)), "--log-every", "10", "--save-every", "80",
    ]  # fmt: skip


def eval_command(model: str, out: Path, s: dict, think: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "qstar.eval", "--model", model, "--tasks", "perplexity,gsm8k",
        "--text", str(HELDOUT), "--gsm8k", str(HELDOUT), "--max-length", str(s["seq_len"]),
        "--batch-size", "8", "--cpu-threads", str(s["threads"]), "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    return cmd if think else cmd + ["--no-thoughts"]


def run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; its wall seconds. A failure stops the experiment."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:  # appended: a resumed stage keeps the log of its first part
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): see {log}")
    return time.perf_counter() - t0


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ INFO qstar\.train: (.*)$")


def training_seconds(log: Path) -> float | None:
    """Seconds from the trainer's first logged line after the model load (``N windows of ...``) to
    its last (the final checkpoint): the training itself, without loading the model."""
    stamps = []
    for line in log.read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if m:
            stamps.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), m.group(2)))
    start = next((t for t, msg in stamps if " windows of " in msg), None)
    return (stamps[-1][0] - start).total_seconds() if start is not None and len(stamps) > 1 else None


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def stage_train(work: Path, s: dict) -> None:
    for name, objective in (("quietstar", "quietstar"), ("no-thoughts", "next-token")):
        out = work / name
        if (out / "latest").is_file() and _final_step(out) == _want_steps(s, objective):
            print(f"[train] {name}: done ({out})")
            continue
        cmd = train_command(out, s, objective)
        if (out / "latest").is_file():
            cmd += ["--resume", "latest"]
        run_logged(cmd, work / f"{name}.log")


def _want_steps(s: dict, objective: str) -> int:
    return s["max_steps"] if objective == "quietstar" else baseline_steps(s)


def _final_step(out: Path) -> int:
    return int((out / "latest").read_text().strip().split("-")[-1])


def stage_eval(work: Path, s: dict) -> None:
    for name, model, think in (
        ("untouched", "smollm2", False),
        ("no-thoughts", str(work / "no-thoughts"), False),
        ("quietstar", str(work / "quietstar"), True),
    ):
        out = work / f"eval-{name}"
        if (out / "eval.json").is_file():
            print(f"[eval] {name}: done ({out})")
            continue
        run_logged(eval_command(model, out, s, think), work / f"eval-{name}.log")


def stage_thoughts(work: Path, s: dict, n_problems: int = 32, n_show: int = 10) -> None:
    """The Quiet-STaR model's greedy thoughts at the hardest tokens (highest no-thought NLL) of the
    first ``n_problems`` held-out problems: ``thoughts.json`` in ``work``."""
    out = work / "thoughts.json"
    if out.is_file():
        print(f"[thoughts] done ({out})")
        return
    import torch

    from qstar.eval.forward import eval_forward
    from qstar.loading import load_model

    torch.set_num_threads(s["threads"])
    model = load_model(str(work / "quietstar"))
    tok = model.tokenizer
    texts = [r["text"] for r in load_split("heldout")[:n_problems]]
    rows = [tok.encode(t)[: s["seq_len"]] for t in texts]
    found = []
    with torch.no_grad():
        for b0 in range(0, len(rows), 8):
            chunk = rows[b0 : b0 + 8]
            o = eval_forward(model, chunk, torch.Generator().manual_seed(0))
            for b, ids in enumerate(chunk):
                for j in range(len(ids) - 1):  # position j predicts ids[j + 1]
                    lp0, lp1 = float(o.base_logprobs[b, j]), float(o.talk_logprobs[0, b, j])
                    thought = o.thought_tokens[:, b, j].tolist()
                    found.append({
                        "problem": b0 + b, "position": j, "context": tok.decode(ids[max(0, j - 20) : j + 1]),
                        "thought": tok.decode(thought), "next": tok.decode([ids[j + 1]]),
                        "nll_without": -lp0, "nll_with": -lp1, "gain": lp1 - lp0,
                        "w": float(o.mixing_weights[0, b, j]),
                    })  # fmt: skip
    found.sort(key=lambda r: -r["nll_without"])
    write_atomic(out, json.dumps({"n_problems": n_problems, "hardest": found[:n_show]}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _metrics(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def stage_report(work: Path, results: Path, s: dict) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    heldout = load_split("heldout")
    evals = {
        n: json.loads((work / f"eval-{n}" / "eval.json").read_text())
        for n in ("untouched", "no-thoughts", "quietstar")
    }
    summary = {
        "machine": format_machine(machine_info()) + ", fp32",
        "settings": s,
        "passes_per_quietstar_window": passes_per_window(s),
        "windows": {
            "quietstar": s["batch_size"] * s["max_steps"],
            "no-thoughts": s["baseline_batch_size"] * baseline_steps(s),
        },
        "training_seconds": {n: training_seconds(work / f"{n}.log") for n in ("quietstar", "no-thoughts")},
        "models": {},
    }
    rows = []
    for name, rep in evals.items():
        ppl, direct = rep["tasks"]["perplexity"], rep["tasks"]["gsm8k"]
        by_ops: dict[int, list[float]] = {}
        by_ops_with: dict[int, list[float]] = {}
        for ex in direct["examples"]:
            n_ops = heldout[ex["index"]]["n_ops"]
            by_ops.setdefault(n_ops, []).append(ex["p_without"])
            by_ops_with.setdefault(n_ops, []).append(ex["p_with"])
        entry = {
            "thoughts_run": rep["model_info"].get("thoughts", True),
            "perplexity_without": ppl["perplexity_without"],
            "perplexity_with": ppl["perplexity_with"],
            "mean_gain_nats": ppl["mean_gain"],
            "fraction_of_tokens_improved": ppl["fraction_improved"],
            "mean_mixing_weight": ppl["mean_mixing_weight"],
            "buckets": [
                {
                    k: b[k]
                    for k in (
                        "index",
                        "count",
                        "nll_low",
                        "nll_high",
                        "mean_nll_without",
                        "mean_nll_with",
                        "mean_gain",
                    )
                }
                for b in ppl["buckets"]
            ],
            "direct_without": direct["without_thoughts"],
            "direct_with": direct["with_thoughts"],
            "direct_by_n_ops_without": {k: sum(v) / len(v) for k, v in sorted(by_ops.items())},
            "direct_by_n_ops_with": {k: sum(v) / len(v) for k, v in sorted(by_ops_with.items())},
            "n_tokens": ppl["n_tokens"],
            "n_problems": direct["n"],
        }
        summary["models"][name] = entry
        rows.append({
            "model": name, "perplexity_without": entry["perplexity_without"],
            "perplexity_with": entry["perplexity_with"], "mean_gain_nats": entry["mean_gain_nats"],
            "direct_without": entry["direct_without"], "direct_with": entry["direct_with"],
            **{f"direct_{k}ops_with": v for k, v in entry["direct_by_n_ops_with"].items()},
        })  # fmt: skip
    if (work / "thoughts.json").is_file():
        summary["thoughts"] = json.loads((work / "thoughts.json").read_text())
        lines = ["| context | thought | next | NLL without | NLL with | w |", "|---|---|---|---|---|---|"]
        for t in summary["thoughts"]["hardest"]:
            cell = lambda x: repr(x).replace("|", "\\|")  # noqa: E731
            lines.append(
                f"| {cell(t['context'])} | {cell(t['thought'])} | {cell(t['next'])} | "
                f"{t['nll_without']:.2f} | {t['nll_with']:.2f} | {t['w']:+.3f} |"
            )
        write_atomic(results / "thoughts.md", "\n".join(lines) + "\n")
    write_atomic(results / "summary.json", json.dumps(summary, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    write_atomic(results / "results.csv", buf.getvalue())
    plot(work, results, summary)
    return summary


def plot(work: Path, results: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["settings"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    # (a) training NLL against compute (decoder passes over a window)
    qs = _metrics(work / "quietstar" / "metrics.csv")
    nt = _metrics(work / "no-thoughts" / "metrics.csv")
    per_qs = passes_per_window(s) * s["batch_size"]
    ax[0, 0].plot([r["step"] * per_qs for r in qs], [r["base_nll"] for r in qs], label="Quiet-STaR: base NLL")
    ax[0, 0].plot(
        [r["step"] * per_qs for r in qs], [r["talk_nll"] for r in qs], label="Quiet-STaR: talk NLL (mixed)"
    )
    ax[0, 0].plot(
        [r["step"] * s["baseline_batch_size"] for r in nt],
        [r["loss"] for r in nt],
        label="no thoughts: NLL",
        alpha=0.8,
    )
    ax[0, 0].set(
        xlabel="compute (decoder passes over a 128-token window)",
        ylabel="train NLL (nats/token)",
        title="training, matched compute",
    )
    ax[0, 0].legend()
    names = list(summary["models"])
    m = summary["models"]
    x = range(len(names))
    ax[0, 1].bar(
        [i - 0.2 for i in x], [m[n]["perplexity_without"] for n in names], 0.4, label="without thoughts"
    )
    ax[0, 1].bar([i + 0.2 for i in x], [m[n]["perplexity_with"] for n in names], 0.4, label="with thoughts")
    ax[0, 1].set_xticks(list(x), names)
    ax[0, 1].set(ylabel="held-out perplexity", title="held-out perplexity (200 problems)")
    ax[0, 1].legend()
    b = m["quietstar"]["buckets"]
    ax[1, 0].bar([f"{k['nll_low']:.1f}-{k['nll_high']:.1f}" for k in b], [k["mean_gain"] for k in b])
    ax[1, 0].axhline(0, color="k", lw=0.5)
    ax[1, 0].set(
        xlabel="no-thought NLL of the token (equal-count buckets)",
        ylabel="mean gain (nats)",
        title="Quiet-STaR: gain from thinking by difficulty",
    )
    ops = sorted({int(k) for n in names for k in m[n]["direct_by_n_ops_with"]})
    for i, n in enumerate(names):
        vals = [m[n]["direct_by_n_ops_with"].get(str(o), m[n]["direct_by_n_ops_with"].get(o)) for o in ops]
        ax[1, 1].bar([o + (i - 1) * 0.27 for o in ops], vals, 0.27, label=n)
    ax[1, 1].set_xticks(ops, [f"{o} op" + ("s" if o > 1 else "") for o in ops])
    ax[1, 1].set(ylabel="zero-shot direct metric", title="answer probability by problem size")
    ax[1, 1].legend()
    fig.suptitle(
        f"SmolLM2-135M on word problems, Quiet-STaR vs no thoughts ({summary['machine']})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(results / "results.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "smollm2-experiment"))
    p.add_argument("--results", default=str(ROOT / "experiments" / "results" / "smollm2_word_problems"))
    p.add_argument("--stages", default="train,eval,thoughts,report")
    args = p.parse_args(argv)
    work, stages = Path(args.work), set(args.stages.split(","))
    unknown = stages - {"train", "eval", "thoughts", "report"}
    if unknown:
        print(
            f"--stages: unknown {sorted(unknown)}; choose from train, eval, thoughts, report", file=sys.stderr
        )
        return 2
    work.mkdir(parents=True, exist_ok=True)
    if "train" in stages:
        stage_train(work, SETTINGS)
    if "eval" in stages:
        stage_eval(work, SETTINGS)
    if "thoughts" in stages:
        stage_thoughts(work, SETTINGS)
    if "report" in stages:
        summary = stage_report(work, Path(args.results), SETTINGS)
        print(
            json.dumps(
                {n: {k: v for k, v in e.items() if k != "buckets"} for n, e in summary["models"].items()},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
