#!/usr/bin/env python
"""How much do the fused LM-head ops save? ``mixed_token_logprobs`` and ``sample_thought_tokens``
against the unfused PyTorch computation that materialises the (N, V) logits, forward and
forward+backward, time and peak extra memory, over N and V.

Providers, op ``mixing`` (log-probabilities of targets under the mixing head, 10% ignored rows):

  unfused        h = (1 - w) h_base + w h_thought; logits = h @ weight.T; log_softmax; gather
  cpu            qstar_kernels.mixed_token_logprobs(..., backend="cpu")   (GPU: triton instead)
  torch          the same op on the portable tiled-PyTorch backend

Providers, op ``sampling`` (one thought token per row at T=1, two banned ids, log-prob at T=3):

  unfused_gumbel       logits; banned -> -inf; argmax(logits + Gumbel noise); log_softmax(z / 3)
  unfused_multinomial  logits; banned -> -inf; multinomial(softmax(logits)); log_softmax(z / 3)
  authors              logits; banned -> -1e10; F.gumbel_softmax(tau=1, hard=True) (the Quiet-STaR
                       code's way); log_softmax(z / 3)
  cpu / torch          qstar_kernels.sample_thought_tokens(..., backend=...)   (GPU: triton instead of cpu)

fwd+bwd: leaves h_base, h_thought, w, weight (h, weight) require grad; the backward is
``(logp * g).sum().backward()`` with a fixed random dense g (every row weighted: the fused backward
skips rows whose weight is 0, which the policy loss of Quiet-STaR often has; not used here). Times
are medians after warmup, all providers of one configuration interleaved round robin. Peak extra
memory: bytes allocated above the starting level during one call (CPU: the profiler's allocator
records, see ``_common.py``; CUDA: allocator statistics), including the gradients.

    python benchmarks/mixing_ce.py            # quick: the claim point and one V=128256 point (~3 min)
    python benchmarks/mixing_ce.py --full     # N 512/1024/2048 x V 32000/128256
    python benchmarks/mixing_ce.py --check    # exit 1 unless every claim PASSes
    python benchmarks/mixing_ce.py --plot-only [--full]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    cpu_memory_selfcheck,
    fmt_mb,
    fmt_ms,
    fmt_ratio,
    format_machine,
    machine_info,
    peak_extra_memory,
    time_calls,
    write_csv,
    write_json,
)

import qstar_kernels  # noqa: E402  (after _common, which finds it in a checkout)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: The configuration the issue's claims are about.
HEADLINE = {"N": 2048, "H": 256, "V": 32000, "dtype": "float32"}
QUICK_GRID = [(2048, 32000), (512, 128256)]
FULL_GRID = [(N, V) for V in (32000, 128256) for N in (512, 1024, 2048)]
UNFUSED = {"mixing": ["unfused"], "sampling": ["unfused_gumbel", "unfused_multinomial", "authors"]}
BANNED = (3, 5)  # stand-ins for <|startthought|> and <|endthought|>
IGNORE = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Providers: each is fn(inputs) -> logp (and does its own sampling); gradients flow into inputs
# --------------------------------------------------------------------------------------------


def mixing_unfused(x):
    wc = x["w"][:, None]
    h = (1 - wc) * x["h_base"] + wc * x["h_thought"]
    logp = torch.log_softmax((h @ x["weight"].T).float(), dim=-1)  # (N, V), twice over
    keep = x["target"] != IGNORE
    picked = logp.gather(1, torch.where(keep, x["target"], 0)[:, None])[:, 0]
    return torch.where(keep, picked, torch.zeros_like(picked))


def _masked_logits(x, fill=float("-inf")):
    z = (x["h_thought"] @ x["weight"].T).float()
    return z.index_fill(1, x["banned"], fill)


def sampling_unfused_gumbel(x):
    z = _masked_logits(x)
    with torch.no_grad():
        gumbel = -torch.empty_like(z).exponential_(generator=x["gen"]).log()
        tokens = (z + gumbel).argmax(dim=-1)
    return torch.log_softmax(z / 3.0, dim=-1).gather(1, tokens[:, None])[:, 0]


def sampling_unfused_multinomial(x):
    z = _masked_logits(x)
    with torch.no_grad():
        tokens = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=x["gen"])[:, 0]
    return torch.log_softmax(z / 3.0, dim=-1).gather(1, tokens[:, None])[:, 0]


def sampling_authors(x):
    z = _masked_logits(x, -1e10)
    tokens = F.gumbel_softmax(z, tau=1.0, hard=True).detach().argmax(dim=-1)
    return torch.log_softmax(z / 3.0, dim=-1).gather(1, tokens[:, None])[:, 0]


def fused(op, backend):
    if op == "mixing":

        def fn(x):
            return qstar_kernels.mixed_token_logprobs(
                x["h_base"], x["h_thought"], x["w"], x["weight"], x["target"], backend=backend
            )
    else:

        def fn(x):
            return qstar_kernels.sample_thought_tokens(
                x["h_thought"], x["weight"], banned_ids=x["banned"], generator=x["gen"], backend=backend
            )[1]

    return fn


def providers(op: str, device: torch.device, requested=None) -> dict:
    op_name = "mixed_token_logprobs" if op == "mixing" else "sample_thought_tokens"
    fused_names = [
        b
        for b in ("cpu", "triton", "cuda", "torch")
        if b in qstar_kernels.available_lm_head_backends(device, op=op_name)
    ]
    if device.type == "cpu":
        fused_names = [b for b in fused_names if b != "triton"]  # the interpreter is not a benchmark
    table = {"mixing": {"unfused": mixing_unfused}, "sampling": {}}
    table["sampling"] = {
        "unfused_gumbel": sampling_unfused_gumbel,
        "unfused_multinomial": sampling_unfused_multinomial,
        "authors": sampling_authors,
    }
    out = dict(table[op])
    for b in fused_names:
        out[b] = fused(op, b)
    if requested:
        out = {k: v for k, v in out.items() if k in requested}
    return out


def make_inputs(N, H, V, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    target = torch.randint(0, V, (N,), generator=g)
    target[torch.rand(N, generator=g) < 0.1] = IGNORE
    return {
        "h_base": rnd(N, H),
        "h_thought": rnd(N, H),
        "w": rnd(N),  # unbounded mixing weights
        "weight": rnd(V, H, scale=2.0 / math.sqrt(H)),  # logits of a few units
        "target": target.to(device),
        "banned": torch.tensor(BANNED, device=device),
        "grad": torch.randn(N, generator=g, dtype=torch.float64).to(device=device, dtype=torch.float32),
    }


LEAVES = {"mixing": ("h_base", "h_thought", "w", "weight"), "sampling": ("h_thought", "weight")}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def run_config(op, N, V, args, device, progress) -> list[dict]:
    dtype = DTYPES[args.dtype]
    base = make_inputs(N, args.H, V, dtype, device, args.seed)
    provs = providers(op, device, args.providers)
    rows = {
        name: {"op": op, "provider": name, "N": N, "H": args.H, "V": V, "dtype": args.dtype} for name in provs
    }

    def inputs(requires_grad):
        x = dict(base)
        x["gen"] = torch.Generator(device=device).manual_seed(args.seed)
        if requires_grad:
            for k in LEAVES[op]:
                x[k] = base[k].detach().clone().requires_grad_()
        return x

    def fwd_call(fn, x):
        def call():
            with torch.no_grad():
                fn(x)

        return call

    def fb_call(fn, x):
        def call():
            (fn(x) * x["grad"]).sum().backward()
            for k in LEAVES[op]:
                x[k].grad = None

        return call

    errors = {}

    def on_error(name, exc):
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    for mode, make in (("fwd", fwd_call), ("fb", fb_call)):
        calls = {name: make(fn, inputs(mode == "fb")) for name, fn in provs.items() if name not in errors}
        progress(f"{op} N={N} V={V}: timing {mode}")
        timings = time_calls(
            calls,
            device=device,
            warmup=args.warmup,
            repeats=args.repeats,
            max_seconds=args.max_seconds,
            on_error=on_error,
        )
        for name, t in timings.items():
            rows[name].update(t.as_dict(prefix=f"{mode}_"))
        if not args.no_memory:
            for name, call in calls.items():
                if name in errors:
                    continue
                progress(f"{op} N={N} V={V}: memory {mode} {name}")
                try:
                    rows[name][f"{mode}_peak_bytes"] = peak_extra_memory(call, device)
                except Exception as exc:  # noqa: BLE001
                    on_error(name, exc)
    for name, why in errors.items():
        rows[name]["status"] = why
    out = list(rows.values())
    _fill_ratios(out)
    return out


def _fill_ratios(rows):
    """Each row against the best unfused provider of its op (least time, least memory)."""
    op = rows[0]["op"]
    unfused = [r for r in rows if r["provider"] in UNFUSED[op]]
    for key in ("fwd_median_ms", "fb_median_ms", "fwd_peak_bytes", "fb_peak_bytes"):
        vals = [(r[key], r["provider"]) for r in unfused if r.get(key)]
        if not vals:
            continue
        best, who = min(vals)
        for r in rows:
            if r.get(key) is not None:
                r[f"{key}_vs_unfused"] = r[key] / best
                r[f"{key}_baseline"] = who


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------


def check_claims(all_rows, device) -> list[dict]:
    fused_name = "triton" if device.type == "cuda" else "cpu"
    claims = []
    cfg = ", ".join(f"{k}={v}" for k, v in HEADLINE.items())
    for op, api in (("mixing", "mixed_token_logprobs"), ("sampling", "sample_thought_tokens")):
        head = {
            r["provider"]: r
            for r in all_rows
            if r["op"] == op and all(r[k] == v for k, v in HEADLINE.items())
        }
        for key, bound, what in (
            ("fb_peak_bytes", 0.25, "peak extra memory"),
            ("fb_median_ms", 1.2, "time"),
        ):
            title = f"{api} ({fused_name}) fwd+bwd {what} <= {bound:g} x unfused ({cfg})"
            r = head.get(fused_name)
            ratio = None if r is None else r.get(f"{key}_vs_unfused")
            if ratio is None:
                why = "not run" if r is None else r.get("status", f"no {key}")
                claims.append({"claim": title, "result": "N/A", "detail": why})
                continue
            base = head[r[f"{key}_baseline"]]
            fmt = (lambda b: f"{fmt_mb(b)} MB") if key.endswith("bytes") else (lambda t: f"{fmt_ms(t)} ms")
            detail = (
                f"{fused_name} {fmt(r[key])} / {r[f'{key}_baseline']} {fmt(base[key])} = {ratio:.3f} "
                f"(the best unfused provider; {'medians' if key.endswith('ms') else 'one call'})"
            )
            if key == "fb_median_ms":
                detail += f"; from min times {r['fb_min_ms'] / base['fb_min_ms']:.3f}"
            claims.append(
                {
                    "claim": title,
                    "result": "PASS" if ratio <= bound else "FAIL",
                    "value": ratio,
                    "detail": detail,
                }
            )
    return claims


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

CSV_FIELDS = [
    "device_kind",
    "op",
    "provider",
    "N",
    "H",
    "V",
    "dtype",
    "status",
    "fwd_median_ms",
    "fwd_p25_ms",
    "fwd_p75_ms",
    "fwd_min_ms",
    "fwd_n",
    "fb_median_ms",
    "fb_p25_ms",
    "fb_p75_ms",
    "fb_min_ms",
    "fb_n",
    "fwd_peak_bytes",
    "fb_peak_bytes",
    "fwd_median_ms_vs_unfused",
    "fb_median_ms_vs_unfused",
    "fwd_peak_bytes_vs_unfused",
    "fb_peak_bytes_vs_unfused",
    "fb_median_ms_baseline",
    "fb_peak_bytes_baseline",
]


def _cell(r, mode):
    t = r.get(f"{mode}_median_ms")
    if t is None:
        return "-"
    return f"{fmt_ms(t)} ±{fmt_ms((r[f'{mode}_p75_ms'] - r[f'{mode}_p25_ms']) / 2)}"


def format_table(all_rows) -> str:
    lines = []
    header = (
        f"{'provider':<20} {'fwd ms':>15} {'fwd+bwd ms':>15} {'fwd MB':>9} {'f+b MB':>9} "
        f"{'f+b time/unf':>13} {'f+b mem/unf':>12}"
    )
    seen = []
    for r in all_rows:
        key = (r["op"], r["N"], r["V"])
        if key not in seen:
            seen.append(key)
    for op, N, V in seen:
        rows = [r for r in all_rows if (r["op"], r["N"], r["V"]) == (op, N, V)]
        lines += ["", f"{op}: N={N}, H={rows[0]['H']}, V={V}, {rows[0]['dtype']}  (logits (N, V) = "
                  f"{fmt_mb(4 * N * V)} MB in float32; ratios vs the best unfused provider)", header,
                  "-" * len(header)]  # fmt: skip
        for r in rows:
            if r.get("status"):
                lines.append(f"{r['provider']:<20} {r['status']}")
                continue
            lines.append(
                f"{r['provider']:<20} {_cell(r, 'fwd'):>15} {_cell(r, 'fb'):>15} "
                f"{fmt_mb(r.get('fwd_peak_bytes')):>9} {fmt_mb(r.get('fb_peak_bytes')):>9} "
                f"{fmt_ratio(r.get('fb_median_ms_vs_unfused')):>13} "
                f"{fmt_ratio(r.get('fb_peak_bytes_vs_unfused')):>12}"
            )
    return "\n".join(lines)


def format_claims(claims) -> str:
    lines = ["", "Claims:"]
    for c in claims:
        lines.append(f"  [{c['result']:>4}] {c['claim']}\n         {c['detail']}")
    return "\n".join(lines)


NOTE = (
    "Notes: times are medians (± half the interquartile range) after warmup, providers interleaved "
    "round robin; fwd runs under no_grad, fwd+bwd backpropagates (logp * g).sum() with a dense random g. "
    "MB = peak bytes allocated above the starting level during one call (fwd+bwd includes the "
    "gradients, e.g. the (V, H) weight gradient); on the CPU from the profiler's allocator records "
    "(memory outside c10's allocator, such as BLAS workspaces, is not counted, for either side)."
)

STYLE = {
    "unfused": dict(color="tab:red", marker="o"),
    "unfused_gumbel": dict(color="tab:red", marker="o"),
    "unfused_multinomial": dict(color="tab:orange", marker="s"),
    "authors": dict(color="tab:purple", marker="^"),
    "torch": dict(color="tab:blue", marker="v"),
    "cpu": dict(color="tab:green", marker="D", linewidth=2.5),
    "triton": dict(color="tab:olive", marker="P", linewidth=2.5),
}


def plot(csv_path: str, png_path: str, title: str = "") -> str:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
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
                        (int(r["N"]), float(r[key]) / (1 if key.endswith("ms") else 2**20))
                        for r in sub
                        if r["provider"] == prov and int(r["V"]) == V and r.get(key)
                    )
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, linestyle=ls, label=f"{prov} V={V}", **STYLE.get(prov, {}))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rows N")
            ax.set_ylabel(label)
            ax.set_title(f"{'mixed_token_logprobs' if op == 'mixing' else 'sample_thought_tokens'}: {label}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Fused LM-head ops vs materialised logits (H={rows[0]['H']}, {rows[0]['dtype']})\n{title}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="N 512,1024,2048 x V 32000,128256")
    ap.add_argument("--N", type=int, nargs="+", help="rows (overrides the grid; with --V)")
    ap.add_argument("--V", type=int, nargs="+", help="vocabulary sizes (overrides the grid; with --N)")
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--ops", nargs="+", default=["mixing", "sampling"], choices=["mixing", "sampling"])
    ap.add_argument("--providers", nargs="+", help="only these providers")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, help="timed calls per provider (default quick 5, full 5)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--max-seconds", type=float, default=20.0, help="cap on timed seconds per provider and mode"
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--tag", help="file name suffix (default: device kind, plus _quick without --full)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a claim FAILs or cannot be checked")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.N or args.V:
        args.grid = [(N, V) for V in (args.V or [HEADLINE["V"]]) for N in (args.N or [HEADLINE["N"]])]
    else:
        args.grid = FULL_GRID if args.full else QUICK_GRID
    args.repeats = args.repeats or 5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    stem = os.path.join(
        args.out_dir, "mixing_ce_" + (args.tag or device.type + ("" if args.full else "_quick"))
    )
    if args.plot_only:
        print(f"plotted {plot(stem + '.csv', stem + '.png')}")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    info = machine_info(device)
    out = [f"Machine: {format_machine(info)}"]
    print(out[0])
    if device.type == "cpu":
        ext = qstar_kernels._ext.cpu_extension()
        if ext is not None and hasattr(ext, "lm_head_backend_info"):
            print(ext.lm_head_backend_info())
    selfcheck = None
    if device.type == "cpu" and not args.no_memory:
        ok, selfcheck = cpu_memory_selfcheck()
        print(selfcheck)

    all_rows = []
    for op in args.ops:
        for N, V in args.grid:
            rows = run_config(
                op,
                N,
                V,
                args,
                device,
                lambda m: print(f"[{time.perf_counter() - t0:6.1f} s] {m}", flush=True),
            )
            for r in rows:
                r["device_kind"] = device.type
            all_rows += rows
    claims = check_claims(all_rows, device)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    load_txt = ""
    if load_before and load_after:
        load_txt = (
            f"Load average (1 min) before/after the run: {load_before[0]:.2f} / {load_after[0]:.2f} "
            f"on {info['cores']} cores (above the core count = other work shared the machine)"
        )
    report = "\n".join(
        [
            f"== Fused LM-head ops vs materialised logits: {format_machine(info)}",
            format_table(all_rows),
            "",
            NOTE,
        ]
        + ([load_txt] if load_txt else [])
        + [format_claims(claims)]
    )
    print(report)

    os.makedirs(args.out_dir, exist_ok=True)
    write_csv(stem + ".csv", all_rows, CSV_FIELDS)
    write_json(
        stem + ".json",
        {
            "benchmark": "mixing_ce",
            "machine": info,
            "mode": "full" if args.full else "quick",
            "args": {k: v for k, v in vars(args).items()},
            "load_average_before_after": [load_before, load_after],
            "memory_selfcheck": selfcheck,
            "note": NOTE,
            "claims": claims,
            "rows": all_rows,
            "wall_s": wall,
        },
    )
    with open(stem + ".txt", "w") as f:
        f.write(report + "\n")
    outputs = [stem + ".csv", stem + ".json", stem + ".txt"]
    if not args.no_plot:
        try:
            outputs.append(plot(stem + ".csv", stem + ".png", format_machine(info)))
        except Exception as exc:  # noqa: BLE001
            print(f"plot failed: {exc}", file=sys.stderr)
    print(f"\nwrote {', '.join(os.path.relpath(p) for p in outputs)}; wall {wall:.0f} s")
    if args.check and any(c["result"] != "PASS" for c in claims):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
