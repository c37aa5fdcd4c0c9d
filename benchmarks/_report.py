"""How every benchmark reports: the shared command line, table cells, claims, and the one results writer.

A benchmark script builds its rows (one per configuration and provider, with the columns of
``Timing.as_dict``: ``<mode>_median_ms``, ``_p25_ms``, ``_p75_ms``, ``_min_ms``, ``_mean_ms``, ``_n``
and its own measurements and ratios), checks its claims with :func:`claim`, and hands both to
:meth:`Run.finish`, which prints them and writes, under one stem ``results/<benchmark>_<tag>``:

``.csv``
    the rows, one column per key (the union over the rows, in order of appearance);
``.json``
    one schema for every benchmark::

        {"benchmark": "mask_attention", "question": "<the script's first docstring line>",
         "machine": {machine_info(): cpu, cores, torch, transformers, gpu, loadavg_before/after},
         "config":  {"args": <the command line>, ...what else fixes the setup (model, providers)},
         "checks":  {...sanity checks run before timing (memory self-check, agreement)},
         "note":    "<how to read the numbers>",
         "rows":    [...], "claims": [{"claim", "result": PASS|FAIL|N/A, "value", "bound", "detail"}],
         "extra":   {...anything else}, "wall_s": 123.4}

``.png``
    drawn by ``plot.py`` from the same dictionary (``python benchmarks/plot.py <csv or json>``
    redraws it later);
``.txt``
    the printed report, for the scripts that keep one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import operator
import os
import sys
import time

import torch
from _common import format_machine, load_average, machine_info

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(name: str) -> str:
    """The canonical name of a ``DTYPES`` key: "bf16" -> "bfloat16"."""
    return str(DTYPES[name]).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# Table cells
# --------------------------------------------------------------------------------------------


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))


def fmt_ms(x) -> str:
    if isinstance(x, str):
        return x
    return "-" if _missing(x) else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def fmt_mb(nbytes) -> str:
    return "-" if _missing(nbytes) else f"{nbytes / 2**20:.1f}"


def fmt_ratio(x) -> str:
    return "-" if _missing(x) else (f"{x:.2f}x" if x < 10 else f"{x:.1f}x")


def spread(row: dict, prefix: str = "") -> str:
    """``median ±half the interquartile range`` of a row's timing, or "-"."""
    t = row.get(f"{prefix}median_ms")
    if t is None:
        return "-"
    return f"{fmt_ms(t)} ±{fmt_ms((row[f'{prefix}p75_ms'] - row[f'{prefix}p25_ms']) / 2)}"


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def claim(title: str, value: float, op: str, bound: float, detail: str, **extra) -> dict:
    """A checked claim: PASS when ``value op bound`` holds."""
    ok = _OPS[op](value, bound)
    result = "PASS" if ok else "FAIL"
    return {"claim": title, "result": result, "value": value, "bound": bound, **extra, "detail": detail}


def not_applicable(title: str, why: str, **extra) -> dict:
    """A claim this run could not check, and why."""
    return {"claim": title, "result": "N/A", **extra, "detail": why}


def format_claims(claims: list[dict], heading: str = "Claims:") -> str:
    lines = ["", heading]
    for c in claims:
        lines.append(f"  [{c['result']:>4}] {c['claim']}\n         {c['detail']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command line every script shares
# --------------------------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_args(
    ap: argparse.ArgumentParser,
    *,
    device: str | None = "single",
    memory: bool = True,
    max_seconds: bool = True,
    repeats_help: str = "timed calls per provider",
    tag_help: str = "file name suffix (default: device kind, plus _quick without --full)",
) -> None:
    """The flags every benchmark has (``device``: "single", "append" for several, or None)."""
    if device == "single":
        ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    elif device == "append":
        ap.add_argument(
            "--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda when present)"
        )
    ap.add_argument("--repeats", type=int, help=repeats_help)
    ap.add_argument("--warmup", type=int, help="untimed calls first (default 1)")
    if max_seconds:
        ap.add_argument(
            "--max-seconds", type=float, help="cap on timed seconds per provider and mode; cuts the repeats"
        )
    if memory:
        ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=RESULTS_DIR, help="where the result files go (benchmarks/results)")
    ap.add_argument("--tag", help=tag_help)
    ap.add_argument("--check", action="store_true", help="exit 1 unless every claim PASSes")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the PNG from a previous run's JSON")
    ap.add_argument("--no-plot", action="store_true")


# --------------------------------------------------------------------------------------------
# One run, and the results writer
# --------------------------------------------------------------------------------------------


class Run:
    """One benchmark run on one device: the machine line, progress, the memory self-check, the files.

    ``benchmark`` names the files (``<out_dir>/<benchmark>_<tag>``); ``doc`` is the script's
    docstring, whose first line is the question the run answers.
    """

    def __init__(self, benchmark: str, doc: str, args, device="cpu", default_tag: str | None = None):
        self.benchmark, self.args = benchmark, args
        self.question = doc.strip().splitlines()[0]
        self.device = torch.device(device)
        self.stem = os.path.join(args.out_dir, f"{benchmark}_{args.tag or default_tag or self.device.type}")
        self.t0 = time.perf_counter()
        self.info: dict = {}

    def start(self) -> None:
        """Check the device, set the threads, print the machine (not needed for --plot-only)."""
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        self.info = machine_info(self.device)
        print(f"Machine: {format_machine(self.info)}")

    @property
    def machine(self) -> str:
        return format_machine(self.info)

    def progress(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    def memory_selfcheck(self) -> str | None:
        """On the CPU (unless --no-memory): check the profiler-based memory method, print the verdict."""
        if self.device.type != "cpu" or getattr(self.args, "no_memory", True):
            return None
        from _common import cpu_memory_selfcheck

        ok, msg = cpu_memory_selfcheck()
        print(msg)
        if not ok:
            print("memory columns are unreliable on this build (see above); use --no-memory", file=sys.stderr)
        return msg

    def replot(self) -> int:
        """--plot-only: redraw the PNG from the JSON of a previous run."""
        from plot import plot

        with open(self.stem + ".json") as f:
            print(f"plotted {plot(json.load(f), self.stem + '.png')}")
        return 0

    def finish(
        self,
        rows: list[dict],
        claims: list[dict],
        *,
        report: str,
        config: dict,
        checks: dict | None = None,
        note: str | None = None,
        extra: dict | None = None,
        keep_text: bool = False,
        checked: list[dict] | None = None,
    ) -> int:
        """Print the report and the claims, write the result files; 1 under --check if a claim in
        ``checked`` (default: all) did not PASS."""
        wall = time.perf_counter() - self.t0
        self.info["loadavg_after"] = load_average()
        text = "\n".join(filter(None, [report, note and "\n" + note])) + "\n" + format_claims(claims)
        print(text)
        results = {
            "benchmark": self.benchmark,
            "question": self.question,
            "machine": self.info,
            "config": {"args": vars(self.args), **config},
            "checks": checks or {},
            "note": note,
            "rows": rows,
            "claims": claims,
            "extra": extra or {},
            "wall_s": wall,
        }
        paths = write_results(
            self.stem, results, text=text if keep_text else None, plot=not self.args.no_plot
        )
        print(f"\nwrote {', '.join(os.path.relpath(p) for p in paths)}; wall {wall:.0f} s")
        failed = any(c["result"] != "PASS" for c in (claims if checked is None else checked))
        return 1 if (self.args.check and failed) else 0


def _clean(o):
    """NaN and infinities become null; dtypes and devices their names; tuples lists."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    return o


def write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if _missing(row.get(k)) else row[k] for k in fields})


def write_results(stem: str, results: dict, *, text: str | None = None, plot: bool = True) -> list[str]:
    """The one results writer: ``stem`` + .csv (the rows), .json (everything), .txt, .png."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    write_csv(stem + ".csv", results["rows"])
    with open(stem + ".json", "w") as f:
        json.dump(_clean(results), f, indent=2)
        f.write("\n")
    paths = [stem + ".csv", stem + ".json"]
    if text is not None:
        with open(stem + ".txt", "w") as f:
            f.write(text + "\n")
        paths.append(stem + ".txt")
    if plot:
        try:
            from plot import plot as draw

            paths.append(draw(_clean(results), stem + ".png"))
        except Exception as exc:  # noqa: BLE001 - the numbers are written already
            print(f"plot failed: {exc}", file=sys.stderr)
    return paths
