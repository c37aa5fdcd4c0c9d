#!/usr/bin/env python
"""How fast, and how small, is one Quiet-STaR training step with qstar against the authors' way?

One full training step (forward + backward) on the same model, weights and batch, thoughts sampled.

Providers:

  authors      ``qstar.reference.plain_quietstar_forward``, a literal implementation of the authors'
               forward (``docs/algorithm.md``, "Cost of the authors' way"): dense additive masks
               (R, 1, L, (a+1)L) grown every step and handed to transformers' SDPA (which copies the
               key/value heads, ``repeat_kv``), full-vocabulary logits at every step (base, sampling,
               the talk steps, and the intermediate mixed losses the authors compute and throw away),
               sampling by hard Gumbel-softmax and step inputs through one-hot ``(R*L, V) @ E``
               matmuls. The same code the faithfulness tests compare against.
  qstar        ``QuietStarForCausalLM`` (preset "default"): ``thought_attention`` through the
               Hugging Face patch (no mask, native GQA), the fused LM-head ops (no (N, V) tensor),
               gathers for step inputs.
  qstar-ckpt   the same with step-level gradient checkpointing (``gradient_checkpointing=True``).

Claims: qstar's tokens/s >= 2x the authors'; qstar's peak memory <= 0.5x the authors'.

Sizes (the issue's): L=256, n_thought_tokens=9 (the authors' n_ahead=12), n_talk_tokens=4,
n_rationales=2, so 15 transformer passes per forward. Model: the small Mistral of ``_models.py``
with the Mistral-7B vocabulary (32000 + the 2 meta tokens), so the LM head weighs as it does in
practice, fp32; B=1 sequence (2 rows), right-padded by L/8. Throughput = unique text tokens per step
(B*L) / median step time. Peak memory = bytes allocated above the level at the start of one step
(see ``_common.py``): masks, logits, saved activations, gradients. Medians of ``--repeats`` steps,
providers interleaved. An agreement check first compares the loss and the LM-head gradient of the
two with the same injected thoughts.

    python benchmarks/train_step.py            # the issue's point (a few minutes on 2 cores)
    python benchmarks/train_step.py --check    # exit 1 unless every claim PASSes
    python benchmarks/train_step.py --L 64 --thought 3 --talk 2 --repeats 1   # a quick look
"""

from __future__ import annotations

import math
import sys

import torch
from _common import peak_extra_memory, time_calls
from _models import PAD, SMALL_MISTRAL, qstar_pair
from _report import Run, add_run_args, claim, fmt_mb, not_applicable, parser, spread

from qstar import QuietStarConfig

PROVIDERS = ["authors", "qstar", "qstar-ckpt"]
VOCAB = 32000
CLAIM_SPEED, CLAIM_MEMORY = 2.0, 0.5


def make_batch(args, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, VOCAB, (args.B, args.L), generator=g)
    mask = torch.ones(args.B, args.L, dtype=torch.long)
    pad = args.L // 8
    ids[-1, args.L - pad :] = PAD
    mask[-1, args.L - pad :] = 0
    return ids.to(device), mask.to(device)


def authors_forward(authors, ids, mask, args, **kw):
    sizes = dict(n_thought=args.thought, n_talk=args.talk, n_rationales=args.rationales, vocab=VOCAB)
    return authors.forward(ids, mask, **sizes, intermediate_losses=True, **kw)


def make_calls(ours, authors, ids, mask, args):
    """provider -> one training step (forward, backward, gradients dropped)."""
    gen = torch.Generator(device=ids.device).manual_seed(args.seed + 2)

    def step_authors():
        authors_forward(authors, ids, mask, args, generator=gen)["loss"].backward()
        for p in authors.parameters():
            p.grad = None

    def step_ours(ckpt):
        def run():
            ours.config.gradient_checkpointing = ckpt
            ours(ids, mask, generator=gen).loss.backward()
            ours.zero_grad(set_to_none=True)

        return run

    return {"authors": step_authors, "qstar": step_ours(False), "qstar-ckpt": step_ours(True)}


def agreement(ours, authors, ids, mask, args) -> dict:
    """Relative difference of the loss and of the LM-head gradient with the same injected thoughts."""
    g = torch.Generator().manual_seed(args.seed + 3)
    R = args.B * args.rationales
    thoughts = torch.randint(3, VOCAB, (args.thought, R, args.L), generator=g).to(ids.device)
    ours.config.gradient_checkpointing = False
    a = authors_forward(authors, ids, mask, args, thought_tokens=thoughts)
    a["loss"].backward()
    b = ours(ids, mask, thought_tokens=thoughts)
    b.loss.backward()
    ga = authors.lm.get_output_embeddings().weight.grad
    gb = ours.base_model.get_output_embeddings().weight.grad
    out = {
        "loss_rel": float((a["loss"] - b.loss).detach().abs() / a["loss"].detach().abs()),
        "lm_head_grad_rel": float((ga - gb).abs().max() / ga.abs().max()),
    }
    authors.lm.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    return out


def check_claims(rows):
    by = {r["provider"]: r for r in rows}
    if "authors" not in by or "qstar" not in by:
        return [not_applicable("claims", "authors and qstar were not both run")]
    a, q = by["authors"], by["qstar"]
    speed = q["speedup_vs_authors"]
    claims = [
        claim(
            f"qstar training step >= {CLAIM_SPEED:.0f}x the authors' tokens/s",
            speed,
            ">=",
            CLAIM_SPEED,
            f"{q['tokens_per_s']:.0f} / {a['tokens_per_s']:.0f} tokens/s = {speed:.2f}x",
        )
    ]
    if q.get("memory_vs_authors"):
        mem = q["memory_vs_authors"]
        claims.append(
            claim(
                f"qstar peak memory <= {CLAIM_MEMORY}x the authors'",
                mem,
                "<=",
                CLAIM_MEMORY,
                f"{fmt_mb(q['peak_bytes'])} MB / {fmt_mb(a['peak_bytes'])} MB = {mem:.3f}x",
            )
        )
    return claims


def format_table(rows, run) -> str:
    header = f"{'provider':<11} {'step ms':>14} {'tokens/s':>9} {'peak MB':>9} {'speed x':>8} {'memory x':>9}"
    lines = ["", f"== One Quiet-STaR training step (fwd+bwd), ours vs the authors' way: {run.machine}"]
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['provider']:<11} {spread(r):>14} {r['tokens_per_s']:>9.1f} {fmt_mb(r.get('peak_bytes')):>9} "
            f"{r.get('speedup_vs_authors', math.nan):>8.2f} {r.get('memory_vs_authors', math.nan):>9.3f}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--B", type=int, default=1, help="unique sequences (rows = B * rationales)")
    ap.add_argument("--thought", type=int, default=9, help="n_thought_tokens")
    ap.add_argument("--talk", type=int, default=4, help="n_talk_tokens")
    ap.add_argument("--rationales", type=int, default=2, help="n_rationales")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    add_run_args(
        ap, max_seconds=False, repeats_help="steps per provider (default 3)", tag_help="default: the device"
    )
    args = ap.parse_args(argv)
    args.repeats = args.repeats or 3
    args.warmup = 1 if args.warmup is None else args.warmup
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run("train_step", __doc__, args, args.device)
    if args.plot_only:
        return run.replot()
    run.start()
    model = dict(SMALL_MISTRAL, vocab_size=VOCAB)
    print(
        f"model {model} (+2 meta tokens), B={args.B}, L={args.L}, n_thought_tokens={args.thought}, "
        f"n_talk_tokens={args.talk}, n_rationales={args.rationales}, fp32"
    )
    selfcheck = run.memory_selfcheck()
    method = QuietStarConfig(
        n_thought_tokens=args.thought, n_talk_tokens=args.talk, n_rationales=args.rationales
    )
    ours, authors = qstar_pair(method, VOCAB, seed=args.seed, device=run.device)
    ours.train(), authors.lm.train()
    ids, mask = make_batch(args, run.device)
    run.progress("agreement check (injected thoughts)")
    agree = agreement(ours, authors, ids, mask, args)
    print(
        f"agreement with injected thoughts: loss rel diff {agree['loss_rel']:.1e}, "
        f"lm_head grad rel diff {agree['lm_head_grad_rel']:.1e}"
    )
    calls = {k: v for k, v in make_calls(ours, authors, ids, mask, args).items() if k in args.providers}
    run.progress(f"timing {list(calls)} ({args.repeats} steps each, interleaved)")
    timings = time_calls(calls, device=run.device, warmup=args.warmup, repeats=args.repeats, min_repeats=1)
    rows = []
    for name in args.providers:
        t = timings[name]
        row = {"provider": name, "L": args.L, "B": args.B, "n_thought_tokens": args.thought}
        row |= {"n_talk_tokens": args.talk, "n_rationales": args.rationales, **t.as_dict()}
        row["tokens_per_s"] = args.B * args.L / (t.median / 1e3)
        if not args.no_memory:
            run.progress(f"peak memory of {name}")
            row["peak_bytes"] = peak_extra_memory(calls[name], run.device)
        rows.append(row)
    base = next((r for r in rows if r["provider"] == "authors"), None)
    for r in rows if base else []:
        r["speedup_vs_authors"] = r["tokens_per_s"] / base["tokens_per_s"]
        if r.get("peak_bytes") and base.get("peak_bytes"):
            r["memory_vs_authors"] = r["peak_bytes"] / base["peak_bytes"]
    return run.finish(
        rows,
        check_claims(rows),
        report=format_table(rows, run),
        config={"model": model},
        checks={"agreement": agree, "memory_selfcheck": selfcheck},
    )


if __name__ == "__main__":
    sys.exit(main())
