#!/usr/bin/env python
"""One full Quiet-STaR training step (forward + backward): our loop against the authors' way.

The question a user asks: "how much faster, and how much smaller, is a training step with
``qstar.QuietStarForCausalLM`` than with the authors' code, on the same model?"

Providers (the same weights, the same batch, the same sizes; thoughts sampled):

  authors      ``qstar/reference.py``, a literal implementation of the authors' forward
               (``quietstar.md`` section 14): dense additive masks (R, 1, L, (a+1)L) grown every
               step and handed to transformers' SDPA (which copies the key/value heads,
               ``repeat_kv``), full-vocabulary logits at every step (base, sampling, the talk
               steps, and the intermediate mixed losses the authors compute and throw away),
               sampling by hard Gumbel-softmax and step inputs through one-hot ``(R*L, V) @ E``
               matmuls. The same code the faithfulness tests compare against.
  qstar        ``QuietStarForCausalLM`` (preset "default"): ``thought_attention`` through the
               Hugging Face patch (no mask, native GQA), the fused LM-head ops (no (N, V) tensor),
               gathers for step inputs.
  qstar-ckpt   the same with step-level gradient checkpointing (``gradient_checkpointing=True``).

Sizes (the issue's): L=256, n_thought_tokens=9 (the authors' n_ahead=12), n_talk_tokens=4,
n_rationales=2, so 15 transformer passes per forward. Model: a small Mistral with the Mistral-7B
vocabulary (32000 + the 2 meta tokens) so the LM head weighs as it does in practice: 4 layers,
hidden 256, 8 query / 2 key-value heads, MLP 896, fp32; B=1 sequence (2 rows), right-padded by L/8.

Throughput = unique text tokens per step (B*L) / median step time. Peak memory = bytes allocated
above the level at the start of one step (see ``_common.py``): masks, logits, saved activations,
gradients. Medians of ``--repeats`` steps, providers interleaved.

    python benchmarks/train_step.py            # the issue's point (a few minutes on 2 cores)
    python benchmarks/train_step.py --check    # exit 1 unless every claim PASSes
    python benchmarks/train_step.py --L 64 --thought 3 --talk 2 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE,):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from _common import (  # noqa: E402
    cpu_memory_selfcheck,
    fmt_mb,
    fmt_ms,
    format_machine,
    machine_info,
    peak_extra_memory,
    time_calls,
    write_csv,
    write_json,
)

from qstar import QuietStarConfig, QuietStarForCausalLM  # noqa: E402
from qstar.reference import plain_quietstar_forward  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")
PROVIDERS = ["authors", "qstar", "qstar-ckpt"]
MODEL = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=896,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
)
CLAIM_SPEED, CLAIM_MEMORY = 2.0, 0.5


def build(args, device):
    """The authors' pieces and our model over identical weights (meta tokens = the last 2 ids)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(args.seed)
    cfg = MistralConfig(
        **MODEL, sliding_window=None, max_position_embeddings=4096, attn_implementation="sdpa"
    )
    base = MistralForCausalLM(cfg)
    base.resize_token_embeddings(MODEL["vocab_size"] + 2, mean_resizing=False)
    base = base.to(device)
    authors_lm = copy.deepcopy(base)  # stays unpatched: dense masks through SDPA
    method = QuietStarConfig(
        n_thought_tokens=args.thought, n_talk_tokens=args.talk, n_rationales=args.rationales
    )
    V = MODEL["vocab_size"]
    ours = QuietStarForCausalLM(base, method, start_id=V, end_id=V + 1, pad_token_id=2).train()
    ours.init_meta_embeddings(12)
    with torch.no_grad():  # a trained-looking mixing head, so rewards and the policy term are live
        ours.mixing_head[-1].weight.normal_(0, 0.02)
    heads = copy.deepcopy(ours.mixing_head)
    start = torch.nn.Parameter(ours.start_embedding.detach().clone())
    end = torch.nn.Parameter(ours.end_embedding.detach().clone())
    authors_lm.train()
    return ours, (authors_lm, heads, start, end)


def make_batch(args, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, MODEL["vocab_size"], (args.B, args.L), generator=g)
    mask = torch.ones(args.B, args.L, dtype=torch.long)
    pad = args.L // 8
    ids[-1, args.L - pad :] = 2
    mask[-1, args.L - pad :] = 0
    return ids.to(device), mask.to(device)


def authors_forward(authors, ids, mask, args, thought_tokens=None, generator=None):
    lm, head, start, end = authors
    return plain_quietstar_forward(
        lm,
        head,
        start,
        end,
        ids,
        mask,
        n_ahead=args.thought + 3,
        n_ahead_talk=args.talk,
        n_passes=args.rationales,
        start_id=MODEL["vocab_size"],
        end_id=MODEL["vocab_size"] + 1,
        pad_token_id=2,
        thought_tokens=thought_tokens,
        generator=generator,
        intermediate_losses=True,
    )


def make_calls(ours, authors, ids, mask, args):
    gen = torch.Generator(device=ids.device).manual_seed(args.seed + 2)
    authors_params = [
        *authors[0].parameters(),
        *authors[1].parameters(),
        authors[2],
        authors[3],
    ]

    def step_authors():
        out = authors_forward(authors, ids, mask, args, generator=gen)
        out["loss"].backward()
        del out
        for p in authors_params:
            p.grad = None

    def step_ours(ckpt):
        def run():
            ours.config.gradient_checkpointing = ckpt
            out = ours(ids, mask, generator=gen)
            out.loss.backward()
            del out
            ours.zero_grad(set_to_none=True)

        return run

    return {"authors": step_authors, "qstar": step_ours(False), "qstar-ckpt": step_ours(True)}


def agreement(ours, authors, ids, mask, args):
    """Relative difference of the loss and of the LM-head gradient with the same injected thoughts."""
    R = args.B * args.rationales
    g = torch.Generator().manual_seed(args.seed + 3)
    thoughts = torch.randint(3, MODEL["vocab_size"], (args.thought, R, args.L), generator=g).to(ids.device)
    ours.config.gradient_checkpointing = False
    a = authors_forward(authors, ids, mask, args, thought_tokens=thoughts)
    a["loss"].backward()
    b = ours(ids, mask, thought_tokens=thoughts)
    b.loss.backward()
    ga = authors[0].get_output_embeddings().weight.grad
    gb = ours.base_model.get_output_embeddings().weight.grad
    loss_rel = float((a["loss"] - b.loss).detach().abs() / a["loss"].detach().abs())
    grad_rel = float((ga - gb).abs().max() / ga.abs().max())
    authors[0].zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    return loss_rel, grad_rel


def check_claims(rows):
    by = {r["provider"]: r for r in rows}
    if "authors" not in by or "qstar" not in by:
        return [{"claim": "claims", "result": "N/A", "detail": "authors and qstar were not both run"}]
    a, q = by["authors"], by["qstar"]
    speed = q["tokens_per_s"] / a["tokens_per_s"]
    claims = [
        {
            "claim": f"qstar training step >= {CLAIM_SPEED:.0f}x the authors' tokens/s",
            "result": "PASS" if speed >= CLAIM_SPEED else "FAIL",
            "value": speed,
            "detail": f"{q['tokens_per_s']:.0f} / {a['tokens_per_s']:.0f} tokens/s = {speed:.2f}x",
        }
    ]
    if a.get("peak_bytes") and q.get("peak_bytes"):
        mem = q["peak_bytes"] / a["peak_bytes"]
        claims.append(
            {
                "claim": f"qstar peak memory <= {CLAIM_MEMORY}x the authors'",
                "result": "PASS" if mem <= CLAIM_MEMORY else "FAIL",
                "value": mem,
                "detail": f"{fmt_mb(q['peak_bytes'])} MB / {fmt_mb(a['peak_bytes'])} MB = {mem:.3f}x",
            }
        )
    return claims


def plot(rows, png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["provider"] for r in rows]
    colors = {"authors": "#999999", "qstar": "#1f77b4", "qstar-ckpt": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, label, scale in (
        (axes[0], "tokens_per_s", "tokens / s (higher is better)", 1.0),
        (axes[1], "peak_bytes", "peak memory, MB (lower is better)", 1 / 2**20),
    ):
        vals = [(r.get(key) or 0) * scale for r in rows]
        bars = ax.bar(names, vals, color=[colors.get(n, "#777") for n in names])
        base = vals[names.index("authors")] if "authors" in names else None
        for bar, v in zip(bars, vals):
            txt = f"{v:.0f}" + (f"\n{v / base:.2f}x" if base else "")
            ax.annotate(txt, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
        ax.set_ylabel(label)
        ax.margins(y=0.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--B", type=int, default=1, help="unique sequences (rows = B * rationales)")
    ap.add_argument("--thought", type=int, default=9, help="n_thought_tokens")
    ap.add_argument("--talk", type=int, default=4, help="n_talk_tokens")
    ap.add_argument("--rationales", type=int, default=2, help="n_rationales")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--tag", help="file name suffix (default: the device type)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a claim FAILs")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    info = machine_info(device)
    print(f"Machine: {format_machine(info)}")
    print(
        f"model {MODEL} (+2 meta tokens), B={args.B}, L={args.L}, n_thought_tokens={args.thought}, "
        f"n_talk_tokens={args.talk}, n_rationales={args.rationales}, fp32"
    )
    selfcheck = None
    if device.type == "cpu" and not args.no_memory:
        ok, selfcheck = cpu_memory_selfcheck()
        print(selfcheck)
    ours, authors = build(args, device)
    ids, mask = make_batch(args, device)
    progress("agreement check (injected thoughts)")
    loss_rel, grad_rel = agreement(ours, authors, ids, mask, args)
    print(
        f"agreement with injected thoughts: loss rel diff {loss_rel:.1e}, "
        f"lm_head grad rel diff {grad_rel:.1e}"
    )
    calls = {k: v for k, v in make_calls(ours, authors, ids, mask, args).items() if k in args.providers}
    progress(f"timing {list(calls)} ({args.repeats} steps each, interleaved)")
    timings = time_calls(calls, device=device, warmup=args.warmup, repeats=args.repeats, min_repeats=1)
    rows = []
    for name in args.providers:
        t = timings[name]
        row = {
            "provider": name,
            "L": args.L,
            "B": args.B,
            "n_thought_tokens": args.thought,
            "n_talk_tokens": args.talk,
            "n_rationales": args.rationales,
            "median_ms": t.median,
            "p25_ms": t.quantile(0.25),
            "p75_ms": t.quantile(0.75),
            "min_ms": t.min,
            "tokens_per_s": args.B * args.L / (t.median / 1e3),
        }
        if not args.no_memory:
            progress(f"peak memory of {name}")
            row["peak_bytes"] = peak_extra_memory(calls[name], device)
        rows.append(row)
    base = next((r for r in rows if r["provider"] == "authors"), None)
    for r in rows:
        if base:
            r["speedup_vs_authors"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("peak_bytes") and base.get("peak_bytes"):
                r["memory_vs_authors"] = r["peak_bytes"] / base["peak_bytes"]
    claims = check_claims(rows)
    wall = time.perf_counter() - t0

    print(f"\n== One Quiet-STaR training step (fwd+bwd), ours vs the authors' way: {format_machine(info)}")
    header = f"{'provider':<11} {'step ms':>14} {'tokens/s':>9} {'peak MB':>9} {'speed x':>8} {'memory x':>9}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        spread = (r["p75_ms"] - r["p25_ms"]) / 2
        print(
            f"{r['provider']:<11} {fmt_ms(r['median_ms']) + ' ±' + fmt_ms(spread):>14} "
            f"{r['tokens_per_s']:>9.1f} {fmt_mb(r.get('peak_bytes')):>9} "
            f"{r.get('speedup_vs_authors', float('nan')):>8.2f} "
            f"{r.get('memory_vs_authors', float('nan')):>9.3f}"
        )
    print("\nClaims:")
    for c in claims:
        print(f"  [{c['result']:>4}] {c['claim']}\n         {c['detail']}")

    tag = args.tag or device.type
    stem = os.path.join(args.out_dir, f"train_step_{tag}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_csv(stem + ".csv", rows)
    write_json(
        stem + ".json",
        {
            "benchmark": "train_step",
            "machine": info,
            "model": MODEL,
            "args": vars(args),
            "agreement": {"loss_rel": loss_rel, "lm_head_grad_rel": grad_rel},
            "memory_selfcheck": selfcheck,
            "claims": claims,
            "rows": rows,
            "wall_s": wall,
        },
    )
    outputs = [stem + ".csv", stem + ".json"]
    if not args.no_plot:
        title = (
            f"Quiet-STaR training step, L={args.L}, thought {args.thought}, talk {args.talk}, "
            f"rationales {args.rationales}\n{format_machine(info)}"
        )
        outputs.append(plot(rows, stem + ".png", title))
    print(f"\nwrote {', '.join(os.path.relpath(p) for p in outputs)}; wall {wall:.0f} s")
    failed = any(c["result"] != "PASS" for c in claims)
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
