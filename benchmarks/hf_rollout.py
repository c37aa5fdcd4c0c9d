#!/usr/bin/env python
"""A Quiet-STaR rollout on a small Hugging Face Mistral: patched vs the authors' dense mask.

The question a user asks: "how much does ``apply_qstar_kernels_to_mistral`` save on a whole
rollout, forward and backward, not just on the attention op?"

The rollout (``quietstar.md`` section 4): step 0 reads the text (``L`` tokens per row), then every
step feeds one new token per text position, with position ids ``j + a`` and a ``DynamicCache`` that
grows by ``L`` keys per step; the loss is a cross-entropy on every step's logits (random targets,
padding ignored) and the backward runs through the whole rollout, cache included.

Providers (the same weights, the same inputs):

  dense    the unpatched model (transformers' SDPA attention) driven the authors' way: the dense
           additive mask (B, 1, L, (a+1)L), rebuilt every step inside the timed call, passed as
           ``attention_mask``. SDPA then attends over all (a+1)L keys with repeat_kv copies.
  patched  ``qstar_kernels.hf.apply_qstar_kernels_to_mistral(model)``, every step inside
           ``thought_step(keep, step=a)``: no mask, ``qstar_kernels.thought_attention`` (the fastest
           backend for the device: the C++ kernel on the CPU).

Default model: 4 layers, hidden 256, 8 query / 2 key-value heads (head dim 32), MLP 896, vocabulary
2048, fp32; B=2 with the second row right-padded by L/8; L=256 and 12 steps (step 0 + 11).

Timing: medians (quartiles and min in the CSV) of ``--repeats`` calls after ``--warmup``, the
providers interleaved round robin. Peak extra memory: bytes allocated above the level at the start
of one call (the profiler's allocator records on the CPU, the allocator statistics on CUDA; see
``_common.py``), which for fwd+bwd includes the cache, every saved activation and the parameter
gradients.

    python benchmarks/hf_rollout.py            # quick: L=256, 12 steps, fwd+bwd (about 30 s on 2 quiet cores)
    python benchmarks/hf_rollout.py --full     # L 128/256/512 x steps 4/8/12/16, also forward alone
    python benchmarks/hf_rollout.py --check    # exit 1 unless every claim PASSes
    python benchmarks/hf_rollout.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    MB,
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
from qstar_kernels import build_additive_thought_mask  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROVIDERS = ["dense", "patched"]
MODEL = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=896,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=2048,
)
HEADLINE = {"L": 256, "steps": 12}
QUICK_L, QUICK_STEPS = [256], [12]
FULL_L, FULL_STEPS = [128, 256, 512], [4, 8, 12, 16]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# The rollout
# --------------------------------------------------------------------------------------------


def make_models(args, device, dtype):
    from transformers import MistralConfig, MistralForCausalLM

    from qstar_kernels.hf import apply_qstar_kernels_to_mistral

    config = MistralConfig(
        **MODEL, sliding_window=None, max_position_embeddings=4096, attn_implementation="sdpa"
    )
    torch.manual_seed(args.seed)
    dense = MistralForCausalLM(config).to(device=device, dtype=dtype)
    patched = apply_qstar_kernels_to_mistral(copy.deepcopy(dense))
    return {"dense": dense, "patched": patched}


def make_inputs(B, L, steps, device, seed):
    g = torch.Generator().manual_seed(seed)
    V = MODEL["vocab_size"]
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1:, L - L // 8 :] = False  # right padding, as the authors' tokenizer pads
    tokens = [torch.randint(0, V, (B, L), generator=g).to(device) for _ in range(steps)]
    targets = [
        torch.randint(0, V, (B, L), generator=g).masked_fill(~keep, -100).to(device) for _ in range(steps)
    ]
    return keep.to(device), tokens, targets


def rollout(provider, model, keep, tokens):
    """Per-step logits (B, L, V) of one rollout."""
    from transformers import DynamicCache

    from qstar_kernels.hf import thought_step

    B, L = keep.shape
    pos = torch.arange(L, device=keep.device).unsqueeze(0)  # (1, L); step a uses j + a
    cache = DynamicCache()
    logits = []
    for a, tok in enumerate(tokens):
        fwd = dict(input_ids=tok, position_ids=pos + a, past_key_values=cache, use_cache=True)
        if provider == "patched":
            with thought_step(keep, step=a):
                out = model(**fwd)
        else:  # the authors' dense additive mask, rebuilt every step
            dtype = model.model.embed_tokens.weight.dtype
            mask = build_additive_thought_mask(L, a, keep, dtype=dtype, device=keep.device)
            out = model(attention_mask=mask, **fwd)
        logits.append(out.logits)
    return logits


def make_calls(provider, model, keep, tokens, targets):
    def forward():
        with torch.no_grad():
            rollout(provider, model, keep, tokens)

    def forward_backward():
        logits = rollout(provider, model, keep, tokens)
        loss = sum(F.cross_entropy(lg.flatten(0, 1).float(), t.flatten()) for lg, t in zip(logits, targets))
        loss.backward()
        del logits, loss
        model.zero_grad(set_to_none=True)

    return forward, forward_backward


def accuracy(models, keep, tokens):
    """Largest relative difference of the logits, patched vs dense, over all steps."""
    with torch.no_grad():
        want = rollout("dense", models["dense"], keep, tokens)
        got = rollout("patched", models["patched"], keep, tokens)
    err = max((g - w).abs().max().item() for g, w in zip(got, want))
    scale = max(w.abs().max().item() for w in want)
    return err / scale


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def run_config(L, steps, args, device, dtype, models, progress):
    keep, tokens, targets = make_inputs(args.B, L, steps, device, args.seed + L + steps)
    calls = {p: make_calls(p, models[p], keep, tokens, targets) for p in PROVIDERS}
    rows = {
        p: {
            "device_kind": device.type,
            "dtype": args.dtype,
            "B": args.B,
            "L": L,
            "steps": steps,
            "provider": p,
        }
        for p in PROVIDERS
    }
    progress(f"L={L} steps={steps}: accuracy")
    rel = accuracy(models, keep, tokens)
    for mode, idx in (("fwd", 0), ("fb", 1)):
        if mode == "fwd" and not args.forward:
            continue
        progress(f"L={L} steps={steps}: timing {'forward' if mode == 'fwd' else 'forward+backward'}")
        timings = time_calls(
            {p: calls[p][idx] for p in PROVIDERS},
            device=device,
            warmup=args.warmup,
            repeats=args.repeats,
            min_repeats=min(3, args.repeats),
            max_seconds=args.max_seconds,
        )
        for p, t in timings.items():
            rows[p].update(t.as_dict(prefix=f"{mode}_"))
        if not args.no_memory:
            progress(f"L={L} steps={steps}: peak memory {mode}")
            for p in PROVIDERS:
                rows[p][f"{mode}_peak_bytes"] = peak_extra_memory(calls[p][idx], device)
    for key in ("fwd_median_ms", "fb_median_ms", "fwd_peak_bytes", "fb_peak_bytes"):
        d, q = rows["dense"].get(key), rows["patched"].get(key)
        if d is not None and q:
            rows["patched"][
                f"dense_over_patched_{key.replace('_median_ms', '_time').replace('_bytes', '')}"
            ] = d / q
    rows["patched"]["max_rel_err_vs_dense"] = rel
    return [rows[p] for p in PROVIDERS]


# --------------------------------------------------------------------------------------------
# Claims, table, plot
# --------------------------------------------------------------------------------------------


def check_claims(all_rows, device):
    head = {
        r["provider"]: r
        for r in all_rows
        if r["L"] == HEADLINE["L"] and r["steps"] == HEADLINE["steps"] and r["dtype"] == "float32"
    }
    cfg = f"L={HEADLINE['L']}, {HEADLINE['steps']} steps, fp32, {device.type}"
    if set(head) != set(PROVIDERS):
        return [{"claim": "headline claims", "result": "N/A", "detail": f"headline config ({cfg}) not run"}]
    d, p = head["dense"], head["patched"]
    claims = []
    rel = p["max_rel_err_vs_dense"]
    claims.append(
        {
            "claim": "patched logits match the dense-mask model within fp32 rounding (relative <= 1e-5)",
            "result": "PASS" if rel <= 1e-5 else "FAIL",
            "value": rel,
            "detail": f"max |patched - dense| / max |dense| over all steps = {rel:.2e}",
        }
    )
    ratio = d["fb_median_ms"] / p["fb_median_ms"]
    claims.append(
        {
            "claim": "patched rollout fwd+bwd is faster than dense-mask SDPA (dense / patched > 1)",
            "result": "PASS" if ratio > 1.0 else "FAIL",
            "value": ratio,
            "detail": f"dense {d['fb_median_ms']:.0f} ms / patched {p['fb_median_ms']:.0f} ms = {ratio:.2f} "
            f"(medians); min-to-min {d['fb_min_ms'] / p['fb_min_ms']:.2f}",
        }
    )
    if d.get("fb_peak_bytes") and p.get("fb_peak_bytes"):
        mratio = d["fb_peak_bytes"] / p["fb_peak_bytes"]
        claims.append(
            {
                "claim": "patched rollout fwd+bwd needs less peak memory than dense-mask SDPA",
                "result": "PASS" if mratio > 1.0 else "FAIL",
                "value": mratio,
                "detail": f"dense {fmt_mb(d['fb_peak_bytes'])} MB / patched {fmt_mb(p['fb_peak_bytes'])} MB "
                f"= {mratio:.2f}",
            }
        )
    return claims


def _cell(r, mode):
    t = r.get(f"{mode}_median_ms")
    if t is None:
        return "-"
    return f"{fmt_ms(t)} ±{fmt_ms((r[f'{mode}_p75_ms'] - r[f'{mode}_p25_ms']) / 2)}"


def format_table(all_rows):
    header = (
        f"{'L':>5} {'steps':>5} {'provider':<8} {'fwd ms':>16} {'fwd+bwd ms':>16} {'fwd MB':>9} "
        f"{'f+b MB':>9} {'time d/p':>9} {'mem d/p':>8}  notes"
    )
    lines = [header, "-" * len(header)]
    for r in all_rows:
        notes = ""
        if r["provider"] == "patched":
            notes = f"rel err {r['max_rel_err_vs_dense']:.1e}"
        lines.append(
            f"{r['L']:>5} {r['steps']:>5} {r['provider']:<8} {_cell(r, 'fwd'):>16} {_cell(r, 'fb'):>16} "
            f"{fmt_mb(r.get('fwd_peak_bytes')):>9} {fmt_mb(r.get('fb_peak_bytes')):>9} "
            f"{fmt_ratio(r.get('dense_over_patched_fb_time')):>9} "
            f"{fmt_ratio(r.get('dense_over_patched_fb_peak')):>8}  {notes}"
        )
    return "\n".join(lines)


def plot(all_rows, png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ls = sorted({r["L"] for r in all_rows})
    if len({(r["L"], r["steps"]) for r in all_rows}) == 1:
        return _plot_one(all_rows, png, title, plt)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    style = {"dense": dict(linestyle="--", marker="o"), "patched": dict(linestyle="-", marker="D")}
    colors = dict(zip(Ls, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for L in Ls:
        for p in PROVIDERS:
            rows = sorted(
                (r for r in all_rows if r["L"] == L and r["provider"] == p), key=lambda r: r["steps"]
            )
            steps = [r["steps"] for r in rows]
            axes[0].plot(
                steps, [r.get("fb_median_ms") for r in rows], color=colors[L], label=f"L={L} {p}", **style[p]
            )
            if any(r.get("fb_peak_bytes") for r in rows):
                axes[1].plot(
                    steps,
                    [(r.get("fb_peak_bytes") or math.nan) / MB for r in rows],
                    color=colors[L],
                    label=f"L={L} {p}",
                    **style[p],
                )
        rows = sorted(
            (r for r in all_rows if r["L"] == L and r["provider"] == "patched"), key=lambda r: r["steps"]
        )
        axes[2].plot(
            [r["steps"] for r in rows],
            [r.get("dense_over_patched_fb_time") for r in rows],
            color=colors[L],
            marker="D",
            label=f"L={L} time",
        )
        if any(r.get("dense_over_patched_fb_peak") for r in rows):
            axes[2].plot(
                [r["steps"] for r in rows],
                [r.get("dense_over_patched_fb_peak") for r in rows],
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _plot_one(rows, png, title, plt):
    """One configuration (the quick run): bars of time and memory, with the dense/patched ratios."""
    by = {r["provider"]: r for r in rows}
    L, steps = rows[0]["L"], rows[0]["steps"]
    panels = [("fb_median_ms", "forward+backward time (ms)", "dense_over_patched_fb_time")]
    if all(by[p].get("fb_peak_bytes") for p in PROVIDERS):
        panels.append(
            ("fb_peak_bytes", "peak extra memory, forward+backward (MB)", "dense_over_patched_fb_peak")
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label, ratio_key) in zip(axes[0], panels):
        vals = [by[p][key] / (MB if key.endswith("bytes") else 1.0) for p in PROVIDERS]
        ax.bar(PROVIDERS, vals, color=["tab:red", "tab:green"])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_title(f"{label}\ndense / patched = {by['patched'][ratio_key]:.2f}x", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Quiet-STaR rollout, L={L}, {steps} steps. {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


NOTE = (
    "Notes: times are medians (± half the interquartile range) of whole rollouts; providers interleaved "
    "round robin. 'dense' builds the authors' additive mask every step inside the timed call. "
    "time d/p and mem d/p = dense / patched for forward+backward (x = how many times more the dense way "
    "costs). MB = peak bytes allocated above the starting level during one call (fwd+bwd includes the "
    "cache, the saved activations and the parameter gradients); on the CPU from the profiler's allocator "
    "records, so memory taken outside c10's allocator (BLAS workspaces, std::vector) is not counted. "
    "rel err = max |patched - dense| / max |dense| over every step's logits."
)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="L 128/256/512 x steps 4/8/12/16")
    ap.add_argument("--L", type=int, nargs="+", help="text lengths (default quick 256; --full 128 256 512)")
    ap.add_argument(
        "--steps", type=int, nargs="+", help="steps incl. the text pass (quick 12; --full 4 8 12 16)"
    )
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument(
        "--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda when present)"
    )
    ap.add_argument("--repeats", type=int, help="timed calls per provider (default quick 3, full 5)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--max-seconds", type=float, help="cap on timed seconds per provider and mode (quick 8, full 30)"
    )
    ap.add_argument(
        "--forward", action="store_true", help="also time the forward alone (default: only with --full)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--tag", help="file name suffix (default: device kind, plus _quick without --full)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a claim FAILs or cannot be checked")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.forward = args.forward or args.full
    args.L = args.L or (FULL_L if args.full else QUICK_L)
    args.steps = args.steps or (FULL_STEPS if args.full else QUICK_STEPS)
    args.repeats = args.repeats or (5 if args.full else 3)
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (30.0 if args.full else 8.0)
    if args.B < 2:
        ap.error("--B must be >= 2 (row 0 unpadded, the others right-padded)")
    return args


def run_device(device, args):
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    info = machine_info(device)
    print(f"\nMachine: {format_machine(info)}")
    print(f"thought_attention backends on {device.type}: {qstar_kernels.available_backends(device)}")
    import transformers

    print(
        f"transformers {transformers.__version__}; model {MODEL}, B={args.B}, {args.dtype}; "
        f"configs {[(L, s) for L in args.L for s in args.steps]} (L, steps); repeats {args.repeats}"
    )
    selfcheck = None
    if device.type == "cpu" and not args.no_memory:
        ok, selfcheck = cpu_memory_selfcheck()
        print(selfcheck)
    models = make_models(args, device, dtype)

    def progress(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    all_rows = []
    for L in args.L:
        for steps in args.steps:
            all_rows += run_config(L, steps, args, device, dtype, models, progress)
    claims = check_claims(all_rows, device)
    wall = time.perf_counter() - t0

    print(f"\n== Quiet-STaR rollout on a small Mistral, patched vs dense mask: {format_machine(info)}")
    print(format_table(all_rows))
    print("\n" + NOTE)
    print(f"\nClaims (headline: L={HEADLINE['L']}, {HEADLINE['steps']} steps, fp32, B={args.B}):")
    for c in claims:
        print(f"  [{c['result']:>4}] {c['claim']}\n         {c['detail']}")

    tag = args.tag or (device.type + ("" if args.full else "_quick"))
    stem = os.path.join(args.out_dir, f"hf_rollout_{tag}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_csv(stem + ".csv", all_rows)
    write_json(
        stem + ".json",
        {
            "benchmark": "hf_rollout",
            "machine": info,
            "transformers": transformers.__version__,
            "model": MODEL,
            "mode": "full" if args.full else "quick",
            "args": vars(args),
            "memory_selfcheck": selfcheck,
            "note": NOTE,
            "claims": claims,
            "rows": all_rows,
            "wall_s": wall,
        },
    )
    outputs = [stem + ".csv", stem + ".json"]
    if not args.no_plot:
        try:
            outputs.append(
                plot(all_rows, stem + ".png", f"Quiet-STaR rollout, small Mistral: {format_machine(info)}")
            )
        except Exception as exc:  # noqa: BLE001 - the numbers are written already
            print(f"plot failed: {exc}", file=sys.stderr)
    print(f"\nwrote {', '.join(os.path.relpath(p) for p in outputs)}; wall {wall:.0f} s")
    return claims


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    failed = False
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda asked for, but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        claims = run_device(device, args)
        failed = failed or any(c["result"] != "PASS" for c in claims)
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
