#!/usr/bin/env python
"""What does a whole Quiet-STaR rollout cost through the HF patch, against the authors' dense mask?

The question a user asks: "how much does ``apply_qstar_kernels_to_mistral`` save on a whole
rollout, forward and backward, not just on the attention op?"

The rollout (``docs/algorithm.md``, "The parallel rollout"): step 0 reads the text (``L`` tokens per
row), then every step feeds one new token per text position, with position ids ``j + a`` and a
``DynamicCache`` that grows by ``L`` keys per step; the loss is a cross-entropy on every step's
logits (random targets, padding ignored) and the backward runs through the whole rollout, cache
included.

Providers (the same weights, the same inputs):

  dense    the unpatched model (transformers' SDPA attention) driven the authors' way: the dense
           additive mask (B, 1, L, (a+1)L), rebuilt every step inside the timed call, passed as
           ``attention_mask``. SDPA then attends over all (a+1)L keys with repeat_kv copies.
  patched  ``qstar_kernels.hf.apply_qstar_kernels_to_mistral(model)``, every step inside
           ``thought_step(keep, step=a)``: no mask, ``qstar_kernels.thought_attention`` (the fastest
           backend for the device: the C++ kernel on the CPU).

Claims (L=256, 12 steps, fp32): the patched logits match the dense ones (relative <= 1e-5); the
patched rollout's fwd+bwd is faster (dense / patched > 1) and needs less peak memory.

Model: the small Mistral of ``_models.py`` with a vocabulary of 2048, fp32; B=2 with the second row
right-padded by L/8; L=256 and 12 steps (step 0 + 11). Times are medians of ``--repeats`` calls after
``--warmup``, the providers interleaved; peak extra memory (see ``_common.py``) for fwd+bwd includes
the cache, every saved activation and the parameter gradients.

    python benchmarks/hf_rollout.py            # quick: L=256, 12 steps, fwd+bwd (about 30 s on 2 quiet cores)
    python benchmarks/hf_rollout.py --full     # L 128/256/512 x steps 4/8/12/16, also forward alone
    python benchmarks/hf_rollout.py --check    # exit 1 unless every claim PASSes
    python benchmarks/hf_rollout.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from _common import peak_extra_memory, time_calls
from _models import SMALL_MISTRAL, small_mistral
from _report import (
    DTYPES,
    Run,
    add_run_args,
    claim,
    dtype_name,
    fmt_mb,
    fmt_ratio,
    not_applicable,
    parser,
    spread,
)

import qstar_kernels
from qstar_kernels import build_additive_thought_mask

PROVIDERS = ["dense", "patched"]
VOCAB = 2048
HEADLINE = {"L": 256, "steps": 12}
QUICK_L, QUICK_STEPS = [256], [12]
FULL_L, FULL_STEPS = [128, 256, 512], [4, 8, 12, 16]
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
# The rollout
# --------------------------------------------------------------------------------------------


def make_models(args, device, dtype):
    """The unpatched model and a patched copy of the same weights."""
    from qstar_kernels.hf import apply_qstar_kernels_to_mistral

    dense = small_mistral(VOCAB, seed=args.seed).to(device=device, dtype=dtype)
    return {"dense": dense, "patched": apply_qstar_kernels_to_mistral(copy.deepcopy(dense))}


def make_inputs(B, L, steps, device, seed):
    g = torch.Generator().manual_seed(seed)
    V = VOCAB
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

    from qstar_kernels.hf import cache_keyword, thought_step

    B, L = keep.shape
    pos = torch.arange(L, device=keep.device).unsqueeze(0)  # (1, L); step a uses j + a
    cache = DynamicCache()
    logits = []
    for a, tok in enumerate(tokens):
        fwd = {"input_ids": tok, "position_ids": pos + a, cache_keyword(model): cache, "use_cache": True}
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


def run_config(L, steps, args, run, models):
    keep, tokens, targets = make_inputs(args.B, L, steps, run.device, args.seed + L + steps)
    calls = {p: make_calls(p, models[p], keep, tokens, targets) for p in PROVIDERS}
    cfg = {"device_kind": run.device.type, "dtype": args.dtype, "B": args.B, "L": L, "steps": steps}
    rows = {p: {**cfg, "provider": p} for p in PROVIDERS}
    run.progress(f"L={L} steps={steps}: accuracy")
    rel = accuracy(models, keep, tokens)
    for mode, idx in (("fwd", 0), ("fb", 1)) if args.forward else (("fb", 1),):
        run.progress(f"L={L} steps={steps}: timing {'forward' if mode == 'fwd' else 'forward+backward'}")
        timings = time_calls(
            {p: calls[p][idx] for p in PROVIDERS},
            device=run.device,
            warmup=args.warmup,
            repeats=args.repeats,
            min_repeats=min(3, args.repeats),
            max_seconds=args.max_seconds,
        )
        for p, t in timings.items():
            rows[p].update(t.as_dict(prefix=f"{mode}_"))
        if not args.no_memory:
            run.progress(f"L={L} steps={steps}: peak memory {mode}")
            for p in PROVIDERS:
                rows[p][f"{mode}_peak_bytes"] = peak_extra_memory(calls[p][idx], run.device)
    dense, patched = rows["dense"], rows["patched"]
    for mode in ("fwd", "fb"):
        for key, name in ((f"{mode}_median_ms", f"{mode}_time"), (f"{mode}_peak_bytes", f"{mode}_peak")):
            if dense.get(key) is not None and patched.get(key):
                patched[f"dense_over_patched_{name}"] = dense[key] / patched[key]
    patched["max_rel_err_vs_dense"] = rel
    return [dense, patched]


def check_claims(all_rows, device):
    head = {
        r["provider"]: r
        for r in all_rows
        if r["L"] == HEADLINE["L"] and r["steps"] == HEADLINE["steps"] and r["dtype"] == "float32"
    }
    if set(head) != set(PROVIDERS):
        cfg = f"L={HEADLINE['L']}, {HEADLINE['steps']} steps, fp32, {device.type}"
        return [not_applicable("headline claims", f"headline config ({cfg}) not run")]
    d, p = head["dense"], head["patched"]
    rel, ratio = p["max_rel_err_vs_dense"], p["dense_over_patched_fb_time"]
    claims = [
        claim(
            "patched logits match the dense-mask model within fp32 rounding (relative <= 1e-5)",
            rel,
            "<=",
            1e-5,
            f"max |patched - dense| / max |dense| over all steps = {rel:.2e}",
        ),
        claim(
            "patched rollout fwd+bwd is faster than dense-mask SDPA (dense / patched > 1)",
            ratio,
            ">",
            1.0,
            f"dense {d['fb_median_ms']:.0f} ms / patched {p['fb_median_ms']:.0f} ms = {ratio:.2f} "
            f"(medians); min-to-min {d['fb_min_ms'] / p['fb_min_ms']:.2f}",
        ),
    ]
    if mratio := p.get("dense_over_patched_fb_peak"):
        claims.append(
            claim(
                "patched rollout fwd+bwd needs less peak memory than dense-mask SDPA",
                mratio,
                ">",
                1.0,
                f"dense {fmt_mb(d['fb_peak_bytes'])} MB / patched {fmt_mb(p['fb_peak_bytes'])} MB "
                f"= {mratio:.2f}",
            )
        )
    return claims


def format_table(all_rows, run) -> str:
    header = (
        f"{'L':>5} {'steps':>5} {'provider':<8} {'fwd ms':>16} {'fwd+bwd ms':>16} {'fwd MB':>9} "
        f"{'f+b MB':>9} {'time d/p':>9} {'mem d/p':>8}  notes"
    )
    lines = ["", f"== Quiet-STaR rollout on a small Mistral, patched vs dense mask: {run.machine}"]
    lines += [header, "-" * len(header)]
    for r in all_rows:
        notes = f"rel err {r['max_rel_err_vs_dense']:.1e}" if r["provider"] == "patched" else ""
        lines.append(
            f"{r['L']:>5} {r['steps']:>5} {r['provider']:<8} {spread(r, 'fwd_'):>16} {spread(r, 'fb_'):>16} "
            f"{fmt_mb(r.get('fwd_peak_bytes')):>9} {fmt_mb(r.get('fb_peak_bytes')):>9} "
            f"{fmt_ratio(r.get('dense_over_patched_fb_time')):>9} "
            f"{fmt_ratio(r.get('dense_over_patched_fb_peak')):>8}  {notes}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--full", action="store_true", help="L 128/256/512 x steps 4/8/12/16")
    ap.add_argument("--L", type=int, nargs="+", help="text lengths (default quick 256; --full 128 256 512)")
    ap.add_argument(
        "--steps", type=int, nargs="+", help="steps incl. the text pass (quick 12; --full 4 8 12 16)"
    )
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument(
        "--forward", action="store_true", help="also time the forward alone (default: only with --full)"
    )
    add_run_args(ap, device="append", repeats_help="timed calls per provider (default quick 3, full 5)")
    args = ap.parse_args(argv)
    if args.B < 2:
        ap.error("--B must be >= 2 (row 0 unpadded, the others right-padded)")
    args.dtype = dtype_name(args.dtype)
    args.forward = args.forward or args.full
    args.L = args.L or (FULL_L if args.full else QUICK_L)
    args.steps = args.steps or (FULL_STEPS if args.full else QUICK_STEPS)
    args.repeats = args.repeats or (5 if args.full else 3)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (30.0 if args.full else 8.0)
    return args


def run_device(device, args) -> int:
    run = Run("hf_rollout", __doc__, args, device, default_tag=device + ("" if args.full else "_quick"))
    if args.plot_only:
        return run.replot()
    run.start()
    print(f"thought_attention backends on {run.device.type}: {qstar_kernels.available_backends(run.device)}")
    model = dict(SMALL_MISTRAL, vocab_size=VOCAB)
    print(
        f"transformers {run.info['transformers']}; model {model}, B={args.B}, {args.dtype}; "
        f"configs {[(L, s) for L in args.L for s in args.steps]} (L, steps); repeats {args.repeats}"
    )
    selfcheck = run.memory_selfcheck()
    models = make_models(args, run.device, DTYPES[args.dtype])
    all_rows = [r for L in args.L for steps in args.steps for r in run_config(L, steps, args, run, models)]
    return run.finish(
        all_rows,
        check_claims(all_rows, run.device),
        report=format_table(all_rows, run),
        config={"model": model, "mode": "full" if args.full else "quick"},
        checks={"memory_selfcheck": selfcheck},
        note=NOTE,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    return max(run_device(name, args) for name in devices)


if __name__ == "__main__":
    sys.exit(main())
