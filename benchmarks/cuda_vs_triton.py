"""Is the CUDA backend within 1.2x of Triton? Reads the CSVs that ``mask_attention.py`` and
``mixing_ce.py`` wrote on a GPU and compares the ``cuda`` and ``triton`` rows of each
configuration (forward and forward+backward medians). Prints one line per configuration and exits
1 if any ratio cuda / triton exceeds ``--max-ratio`` (default 1.2) or if nothing could be compared.

    python benchmarks/cuda_vs_triton.py benchmarks/results/gpu_check_<device>/*.csv
"""

from __future__ import annotations

import argparse
import csv
import sys

TIME_KEYS = ("fwd_median_ms", "fb_median_ms")
# Columns that name a configuration (those present in a CSV are used).
CONFIG_KEYS = ("op", "B", "Hq", "Hkv", "D", "dtype", "L", "depth", "N", "H", "V")


def compare(paths: list[str], max_ratio: float) -> tuple[list[str], bool]:
    lines, ok, compared = [], True, 0
    for path in paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        configs: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            key = tuple((k, r[k]) for k in CONFIG_KEYS if k in r)
            configs.setdefault(key, {})[r.get("provider", "")] = r
        for key, provs in configs.items():
            if "cuda" not in provs or "triton" not in provs:
                continue
            for t in TIME_KEYS:
                try:
                    c, tr = float(provs["cuda"][t]), float(provs["triton"][t])
                except (KeyError, TypeError, ValueError):
                    continue
                ratio = c / tr
                compared += 1
                verdict = "ok" if ratio <= max_ratio else "SLOWER"
                ok &= ratio <= max_ratio
                cfg = " ".join(f"{k}={v}" for k, v in key)
                lines.append(
                    f"{path}: {cfg} {t}: cuda {c:.3f} ms / triton {tr:.3f} ms = {ratio:.2f}x {verdict}"
                )
    if compared == 0:
        lines.append("no configuration had both a cuda and a triton timing")
        ok = False
    return lines, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--max-ratio", type=float, default=1.2)
    args = ap.parse_args()
    lines, ok = compare(args.csv, args.max_ratio)
    print("\n".join(lines))
    print(f"cuda within {args.max_ratio}x of triton everywhere: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
