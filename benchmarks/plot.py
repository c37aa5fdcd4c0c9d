#!/usr/bin/env python
"""Plot a mask_attention results CSV: time and peak memory vs thought depth, one panel per L.

    python benchmarks/plot.py benchmarks/results/mask_attention_cpu.csv [-o out.png]

Rows: forward time, forward+backward time, peak extra memory (fwd+bwd; forward where there is no
backward, drawn dashed). Columns: text length L. One line per provider, log-scale y axes.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

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
}


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def load_rows(csv_path: str) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def plot_results(csv_path: str, png_path: str | None = None, title_suffix: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    png_path = png_path or os.path.splitext(csv_path)[0] + ".png"
    Ls = sorted({int(r["L"]) for r in rows})
    providers = []
    for r in rows:
        if r["provider"] not in providers:
            providers.append(r["provider"])
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
                    if key == "mem":
                        y = _num(r.get("fb_peak_bytes"))
                        if y is None:
                            y = _num(r.get("fwd_peak_bytes"))
                            dashed = dashed or y is not None
                        y = None if y is None else y / 2**20
                    else:
                        y = _num(r.get(key))
                    if y is not None and y > 0:
                        pts.append((int(r["depth"]), y))
                if not pts:
                    continue
                pts.sort()
                style = dict(STYLE.get(p, {}))
                if dashed:
                    style["linestyle"] = "--"
                ax.plot(
                    [d for d, _ in pts], [y for _, y in pts], label=p + (" (fwd)" if dashed else ""), **style
                )
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
        f"D={r0['D']}, {r0['dtype']})"
    )
    if not title_suffix:  # re-plotting: take the machine line from the JSON written next to the CSV
        try:
            import json

            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from _common import format_machine

            with open(os.path.splitext(csv_path)[0] + ".json") as f:
                title_suffix = format_machine(json.load(f)["machine"])
        except (OSError, KeyError, ValueError):
            pass
    if title_suffix:
        title += "\n" + title_suffix
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="a mask_attention_*.csv written by mask_attention.py")
    ap.add_argument("-o", "--out", help="PNG path (default: the CSV path with .png)")
    args = ap.parse_args(argv)
    print(plot_results(args.csv, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
