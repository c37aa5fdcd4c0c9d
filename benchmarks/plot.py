#!/usr/bin/env python
"""Draw the PNG of any benchmark's results (the one plotting module; ``_report.py`` calls it).

    python benchmarks/plot.py benchmarks/results/mask_attention_cpu.csv [-o out.png]
    python benchmarks/plot.py benchmarks/results/generate_cpu.json

Given a CSV, it reads the JSON written beside it (the rows, the machine, the configuration); a CSV
alone is enough for the benchmarks whose figures need only the rows. The benchmark is the JSON's
``benchmark`` field, or the file name's prefix.

  mask_attention   time (fwd, fwd+bwd) and peak extra memory vs thought depth, one column per L
  mixing_ce        fwd+bwd time and peak memory vs rows N, one line per provider and vocabulary
  hf_rollout       rollout time, memory and dense/patched ratio vs steps (bars for one config)
  generate         tokens/s per provider and size, with the ideal as a hatched bar
  train_step       tokens/s and peak memory per provider
  attention_model  the modelled times vs depth
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

MIB = 2**20
BENCHMARKS = (
    "mask_attention",
    "mixing_ce",
    "hf_rollout",
    "generate",
    "train_step",
    "attention_model",
    "real_model",
)

STYLE = {
    "original": dict(color="tab:red", marker="o"),
    "eager": dict(color="tab:orange", marker="s"),
    "flex": dict(color="tab:purple", marker="^"),
    "torch": dict(color="tab:blue", marker="v"),
    "cpu": dict(color="tab:green", marker="D", linewidth=2.5),
    "triton": dict(color="tab:olive", marker="P"),
    "cuda": dict(color="tab:cyan", marker="X"),
    "causal": dict(color="black", marker=".", linestyle=":"),
    "flash_attn": dict(color="gray", marker="*", linestyle=":"),
    "unfused": dict(color="tab:red", marker="o"),
    "unfused_gumbel": dict(color="tab:red", marker="o"),
    "unfused_multinomial": dict(color="tab:orange", marker="s"),
    "authors": dict(color="tab:purple", marker="^"),
}


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _typed(s: str):
    if s == "":
        return None
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def load(path: str) -> dict:
    """The results of one run: the JSON (or the one beside a CSV), else the CSV's rows alone."""
    stem, ext = os.path.splitext(path)
    if ext == ".json" or os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            return json.load(f)
    with open(path, newline="") as f:
        rows = [{k: _typed(v) for k, v in r.items()} for r in csv.DictReader(f)]
    name = os.path.basename(stem)
    benchmark = next((b for b in BENCHMARKS if name.startswith(b)), name)
    return {"benchmark": benchmark, "rows": rows, "machine": {}, "config": {}}


def _machine(results: dict) -> str:
    info = results.get("machine") or {}
    if not info:
        return ""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import format_machine

    return format_machine(info)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, png: str, title: str, dpi: int, **kw) -> str:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=dpi, **kw)
    plt.close(fig)
    return png


def plot(results: dict, png: str) -> str:
    """Draw ``results`` (a benchmark's JSON dictionary) into ``png``; returns the path."""
    if not results.get("rows"):
        raise ValueError(f"{results.get('benchmark')}: no rows to plot")
    return PLOTTERS[results["benchmark"]](results, png)


def plot_mask_attention(results: dict, png: str) -> str:
    plt = _pyplot()
    rows = results["rows"]
    Ls = sorted({int(r["L"]) for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    panels = [
        ("fwd_median_ms", "forward time (ms)"),
        ("fb_median_ms", "forward+backward time (ms)"),
        ("mem", "peak extra memory (MB)"),
    ]
    fig, axes = plt.subplots(
        len(panels), len(Ls), figsize=(4.6 * len(Ls) + 1.5, 3.4 * len(panels)), squeeze=False
    )
    for j, L in enumerate(Ls):
        for i, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for p in providers:
                pts, dashed = [], False
                for r in rows:
                    if int(r["L"]) != L or r["provider"] != p:
                        continue
                    if key == "mem":  # fwd+bwd; forward (dashed) where there is no backward
                        y = _num(r.get("fb_peak_bytes"))
                        if y is None:
                            y = _num(r.get("fwd_peak_bytes"))
                            dashed = dashed or y is not None
                        y = None if y is None else y / MIB
                    else:
                        y = _num(r.get(key))
                    if y is not None and y > 0:
                        pts.append((int(r["depth"]), y))
                if not pts:
                    continue
                pts.sort()
                style = dict(STYLE.get(p, {}), **({"linestyle": "--"} if dashed else {}))
                label_p = p + (" (fwd)" if dashed else "")
                ax.plot([d for d, _ in pts], [y for _, y in pts], label=label_p, **style)
            ax.set_yscale("log")
            depths = sorted({int(r["depth"]) for r in rows if int(r["L"]) == L})
            ax.set_xticks(depths)
            if len(depths) > 1 and depths[0] > 0 and depths[-1] / depths[0] >= 8:
                ax.set_xscale("log", base=2)
                ax.set_xticks(depths, [str(d) for d in depths])
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                ax.set_title(f"L = {L}")
            if i == len(panels) - 1:
                ax.set_xlabel("thought depth a")
            if j == 0:
                ax.set_ylabel(label)
            if i == 0 and j == len(Ls) - 1:
                ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    r0 = rows[0]
    title = (
        f"Quiet-STaR thought attention ({r0['device_kind']}, B={r0['B']}, Hq={r0['Hq']}, Hkv={r0['Hkv']}, "
        f"D={r0['D']}, {r0['dtype']})\n{_machine(results)}"
    )
    return _save(plt, fig, png, title.strip(), 110, bbox_inches="tight")


def plot_mixing_ce(results: dict, png: str) -> str:
    plt = _pyplot()
    rows = results["rows"]
    ops = [op for op in ("mixing", "sampling") if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(2, len(ops), figsize=(6.5 * len(ops), 8), squeeze=False)
    for j, op in enumerate(ops):
        sub = [r for r in rows if r["op"] == op]
        for i, (key, label) in enumerate(
            (("fb_median_ms", "fwd+bwd time (ms)"), ("fb_peak_bytes", "fwd+bwd peak extra MB"))
        ):
            ax = axes[i][j]
            for prov in dict.fromkeys(r["provider"] for r in sub):
                for V, ls in zip(sorted({int(r["V"]) for r in sub}), ("-", "--", ":")):
                    pts = sorted(
                        (int(r["N"]), _num(r[key]) / (1 if key.endswith("ms") else MIB))
                        for r in sub
                        if r["provider"] == prov and int(r["V"]) == V and _num(r.get(key))
                    )
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, linestyle=ls, label=f"{prov} V={V}", **STYLE.get(prov, {}))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set(xlabel="rows N", ylabel=label)
            ax.set_title(f"{'mixed_token_logprobs' if op == 'mixing' else 'sample_thought_tokens'}: {label}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    r0 = rows[0]
    title = f"Fused LM-head ops vs materialised logits (H={r0['H']}, {r0['dtype']})\n{_machine(results)}"
    return _save(plt, fig, png, title, 110)


def plot_hf_rollout(results: dict, png: str) -> str:
    plt = _pyplot()
    rows = results["rows"]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    title = f"Quiet-STaR rollout, small Mistral: {_machine(results)}"
    if len({(r["L"], r["steps"]) for r in rows}) == 1:  # the quick run: bars
        by = {r["provider"]: r for r in rows}
        panels = [("fb_median_ms", "forward+backward time (ms)", "dense_over_patched_fb_time")]
        if all(_num(by[p].get("fb_peak_bytes")) for p in providers):
            panels.append(
                ("fb_peak_bytes", "peak extra memory, forward+backward (MB)", "dense_over_patched_fb_peak")
            )
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
        for ax, (key, label, ratio_key) in zip(axes[0], panels):
            vals = [_num(by[p][key]) / (MIB if key.endswith("bytes") else 1.0) for p in providers]
            ax.bar(providers, vals, color=["tab:red", "tab:green"])
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
            ax.set_title(f"{label}\ndense / patched = {_num(by['patched'][ratio_key]):.2f}x", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
        return _save(
            plt, fig, png, f"Quiet-STaR rollout, L={rows[0]['L']}, {rows[0]['steps']} steps. {title}", 110
        )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    style = {"dense": dict(linestyle="--", marker="o"), "patched": dict(linestyle="-", marker="D")}
    Ls = sorted({r["L"] for r in rows})
    colors = dict(zip(Ls, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for L in Ls:
        for p in providers:
            sub = sorted((r for r in rows if r["L"] == L and r["provider"] == p), key=lambda r: r["steps"])
            steps = [r["steps"] for r in sub]
            kw = dict(color=colors[L], label=f"L={L} {p}", **style.get(p, {}))
            axes[0].plot(steps, [_num(r.get("fb_median_ms")) for r in sub], **kw)
            if any(_num(r.get("fb_peak_bytes")) for r in sub):
                axes[1].plot(steps, [(_num(r.get("fb_peak_bytes")) or math.nan) / MIB for r in sub], **kw)
            if p != "patched":
                continue
            axes[2].plot(
                steps,
                [_num(r.get("dense_over_patched_fb_time")) for r in sub],
                color=colors[L],
                marker="D",
                label=f"L={L} time",
            )
            if any(_num(r.get("dense_over_patched_fb_peak")) for r in sub):
                axes[2].plot(
                    steps,
                    [_num(r.get("dense_over_patched_fb_peak")) for r in sub],
                    color=colors[L],
                    marker="s",
                    linestyle=":",
                    label=f"L={L} memory",
                )
    axes[0].set(
        title="rollout forward+backward time", xlabel="steps (text pass + thought steps)", ylabel="ms"
    )
    axes[1].set(title="peak extra memory, forward+backward", xlabel="steps", ylabel="MB")
    axes[2].set(title="dense / patched (higher = patch saves more)", xlabel="steps", ylabel="ratio")
    axes[2].axhline(1.0, color="gray", linewidth=0.8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_yscale("log")
    return _save(plt, fig, png, title, 110)


def plot_generate(results: dict, png: str) -> str:
    plt = _pyplot()
    rows, config = results["rows"], results.get("config", {})
    args = config.get("args", {})
    steps_full = config.get("ideal_steps", {}).get("claim", args.get("thought", 9) + 3)
    sizes = sorted({r["new_tokens"] for r in rows})
    order = list(dict.fromkeys(r["provider"] for r in rows))
    values = {(r["provider"], r["new_tokens"]): _num(r["tokens_per_s"]) for r in rows}
    ideal = f"ideal\n({steps_full}x base-qstar)"  # base-qstar's tokens/s / steps_full, hatched
    if "base-qstar" in order:
        order.append(ideal)
        for n in sizes:
            if ("base-qstar", n) in values:
                values[(ideal, n)] = values[("base-qstar", n)] / steps_full
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / max(1, len(sizes))
    for i, n in enumerate(sizes):
        bars = [
            (j + (i - (len(sizes) - 1) / 2) * width, values[(p, n)], p == ideal)
            for j, p in enumerate(order)
            if (p, n) in values
        ]
        drawn = ax.bar(
            [x for x, _, _ in bars],
            [v for _, v, _ in bars],
            width,
            label=f"{n} new tokens",
            color=colors[i % len(colors)],
        )
        for bar, (_, v, hatched) in zip(drawn, bars):
            if hatched:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            ax.annotate(
                f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8
            )
    ax.set_xticks(range(len(order)), order)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log scale, higher is better)")
    ax.legend(fontsize=8, loc="upper left")
    title = (
        f"Generation with {args.get('thought')} thought tokens per new token, batch 1, prompt "
        f"{args.get('prompt')}, vocab {args.get('vocab')}+2\n{_machine(results)}"
    )
    return _save(plt, fig, png, title, 120)


def plot_train_step(results: dict, png: str) -> str:
    plt = _pyplot()
    rows, args = results["rows"], results.get("config", {}).get("args", {})
    names = [r["provider"] for r in rows]
    colors = {"authors": "#999999", "qstar": "#1f77b4", "qstar-ckpt": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, label, scale in (
        (axes[0], "tokens_per_s", "tokens / s (higher is better)", 1.0),
        (axes[1], "peak_bytes", "peak memory, MB (lower is better)", 1 / MIB),
    ):
        vals = [(_num(r.get(key)) or 0) * scale for r in rows]
        bars = ax.bar(names, vals, color=[colors.get(n, "#777") for n in names])
        base = vals[names.index("authors")] if "authors" in names else None
        for bar, v in zip(bars, vals):
            txt = f"{v:.0f}" + (f"\n{v / base:.2f}x" if base else "")
            ax.annotate(txt, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
        ax.set_ylabel(label)
        ax.margins(y=0.25)
    title = (
        f"Quiet-STaR training step, L={args.get('L')}, thought {args.get('thought')}, "
        f"talk {args.get('talk')}, rationales {args.get('rationales')}\n{_machine(results)}"
    )
    return _save(plt, fig, png, title, 120)


def plot_attention_model(results: dict, png: str) -> str:
    plt = _pyplot()
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("fwd", "fb")):
        for p in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted(
                (int(r["depth"]), _num(r["model_launch_us"]))
                for r in rows
                if r["provider"] == p and r["mode"] == mode
            )
            ax.plot([d for d, _ in pts], [t for _, t in pts], marker="o", label=p)
        ax.set_yscale("log")
        ax.set(xlabel="thought depth a", ylabel="modelled time (us, roofline + launches)")
        ax.set_title("forward" if mode == "fwd" else "forward+backward")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    title = (
        f"MODELLED, not measured: {_machine(results)}\nB={r0['B']} Hq={r0['Hq']} Hkv={r0['Hkv']} D={r0['D']} "
        f"{r0['dtype']} L={r0['L']}"
    )
    return _save(plt, fig, png, title, 120)


def plot_real_model(results: dict, png: str) -> str:
    """Training tokens/s and peak memory per provider; generation ms/token with the ideal hatched."""
    plt = _pyplot()
    args = results.get("config", {}).get("args", {})
    train = [r for r in results["rows"] if r["part"] == "train_step"]
    gen = [r for r in results["rows"] if r["part"] == "generate"]
    steps = args.get("thought", 4) + 3
    base = next((r for r in gen if r["provider"] == "base-qstar"), None)
    gen_bars = [(r["provider"], _num(r["ms_per_token"]), False) for r in gen]
    gen_bars += [(f"ideal\n({steps}x base-qstar)", steps * base["ms_per_token"], True)] if base else []
    speed = [(r["provider"], _num(r["tokens_per_s"]), False) for r in train]
    memory = [(r["provider"], (_num(r.get("peak_bytes")) or 0) / MIB, False) for r in train]
    colors = {"authors": "#999999", "qstar": "#1f77b4", "qstar-ckpt": "#2ca02c"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [
        (axes[0], speed, "training tokens / s (higher is better)"),
        (axes[1], memory, "training step peak memory, MB (lower is better)"),
        (axes[2], gen_bars, f"generation ms / new token, {args.get('new_tokens')} tokens (lower is better)"),
    ]
    for ax, bars, label in panels:
        drawn = ax.bar(
            [n for n, _, _ in bars],
            [v for _, v, _ in bars],
            color=[colors.get(n, "#ff7f0e") for n, _, _ in bars],
        )
        for bar, (_, v, hatched) in zip(drawn, bars):
            if hatched:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            ax.annotate(
                f"{v:.0f}" if v >= 100 else f"{v:.3g}",
                (bar.get_x() + bar.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_ylabel(label, fontsize=9)
        ax.margins(y=0.2)
    title = (
        f"SmolLM2-135M, fp32: training step L={args.get('L')}, thought {args.get('thought')}, talk "
        f"{args.get('talk')}, rationales {args.get('rationales')}; generation with {args.get('thought')} "
        f"thought tokens\n{_machine(results)}"
    )
    return _save(plt, fig, png, title, 120)


PLOTTERS = {name: globals()[f"plot_{name}"] for name in BENCHMARKS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a <benchmark>_<tag>.csv or .json under benchmarks/results")
    ap.add_argument("-o", "--out", help="PNG path (default: the results path with .png)")
    args = ap.parse_args(argv)
    print(plot(load(args.results), args.out or os.path.splitext(args.results)[0] + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
