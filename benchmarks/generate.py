#!/usr/bin/env python
"""How fast is generation with a thought before every token, against the authors' loop and the base model?

Tokens/s of ``qstar.generate`` with 9 thought tokens per new token, batch 1, the same weights and
prompt for every provider, text sampled at temperature 0.9 like the authors' ``zero-shotcot-eval.py``,
the meta tokens never emitted, EOS never stopping a run.

Providers:

  authors-recompute  the authors' generation loop (``zero-shotcot-eval.py``; ``docs/algorithm.md``,
                     "Generation"): for every new token, the whole eval-mode training forward over
                     the entire current sequence, no KV cache kept across tokens; keep the last
                     position's mixed logits, set the ids >= the base vocabulary (the meta tokens) to
                     -inf, ``multinomial(softmax(z / 0.9))``, append, repeat. The forward is
                     ``qstar.reference`` (dense additive masks grown every pass, one-hot ``(N, V) @ E``
                     inputs for sampled tokens, full-vocabulary logits at every pass, hard
                     Gumbel-softmax sampling) with the authors' eval overrides ``n_ahead_talk = 1``,
                     ``n_passes = 1`` and ``n_ahead = 12`` (the training script's: 9 sampled thought
                     tokens), so 12 transformer passes over the sequence per new token. See "What the
                     authors' label-less forward does" below.
  recompute-fused    the same loop with our fused ``QuietStarForCausalLM.forward(ids,
                     output_logits=True)`` in eval mode: the gain of the kernels alone.
  qstar              ``qstar.generate(model, ids, max_new_tokens, n_thought_tokens=9)``: a KV cache for
                     the text, one thought at the newest position in a private cache branch.
  base-hf            the base model's own ``transformers`` ``generate`` (KV cache, sampling, no thoughts).
  base-qstar         ``qstar.generate(..., think=False)``: our decode loop without thoughts.

Claims, at 256 new tokens: qstar >= 20x the tokens/s of authors-recompute; qstar within 1.5x of the
ideal against base-qstar and against base-hf (two claims); every run emitted exactly the requested
tokens and no meta token.

The ideal: a new token costs one text token and an ``n + 2``-token thought (``<start> t1..tn <end>``)
through the transformer, ``n + 3 = 12`` decode steps for ``n = 9``, so ideal = 12 x the base model's
time per token, whatever the implementation. The stricter ``1 + n = 10`` x base (as if the delimiters
were free) is reported beside it. ms/token = the wall time of one whole call (prefill included) / new
tokens. The fast providers are timed ``--repeats`` times, interleaved after a warmup (medians); the
recompute providers are quadratic in the length and run once per size after a 2-token warmup (their
first and last token times are recorded too). An agreement check first runs the first token with
greedy thoughts through the authors' forward, the fused forward and ``generate``.

What the authors' label-less forward does (``modeling_mistral.py``, ``MistralForCausalLM.forward``
with ``labels=None`` in eval mode, ``use_policy_loss=False`` as ``zero-shotcot-eval.py`` sets it):
K := 1, P := 1; ``n_ahead = T`` passes; at every pass ``a >= 1`` the mixing head and the LM head on
the mixed state (their ``logits``), and at every pass the LM head on the raw state (``rm_logits``);
Gumbel-softmax over ``(N, V)`` and a one-hot ``(N, V) @ E`` input at the 9 sampled passes; every CE,
reward and policy term is skipped (they need ``labels``); at pass ``T - 1`` (the ``<end>`` pass) the
loop ``continue``s before any teacher forcing, and ``logits`` (the mixed logits of that pass) is
returned. ``plain_quietstar_forward`` with ``n_ahead_talk=1, n_passes=1, intermediate_losses=True,
output_logits=True`` runs the same 12 passes with the same masks, samples and mixing, and returns the
same ``<end>``-pass mixed logits. It differs in bookkeeping of about the same weight: it skips the
authors' ``rm_logits`` at the three forced passes (0, 10, 11: 30 instead of 33 vocabulary-sized
matmuls per call), and computes what a label-less call skips: the label cross-entropies at every
pass and the REINFORCE log-softmax at the 9 sampled passes (elementwise over ``(N, V)``). The loop
around it follows ``zero-shotcot-eval.py`` for batch 1 without padding (the last non-pad position is
the last column) minus its per-token tokenizer decode and stop-string tests, and never stops at EOS
(no provider does here).

Model: the small Mistral of ``_models.py`` with the Mistral-7B vocabulary (32000 + the 2 meta
tokens), fp32, a random (non-zero) last mixing-head layer. Prompt: 24 random ids.

    python benchmarks/generate.py            # 64 and 256 new tokens (minutes on 2 cores)
    python benchmarks/generate.py --check    # exit 1 unless every claim PASSes
    python benchmarks/generate.py --quick    # 8 and 16 new tokens: a smoke run
    python benchmarks/generate.py --plot-only [--quick]   # re-plot from the JSON
"""

from __future__ import annotations

import sys
import time

import torch
from _common import time_calls
from _models import PAD, SMALL_MISTRAL, qstar_pair
from _report import Run, add_run_args, claim, fmt_ms, not_applicable, parser

from qstar import QuietStarConfig, generate

PROVIDERS = ["authors-recompute", "recompute-fused", "qstar", "base-hf", "base-qstar"]
RECOMPUTE = ("authors-recompute", "recompute-fused")
THINKING = ("authors-recompute", "recompute-fused", "qstar")
BASES = ("base-qstar", "base-hf")
EOS = 2
SIZES, QUICK_SIZES = [64, 256], [8, 16]
CLAIM_SPEEDUP, CLAIM_IDEAL, CLAIM_SIZE = 20.0, 1.5, 256


# --------------------------------------------------------------------------------------------
# The providers
# --------------------------------------------------------------------------------------------


def authors_logits(authors, ids, args, thought_tokens=None):
    """The authors' eval-mode forward over ``ids``: the ``<end>``-pass mixed logits, ``(1, N, V+2)``."""
    sizes = dict(n_thought=args.thought, n_talk=1, n_rationales=1, vocab=args.vocab)
    out = authors.forward(
        ids,
        torch.ones_like(ids),
        **sizes,
        thought_tokens=thought_tokens,
        intermediate_losses=True,
        output_logits=True,
    )
    return out["logits"]


def recompute_loop(forward, prompt, n_new, args, token_ms=None):
    """``zero-shotcot-eval.py``: re-run ``forward`` over the whole sequence for each new token, mask
    the ids >= the base vocabulary, sample at ``--temperature``."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n_new):
            t0 = time.perf_counter()
            z = forward(ids)[:, -1].clone()
            z[:, args.vocab :] = -float("inf")
            tok = torch.multinomial(torch.softmax(z / args.temperature, dim=-1), 1)
            ids = torch.cat([ids, tok], dim=1)
            if token_ms is not None:
                token_ms.append((time.perf_counter() - t0) * 1e3)
    return ids[:, prompt.shape[1] :]


def make_calls(ours, authors, prompt, args):
    """name -> f(n_new, token_ms=None) returning the ``(1, n_new)`` new tokens."""
    V, temp = args.vocab, args.temperature

    def generate_ours(n, token_ms=None, **kw):
        return generate(ours, prompt, max_new_tokens=n, temperature=temp, eos_token_id=None, **kw).new_tokens

    def base_hf(n, token_ms=None):
        out = authors.lm.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=temp,
            top_k=0,
            top_p=1.0,
            max_new_tokens=n,
            min_new_tokens=n,  # EOS is suppressed until n tokens: it cannot end the run early
            suppress_tokens=[V, V + 1],  # the meta tokens, as everywhere else
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        return out[:, prompt.shape[1] :]

    return {
        "authors-recompute": lambda n, token_ms=None: recompute_loop(
            lambda ids: authors_logits(authors, ids, args), prompt, n, args, token_ms
        ),
        "recompute-fused": lambda n, token_ms=None: recompute_loop(
            lambda ids: ours(ids, output_logits=True).logits, prompt, n, args, token_ms
        ),
        "qstar": lambda n, token_ms=None: generate_ours(
            n, n_thought_tokens=args.thought, thought_temperature=1.0
        ),
        "base-hf": base_hf,
        "base-qstar": lambda n, token_ms=None: generate_ours(n, think=False),
    }


def agreement(ours, authors, prompt, args) -> dict:
    """The providers compute the same next-token distribution for the first new token.

    With greedy thoughts (so all three think the same thought): the fused forward's last-position
    mixed logits and thought, the authors' forward given that thought, and ``generate``'s first step;
    and the base model's last logits against ``generate(think=False)``'s. Relative max differences.
    """
    saved = ours.config.eval_thought_temperature
    ours.config.eval_thought_temperature = 0.0
    try:
        with torch.no_grad():
            fused = ours(prompt, output_logits=True)
    finally:
        ours.config.eval_thought_temperature = saved
    want = fused.logits[0, -1]
    with torch.no_grad():
        theirs = authors_logits(authors, prompt, args, thought_tokens=fused.thought_tokens)[0, -1]
        base = authors.lm(prompt).logits[0, -1]
    greedy = dict(max_new_tokens=1, temperature=0, output_logits=True)
    gen = generate(
        ours,
        prompt,
        n_thought_tokens=args.thought,
        thought_temperature=0,
        eos_token_id=None,
        return_thoughts=True,
        **greedy,
    )
    gen_base = generate(ours, prompt, think=False, **greedy)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    return {
        "authors_vs_fused_logits_rel": rel(theirs, want),
        "qstar_vs_fused_logits_rel": rel(gen.logits[0, 0], want),
        "qstar_same_thought_as_fused": torch.equal(gen.thoughts[0, 0], fused.thought_tokens[:, 0, -1]),
        "base_qstar_vs_hf_logits_rel": rel(gen_base.logits[0, 0], base),
    }


# --------------------------------------------------------------------------------------------
# Measurement and claims
# --------------------------------------------------------------------------------------------


def measure(calls, names, sizes, args, run):
    """One row per (size, provider), with the tokens each run produced checked."""
    rows, outputs = [], {}
    fast = [p for p in names if p not in RECOMPUTE]
    for n in sizes:
        timings, first_last = {}, {}

        def keep(name, token_ms=None, n=n):
            return lambda: outputs.__setitem__((name, n), calls[name](n, token_ms))

        for name in [p for p in names if p in RECOMPUTE]:  # quadratic: once, after a 2-token warmup
            run.progress(f"{name}: {n} new tokens, once (after a 2-token warmup)")
            calls[name](2)
            token_ms: list[float] = []
            timings |= time_calls({name: keep(name, token_ms)}, warmup=0, repeats=1, min_repeats=1)
            first_last[name] = {"first_token_ms": token_ms[0], "last_token_ms": token_ms[-1]}
        if fast:
            run.progress(f"{fast}: {n} new tokens, {args.repeats} calls each, interleaved")
            timings |= time_calls(
                {p: keep(p) for p in fast},
                warmup=args.warmup,
                repeats=args.repeats,
                min_repeats=min(args.repeats, 2),
                max_seconds=args.max_seconds,
            )
        for name in names:
            t, toks = timings[name], outputs[(name, n)]
            rows.append(
                {
                    "provider": name,
                    "new_tokens": n,
                    **t.as_dict(),
                    **first_last.get(name, {}),
                    "ms_per_token": t.median / n,
                    "tokens_per_s": n / (t.median / 1e3),
                    "emitted": int(toks.shape[1]),
                    "meta_emitted": int((toks >= args.vocab).sum()),
                }
            )
    return rows


def add_ratios(rows, steps_full, steps_strict):
    """speedup vs authors-recompute; the thinking providers' ms/token over the ideal (k x base)."""
    by = {(r["provider"], r["new_tokens"]): r for r in rows}
    for r in rows:
        n = r["new_tokens"]
        if a := by.get(("authors-recompute", n)):
            r["speedup_vs_authors"] = a["median_ms"] / r["median_ms"]
        for base in BASES if r["provider"] in THINKING else ():
            if (b := by.get((base, n))) is None:
                continue
            tag = base.replace("-", "_")
            r[f"ideal{steps_full}_{tag}_ms_per_token"] = steps_full * b["ms_per_token"]
            r[f"vs_ideal{steps_full}_{tag}"] = r["ms_per_token"] / (steps_full * b["ms_per_token"])
            r[f"vs_ideal{steps_strict}_{tag}"] = r["ms_per_token"] / (steps_strict * b["ms_per_token"])


def check_claims(rows, steps_full, steps_strict):
    by = {(r["provider"], r["new_tokens"]): r for r in rows}
    bad = [
        f"{r['provider']}@{r['new_tokens']}: {r['emitted']} tokens, {r['meta_emitted']} meta"
        for r in rows
        if r["emitted"] != r["new_tokens"] or r["meta_emitted"]
    ]
    title = "every run emitted exactly the requested tokens and no meta token"
    claims = [claim(title, len(bad), "<=", 0, "; ".join(bad) if bad else f"{len(rows)} runs checked")]
    n = CLAIM_SIZE
    q, a = by.get(("qstar", n)), by.get(("authors-recompute", n))
    title = f"qstar >= {CLAIM_SPEEDUP:.0f}x the tokens/s of authors-recompute at {n} new tokens"
    if q and a:
        s = q["speedup_vs_authors"]
        detail = f"{q['tokens_per_s']:.2f} / {a['tokens_per_s']:.3f} tokens/s = {s:.1f}x"
        claims.append(claim(title, s, ">=", CLAIM_SPEEDUP, detail))
    else:
        claims.append(
            not_applicable(title, f"qstar and authors-recompute were not both run at {n} new tokens")
        )
    for base in BASES:
        tag = base.replace("-", "_")
        title = f"qstar within {CLAIM_IDEAL}x of the ideal {steps_full} x {base} per token at {n} new tokens"
        if not (q and (b := by.get((base, n)))):
            claims.append(not_applicable(title, f"qstar and {base} were not both run at {n} new tokens"))
            continue
        v, strict = q[f"vs_ideal{steps_full}_{tag}"], q[f"vs_ideal{steps_strict}_{tag}"]
        detail = (
            f"{fmt_ms(q['ms_per_token'])} ms / ({steps_full} x {fmt_ms(b['ms_per_token'])} ms) = {v:.2f}x; "
            f"stricter {steps_strict} x base: {strict:.2f}x "
            f"({'within' if strict <= CLAIM_IDEAL else 'outside'} {CLAIM_IDEAL}x)"
        )
        claims.append(claim(title, v, "<=", CLAIM_IDEAL, detail))
    return claims


def format_table(rows, run, steps_full, steps_strict) -> str:
    i12 = f"x ideal {steps_full}"
    header = (
        f"{'provider':<18} {'new':>4} {'ms/token':>9} {'tokens/s':>9} {'x authors':>10} "
        f"{i12 + ' (qstar base)':>20} {i12 + ' (hf base)':>17}"
    )
    lines = ["", f"== Generation with thoughts, batch 1, {run.args.thought} thought tokens: {run.machine}"]
    lines += [header, "-" * len(header)]
    for r in rows:
        cells = [
            r.get(k)
            for k in (
                "speedup_vs_authors",
                f"vs_ideal{steps_full}_base_qstar",
                f"vs_ideal{steps_full}_base_hf",
            )
        ]
        x, vq, vh = ("-" if v is None else f"{v:.{d}f}" for v, d in zip(cells, (1, 2, 2)))
        lines.append(
            f"{r['provider']:<18} {r['new_tokens']:>4} {fmt_ms(r['ms_per_token']):>9} "
            f"{r['tokens_per_s']:>9.2f} {x:>10} {vq:>20} {vh:>17}"
        )
    for n in sorted({r["new_tokens"] for r in rows}):
        bases = [r for r in rows if r["new_tokens"] == n and r["provider"] in BASES]
        ideal = ", ".join(
            f"{steps_full} x {r['provider']}: {fmt_ms(steps_full * r['ms_per_token'])} ms "
            f"({steps_strict} x: {fmt_ms(steps_strict * r['ms_per_token'])} ms)"
            for r in bases
        )
        lines += [f"ideal ms/token at {n}: {ideal}"] if bases else []
    for r in (r for r in rows if r["provider"] in RECOMPUTE):
        lines.append(
            f"{r['provider']} at {r['new_tokens']}: first token {fmt_ms(r['first_token_ms'])} ms, "
            f"last {fmt_ms(r['last_token_ms'])} ms (one run)"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", help=f"new tokens per run (default {SIZES})")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 2 repeats: a smoke run")
    ap.add_argument("--thought", type=int, default=9, help="n_thought_tokens (the authors' n_ahead - 3)")
    ap.add_argument("--prompt", type=int, default=24, help="prompt length (random ids)")
    ap.add_argument("--vocab", type=int, default=32000, help="base vocabulary (+ 2 meta tokens)")
    ap.add_argument("--temperature", type=float, default=0.9, help="text sampling temperature")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    add_run_args(
        ap,
        device=None,
        memory=False,
        repeats_help="calls per fast provider and size (default 5)",
        tag_help="file name suffix (default: cpu, cpu_quick with --quick)",
    )
    args = ap.parse_args(argv)
    args.sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else SIZES))
    args.repeats = min(args.repeats or 5, 2) if args.quick else (args.repeats or 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.max_seconds = 60.0 if args.max_seconds is None else args.max_seconds
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run("generate", __doc__, args, "cpu", default_tag="cpu_quick" if args.quick else "cpu")
    if args.plot_only:
        return run.replot()
    run.start()
    steps_full, steps_strict = args.thought + 3, args.thought + 1
    model = dict(SMALL_MISTRAL, vocab_size=args.vocab, meta_tokens=2, dtype="float32")
    print(
        f"model {model}, batch 1, prompt {args.prompt} tokens, n_thought_tokens={args.thought} "
        f"(n_ahead={steps_full}), text temperature {args.temperature}, thoughts sampled at 1.0"
    )
    method = QuietStarConfig(n_thought_tokens=args.thought, eval_thought_temperature=1.0)
    ours, authors = qstar_pair(
        method, args.vocab, seed=args.seed, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD
    )
    ours.eval(), authors.lm.eval()
    prompt = torch.randint(
        3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed + 1)
    )
    run.progress("agreement check (first token, greedy thoughts)")
    agree = agreement(ours, authors, prompt, args)
    print(
        "agreement on the first token: authors vs fused logits rel {authors_vs_fused_logits_rel:.1e}, "
        "qstar vs fused {qstar_vs_fused_logits_rel:.1e} (same thought: {qstar_same_thought_as_fused}), "
        "base-qstar vs HF {base_qstar_vs_hf_logits_rel:.1e}".format(**agree)
    )
    names = [p for p in PROVIDERS if p in args.providers]
    rows = measure(make_calls(ours, authors, prompt, args), names, args.sizes, args, run)
    add_ratios(rows, steps_full, steps_strict)
    return run.finish(
        rows,
        check_claims(rows, steps_full, steps_strict),
        report=format_table(rows, run, steps_full, steps_strict),
        config={"model": model, "ideal_steps": {"claim": steps_full, "strict": steps_strict}},
        checks={"agreement": agree},
    )


if __name__ == "__main__":
    sys.exit(main())
