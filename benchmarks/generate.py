#!/usr/bin/env python
"""Generation with thoughts: ``qstar.generate`` against the authors' recompute loop and the base model.

The question a user asks: "how much does thinking before every token cost when I generate, with
this package and with the authors' code, and how close is it to the best one can hope for?"

Providers (the same weights, the same prompt, batch 1, text sampled at temperature 0.9 like the
authors' ``zero-shotcot-eval.py``, the meta tokens never emitted, EOS never stops a run):

  authors-recompute  the authors' generation loop (``zero-shotcot-eval.py``, ``quietstar.md``
                     section 11.1): for every new token, the whole eval-mode training forward over the
                     entire current sequence, no KV cache kept across tokens; keep the last position's
                     mixed logits, set the ids >= the base vocabulary (the meta tokens) to -inf,
                     ``multinomial(softmax(z / 0.9))``, append, repeat. The forward is
                     ``qstar/reference.py`` (dense additive masks grown every pass, one-hot
                     ``(N, V) @ E`` inputs for sampled tokens, full-vocabulary logits at every pass,
                     hard Gumbel-softmax sampling) with the authors' eval overrides
                     ``n_ahead_talk = 1``, ``n_passes = 1`` and ``n_ahead = 12`` (the training
                     script's: 9 sampled thought tokens; their eval script passes 8 for the released
                     8-ahead checkpoint), so 12 transformer passes over the sequence per new token.
                     See "What the authors' label-less forward does" below.
  recompute-fused    the same loop with our fused ``QuietStarForCausalLM.forward(ids,
                     output_logits=True)`` in eval mode: the gain of the kernels alone, the
                     algorithm unchanged (still a thought at every position, every token).
  qstar              ``qstar.generate(model, ids, max_new_tokens, n_thought_tokens=9)``:
                     a KV cache for the text, one thought at the newest position in a private cache
                     branch (``n + 1 = 10`` decoder calls per token for the ``<start> t1..t9 <end>``
                     thought, the text token sharing a call with ``<start>``).
  base-hf            the base model's own ``transformers`` ``generate`` (KV cache, sampling, no
                     thoughts; an unpatched copy of the same weights).
  base-qstar         ``qstar.generate(..., think=False)``: our decode loop without thoughts.

The ideal cost of thinking before every token: a new token costs one text token and an
``n + 2``-token thought (``<start> t1..tn <end>``, quietstar.md section 11.2) through the
transformer, ``n + 3 = 12`` decode steps for ``n = 9``, so ideal = 12 x the base model's time per
token. The claim uses this ideal: the algorithm as specified pushes 12 tokens per new token
through the model, whatever the implementation. The stricter ``1 + n = 10`` x base (counting only the
sampled thought tokens, as if the delimiters were free) is reported beside it. Both are measured
against base-hf and base-qstar. ms/token = the wall time of one whole call (prefill included) / new
tokens; tokens/s is its inverse.

Timing: the fast providers (qstar, base-hf, base-qstar) are timed with ``--repeats`` calls each,
interleaved round robin after a warmup, medians reported. The recompute providers are quadratic in
the length (``12 N`` token-forwards and ~30 ``(N, V)``-sized products per new token) and are run once
per size after a 2-token warmup; their first and last token times are recorded too.

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

Model: the training-step benchmark's small Mistral with the Mistral-7B vocabulary (32000 + the 2
meta tokens), so the LM head weighs as it does in practice: 4 layers, hidden 256, 8 query / 2
key-value heads, MLP 896, fp32, a random (non-zero) last mixing-head layer. Prompt: 24 random ids.

    python benchmarks/generate.py            # 64 and 256 new tokens (minutes on 2 cores)
    python benchmarks/generate.py --check    # exit 1 unless every claim PASSes
    python benchmarks/generate.py --quick    # 8 and 16 new tokens: a smoke run
    python benchmarks/generate.py --plot-only [--quick]   # re-plot from the JSON
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
from _common import fmt_ms, format_machine, machine_info, time_calls, write_csv, write_json  # noqa: E402

from qstar import QuietStarConfig, QuietStarForCausalLM, generate  # noqa: E402
from qstar.reference import plain_quietstar_forward  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")
PROVIDERS = ["authors-recompute", "recompute-fused", "qstar", "base-hf", "base-qstar"]
RECOMPUTE = ("authors-recompute", "recompute-fused")
THINKING = ("authors-recompute", "recompute-fused", "qstar")
BASES = ("base-qstar", "base-hf")
MODEL = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=896,
    num_attention_heads=8,
    num_key_value_heads=2,
)
PAD = EOS = 2
SIZES, QUICK_SIZES = [64, 256], [8, 16]
CLAIM_SPEEDUP, CLAIM_IDEAL, CLAIM_SIZE = 20.0, 1.5, 256


# --------------------------------------------------------------------------------------------
# The model and the providers
# --------------------------------------------------------------------------------------------


def build(args):
    """Our wrapper, an unpatched HF twin of its base model, and the authors' separate heads."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(args.seed)
    V = args.vocab
    cfg = MistralConfig(
        **MODEL,
        vocab_size=V,
        sliding_window=None,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    base = MistralForCausalLM(cfg)
    base.resize_token_embeddings(V + 2, mean_resizing=False)  # the meta tokens: ids V and V + 1
    base.eval()
    hf_lm = copy.deepcopy(base)  # stays unpatched: base-hf's generate and the authors' dense masks
    method = QuietStarConfig(n_thought_tokens=args.thought, eval_thought_temperature=1.0)
    ours = QuietStarForCausalLM(base, method, start_id=V, end_id=V + 1, pad_token_id=PAD).eval()
    ours.init_meta_embeddings(12)
    with torch.no_grad():  # a trained-looking mixing head: w != 0, the mix is not the base model
        ours.mixing_head[-1].weight.normal_(0, 0.02)
    authors = (
        hf_lm,
        copy.deepcopy(ours.mixing_head),
        torch.nn.Parameter(ours.start_embedding.detach().clone()),
        torch.nn.Parameter(ours.end_embedding.detach().clone()),
    )
    return ours, hf_lm, authors


def make_prompt(args):
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(3, args.vocab, (1, args.prompt), generator=g)


def authors_logits(authors, ids, args, thought_tokens=None):
    """The authors' eval-mode forward over ``ids``: the ``<end>``-pass mixed logits, ``(1, N, V+2)``."""
    lm, head, start, end = authors
    out = plain_quietstar_forward(
        lm,
        head,
        start,
        end,
        ids,
        torch.ones_like(ids),
        n_ahead=args.thought + 3,
        n_ahead_talk=1,
        n_passes=1,
        start_id=args.vocab,
        end_id=args.vocab + 1,
        pad_token_id=PAD,
        thought_tokens=thought_tokens,
        intermediate_losses=True,
        output_logits=True,
    )
    return out["logits"]


def sample_last(logits, vocab, temperature):
    """``zero-shotcot-eval.py``: ids >= the base vocabulary to -inf, multinomial at ``temperature``."""
    z = logits[:, -1].clone()
    z[:, vocab:] = -float("inf")
    return torch.multinomial(torch.softmax(z / temperature, dim=-1), 1)


def recompute_loop(forward, prompt, n_new, args, token_ms=None):
    """Generate ``n_new`` tokens, re-running ``forward`` over the whole sequence for each one."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n_new):
            t0 = time.perf_counter()
            tok = sample_last(forward(ids), args.vocab, args.temperature)
            ids = torch.cat([ids, tok], dim=1)
            if token_ms is not None:
                token_ms.append((time.perf_counter() - t0) * 1e3)
    return ids[:, prompt.shape[1] :]


def make_calls(ours, hf_lm, authors, prompt, args):
    """name -> f(n_new, token_ms=None) returning the ``(1, n_new)`` new tokens."""
    V, temp = args.vocab, args.temperature

    def authors_recompute(n, token_ms=None):
        return recompute_loop(lambda ids: authors_logits(authors, ids, args), prompt, n, args, token_ms)

    def recompute_fused(n, token_ms=None):
        return recompute_loop(lambda ids: ours(ids, output_logits=True).logits, prompt, n, args, token_ms)

    def qstar(n, token_ms=None):
        out = generate(
            ours,
            prompt,
            max_new_tokens=n,
            n_thought_tokens=args.thought,
            temperature=temp,
            thought_temperature=1.0,
            eos_token_id=None,
        )
        return out.new_tokens

    def base_qstar(n, token_ms=None):
        out = generate(ours, prompt, max_new_tokens=n, think=False, temperature=temp, eos_token_id=None)
        return out.new_tokens

    def base_hf(n, token_ms=None):
        out = hf_lm.generate(
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
        "authors-recompute": authors_recompute,
        "recompute-fused": recompute_fused,
        "qstar": qstar,
        "base-hf": base_hf,
        "base-qstar": base_qstar,
    }


def agreement(ours, hf_lm, authors, prompt, args):
    """The providers compute the same next-token distribution for the first new token.

    With greedy thoughts (so all three think the same thought): the fused forward's last-position
    mixed logits and thought, the authors' forward given that thought, and ``generate``'s first step;
    and the base model's last logits against ``generate(think=False)``'s. Relative max differences.
    """
    n, P = args.thought, prompt.shape[1]
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
        base = hf_lm(prompt).logits[0, -1]
    gen = generate(
        ours,
        prompt,
        max_new_tokens=1,
        n_thought_tokens=n,
        temperature=0,
        thought_temperature=0,
        eos_token_id=None,
        return_thoughts=True,
        output_logits=True,
    )
    gen_base = generate(ours, prompt, max_new_tokens=1, think=False, temperature=0, output_logits=True)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    same_thought = torch.equal(gen.thoughts[0, 0], fused.thought_tokens[:, 0, P - 1])
    return {
        "authors_vs_fused_logits_rel": rel(theirs, want),
        "qstar_vs_fused_logits_rel": rel(gen.logits[0, 0], want),
        "qstar_same_thought_as_fused": bool(same_thought),
        "base_qstar_vs_hf_logits_rel": rel(gen_base.logits[0, 0], base),
    }


# --------------------------------------------------------------------------------------------
# Measurement, claims, output
# --------------------------------------------------------------------------------------------


def measure(calls, names, sizes, args, progress):
    """rows: one per (provider, size), with the tokens each run produced checked."""
    rows = []
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    fast = [p for p in names if p not in RECOMPUTE]
    for n in sizes:
        for name in [p for p in names if p in RECOMPUTE]:
            progress(f"{name}: {n} new tokens, once (after a 2-token warmup)")
            calls[name](2)
            token_ms: list[float] = []
            t0 = time.perf_counter()
            outputs[(name, n)] = calls[name](n, token_ms)
            ms = (time.perf_counter() - t0) * 1e3
            rows.append(
                dict(
                    provider=name,
                    new_tokens=n,
                    median_ms=ms,
                    p25_ms=ms,
                    p75_ms=ms,
                    min_ms=ms,
                    repeats=1,
                    first_token_ms=token_ms[0],
                    last_token_ms=token_ms[-1],
                )
            )
        if fast:
            progress(f"{fast}: {n} new tokens, {args.repeats} calls each, interleaved")

            def keep(name, n=n):
                return lambda: outputs.__setitem__((name, n), calls[name](n))

            timings = time_calls(
                {p: keep(p) for p in fast},
                warmup=args.warmup,
                repeats=args.repeats,
                min_repeats=min(args.repeats, 2),
                max_seconds=args.max_seconds,
            )
            for name in fast:
                t = timings[name]
                rows.append(
                    dict(
                        provider=name,
                        new_tokens=n,
                        median_ms=t.median,
                        p25_ms=t.quantile(0.25),
                        p75_ms=t.quantile(0.75),
                        min_ms=t.min,
                        repeats=t.n,
                    )
                )
    for r in rows:
        toks = outputs[(r["provider"], r["new_tokens"])]
        r["ms_per_token"] = r["median_ms"] / r["new_tokens"]
        r["tokens_per_s"] = r["new_tokens"] / (r["median_ms"] / 1e3)
        r["emitted"] = int(toks.shape[1])
        r["meta_emitted"] = int((toks >= args.vocab).sum())
    order = {p: i for i, p in enumerate(PROVIDERS)}
    rows.sort(key=lambda r: (r["new_tokens"], order[r["provider"]]))
    return rows


def add_ratios(rows, steps_full, steps_strict):
    """speedup vs authors-recompute; thinking providers' ms/token over the ideal (k x base)."""
    by = {(r["provider"], r["new_tokens"]): r for r in rows}
    for r in rows:
        n = r["new_tokens"]
        a = by.get(("authors-recompute", n))
        if a:
            r["speedup_vs_authors"] = a["median_ms"] / r["median_ms"]
        if r["provider"] not in THINKING:
            continue
        for base in BASES:
            b = by.get((base, n))
            if b is None:
                continue
            tag = base.replace("-", "_")
            r[f"ideal{steps_full}_{tag}_ms_per_token"] = steps_full * b["ms_per_token"]
            r[f"vs_ideal{steps_full}_{tag}"] = r["ms_per_token"] / (steps_full * b["ms_per_token"])
            r[f"vs_ideal{steps_strict}_{tag}"] = r["ms_per_token"] / (steps_strict * b["ms_per_token"])


def check_claims(rows, args, steps_full, steps_strict):
    by = {(r["provider"], r["new_tokens"]): r for r in rows}
    claims = []
    bad = [
        f"{r['provider']}@{r['new_tokens']}: {r['emitted']} tokens, {r['meta_emitted']} meta"
        for r in rows
        if r["emitted"] != r["new_tokens"] or r["meta_emitted"]
    ]
    claims.append(
        {
            "claim": "every run emitted exactly the requested tokens and no meta token",
            "result": "FAIL" if bad else "PASS",
            "detail": "; ".join(bad) if bad else f"{len(rows)} runs checked",
        }
    )
    n = CLAIM_SIZE
    q, a = by.get(("qstar", n)), by.get(("authors-recompute", n))
    c = {"claim": f"qstar >= {CLAIM_SPEEDUP:.0f}x the tokens/s of authors-recompute at {n} new tokens"}
    if q and a:
        s = q["speedup_vs_authors"]
        c.update(
            result="PASS" if s >= CLAIM_SPEEDUP else "FAIL",
            value=s,
            detail=f"{q['tokens_per_s']:.2f} / {a['tokens_per_s']:.3f} tokens/s = {s:.1f}x",
        )
    else:
        c.update(result="N/A", detail=f"qstar and authors-recompute were not both run at {n} new tokens")
    claims.append(c)
    for base in BASES:
        tag = base.replace("-", "_")
        c = {
            "claim": f"qstar within {CLAIM_IDEAL}x of the ideal {steps_full} x {base} per token "
            f"at {n} new tokens"
        }
        b = by.get((base, n))
        if q and b:
            v = q[f"vs_ideal{steps_full}_{tag}"]
            strict = q[f"vs_ideal{steps_strict}_{tag}"]
            c.update(
                result="PASS" if v <= CLAIM_IDEAL else "FAIL",
                value=v,
                detail=(
                    f"{fmt_ms(q['ms_per_token'])} ms / ({steps_full} x {fmt_ms(b['ms_per_token'])} ms) = "
                    f"{v:.2f}x; stricter {steps_strict} x base: {strict:.2f}x "
                    f"({'within' if strict <= CLAIM_IDEAL else 'outside'} {CLAIM_IDEAL}x)"
                ),
            )
        else:
            c.update(result="N/A", detail=f"qstar and {base} were not both run at {n} new tokens")
        claims.append(c)
    return claims


def plot(rows, png, title, steps_full):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["new_tokens"] for r in rows})
    by = {(r["provider"], r["new_tokens"]): r for r in rows}
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    ideal_name = f"ideal\n({steps_full}x base-qstar)"
    # The ideal as its own hatched column: base-qstar's tokens/s / steps_full.
    values = {(p, n): by[(p, n)]["tokens_per_s"] for p, n in by}
    if "base-qstar" in names:
        names.append(ideal_name)
        for n in sizes:
            if ("base-qstar", n) in by:
                values[(ideal_name, n)] = by[("base-qstar", n)]["tokens_per_s"] / steps_full
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / max(1, len(sizes))
    for i, n in enumerate(sizes):
        xs, vals, hatches = [], [], []
        for j, p in enumerate(names):
            if (p, n) in values:
                xs.append(j + (i - (len(sizes) - 1) / 2) * width)
                vals.append(values[(p, n)])
                hatches.append("//" if p == ideal_name else "")
        bars = ax.bar(xs, vals, width, label=f"{n} new tokens", color=colors[i % len(colors)])
        for bar, v, h in zip(bars, vals, hatches):
            bar.set_hatch(h)
            if h:
                bar.set_alpha(0.5)
            ax.annotate(
                f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log scale, higher is better)")
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", help=f"new tokens per run (default {SIZES})")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 2 repeats: a smoke run")
    ap.add_argument("--thought", type=int, default=9, help="n_thought_tokens (the authors' n_ahead - 3)")
    ap.add_argument("--prompt", type=int, default=24, help="prompt length (random ids)")
    ap.add_argument("--vocab", type=int, default=32000, help="base vocabulary (+ 2 meta tokens)")
    ap.add_argument("--temperature", type=float, default=0.9, help="text sampling temperature")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--repeats", type=int, default=5, help="calls per fast provider and size")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="cap per fast provider and size")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--tag", help="file name suffix (default: cpu, cpu_quick with --quick)")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every claim PASSes")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="re-plot the JSON of a previous run")
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else SIZES
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    steps_full, steps_strict = args.thought + 3, args.thought + 1
    tag = args.tag or ("cpu_quick" if args.quick else "cpu")
    stem = os.path.join(args.out_dir, f"generate_{tag}")
    if args.plot_only:
        import json

        with open(stem + ".json") as f:
            data = json.load(f)
        a = data["args"]
        title = (
            f"Generation with {a['thought']} thought tokens per new token, batch 1, prompt {a['prompt']}, "
            f"vocab {a['vocab']}+2\n{format_machine(data['machine'])}"
        )
        print("wrote", plot(data["rows"], stem + ".png", title, data["ideal_steps"]["claim"]))
        return 0
    info = machine_info("cpu")
    info["loadavg_before"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"Machine: {format_machine(info)}")
    print(
        f"model {dict(MODEL, vocab_size=args.vocab)} (+2 meta tokens), fp32, batch 1, prompt {args.prompt} "
        f"tokens, n_thought_tokens={args.thought} (n_ahead={args.thought + 3}), text temperature "
        f"{args.temperature}, thoughts sampled at 1.0"
    )
    ours, hf_lm, authors = build(args)
    prompt = make_prompt(args)
    progress("agreement check (first token, greedy thoughts)")
    agree = agreement(ours, hf_lm, authors, prompt, args)
    print(
        "agreement on the first token: authors vs fused logits rel {authors_vs_fused_logits_rel:.1e}, "
        "qstar vs fused {qstar_vs_fused_logits_rel:.1e} (same thought: {qstar_same_thought_as_fused}), "
        "base-qstar vs HF {base_qstar_vs_hf_logits_rel:.1e}".format(**agree)
    )
    calls = make_calls(ours, hf_lm, authors, prompt, args)
    names = [p for p in PROVIDERS if p in args.providers]
    rows = measure(calls, names, sorted(args.sizes), args, progress)
    add_ratios(rows, steps_full, steps_strict)
    claims = check_claims(rows, args, steps_full, steps_strict)
    info["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    wall = time.perf_counter() - t0

    print(f"\n== Generation with thoughts, batch 1, {args.thought} thought tokens: {format_machine(info)}")
    i12 = f"x ideal {steps_full}"
    header = (
        f"{'provider':<18} {'new':>4} {'ms/token':>9} {'tokens/s':>9} {'x authors':>10} "
        f"{i12 + ' (qstar base)':>20} {i12 + ' (hf base)':>17}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:

        def f(key, fmt, r=r):
            v = r.get(key)
            return "-" if v is None else format(v, fmt)

        vs_q = f(f"vs_ideal{steps_full}_base_qstar", ".2f")
        vs_h = f(f"vs_ideal{steps_full}_base_hf", ".2f")
        print(
            f"{r['provider']:<18} {r['new_tokens']:>4} {fmt_ms(r['ms_per_token']):>9} "
            f"{r['tokens_per_s']:>9.2f} {f('speedup_vs_authors', '.1f'):>10} {vs_q:>20} {vs_h:>17}"
        )
    for n in sorted(args.sizes):
        bases = {r["provider"]: r for r in rows if r["new_tokens"] == n and r["provider"] in BASES}
        if bases:
            ideal = ", ".join(
                f"{steps_full} x {b}: {fmt_ms(steps_full * r['ms_per_token'])} ms "
                f"({steps_strict} x: {fmt_ms(steps_strict * r['ms_per_token'])} ms)"
                for b, r in bases.items()
            )
            print(f"ideal ms/token at {n}: {ideal}")
    slow = [r for r in rows if r["provider"] in RECOMPUTE]
    for r in slow:
        print(
            f"{r['provider']} at {r['new_tokens']}: first token {fmt_ms(r['first_token_ms'])} ms, "
            f"last {fmt_ms(r['last_token_ms'])} ms (one run)"
        )
    print(f"load average before/after: {info['loadavg_before']} / {info['loadavg_after']}")
    print("\nClaims:")
    for c in claims:
        print(f"  [{c['result']:>4}] {c['claim']}\n         {c['detail']}")

    os.makedirs(args.out_dir, exist_ok=True)
    write_csv(stem + ".csv", rows)
    write_json(
        stem + ".json",
        {
            "benchmark": "generate",
            "machine": info,
            "model": dict(MODEL, vocab_size=args.vocab, meta_tokens=2, dtype="float32"),
            "args": vars(args),
            "ideal_steps": {"claim": steps_full, "strict": steps_strict},
            "agreement": agree,
            "claims": claims,
            "rows": rows,
            "wall_s": wall,
        },
    )
    outputs = [stem + ".csv", stem + ".json"]
    if not args.no_plot:
        title = (
            f"Generation with {args.thought} thought tokens per new token, batch 1, prompt {args.prompt}, "
            f"vocab {args.vocab}+2\n{format_machine(info)}"
        )
        outputs.append(plot(rows, stem + ".png", title, steps_full))
    print(f"\nwrote {', '.join(os.path.relpath(p) for p in outputs)}; wall {wall:.0f} s")
    failed = any(c["result"] != "PASS" for c in claims)
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
