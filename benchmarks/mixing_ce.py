#!/usr/bin/env python
"""How much memory and time do the fused LM-head ops save against materialising the logits?

``mixed_token_logprobs`` and ``sample_thought_tokens`` against the unfused PyTorch computation that
materialises the (N, V) logits, forward and forward+backward, time and peak extra memory, over N and V.

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

Claims (N=2048, H=256, V=32000, fp32, fwd+bwd, for each op): peak extra memory <= 0.25 x and time
<= 1.2 x the best unfused provider.

fwd+bwd: leaves h_base, h_thought, w, weight (h, weight) require grad; the backward is
``(logp * g).sum().backward()`` with a fixed random dense g (every row weighted: the fused backward
skips rows whose weight is 0, which the policy loss of Quiet-STaR often has; not used here). Times
are medians after warmup, all providers of one configuration interleaved round robin. Peak extra
memory (see ``_common.py``) includes the gradients.

    python benchmarks/mixing_ce.py            # quick: the claim point and one V=128256 point (~3 min)
    python benchmarks/mixing_ce.py --full     # N 512/1024/2048 x V 32000/128256
    python benchmarks/mixing_ce.py --check    # exit 1 unless every claim PASSes
    python benchmarks/mixing_ce.py --plot-only [--full]
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from _common import peak_extra_memory, time_calls
from _report import (
    DTYPES,
    Run,
    add_run_args,
    claim,
    dtype_name,
    fmt_mb,
    fmt_ms,
    fmt_ratio,
    not_applicable,
    parser,
    spread,
)

import qstar_kernels

#: The configuration the claims are about.
HEADLINE = {"N": 2048, "H": 256, "V": 32000, "dtype": "float32"}
QUICK_GRID = [(2048, 32000), (512, 128256)]
FULL_GRID = [(N, V) for V in (32000, 128256) for N in (512, 1024, 2048)]
UNFUSED = {"mixing": ["unfused"], "sampling": ["unfused_gumbel", "unfused_multinomial", "authors"]}
BANNED = (3, 5)  # stand-ins for <|startthought|> and <|endthought|>
IGNORE = -100
NOTE = (
    "Notes: times are medians (± half the interquartile range) after warmup, providers interleaved "
    "round robin; fwd runs under no_grad, fwd+bwd backpropagates (logp * g).sum() with a dense random g. "
    "MB = peak bytes allocated above the starting level during one call (fwd+bwd includes the "
    "gradients, e.g. the (V, H) weight gradient); on the CPU from the profiler's allocator records "
    "(memory outside c10's allocator, such as BLAS workspaces, is not counted, for either side)."
)


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
    out = (
        {"unfused": mixing_unfused}
        if op == "mixing"
        else {
            "unfused_gumbel": sampling_unfused_gumbel,
            "unfused_multinomial": sampling_unfused_multinomial,
            "authors": sampling_authors,
        }
    )
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
# Measurement and claims
# --------------------------------------------------------------------------------------------


def run_config(op, N, V, args, run) -> list[dict]:
    base = make_inputs(N, args.H, V, DTYPES[args.dtype], run.device, args.seed)
    provs = providers(op, run.device, args.providers)
    rows = {
        name: {"device_kind": run.device.type, "op": op, "provider": name, "N": N, "H": args.H, "V": V}
        | {"dtype": args.dtype}
        for name in provs
    }
    errors = {}

    def on_error(name, exc):
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    def call(fn, mode):
        """One call of ``fn``: forward under no_grad, or forward+backward on fresh leaves."""
        x = dict(base, gen=torch.Generator(device=run.device).manual_seed(args.seed))
        if mode == "fwd":
            return lambda: torch.no_grad()(fn)(x)
        for k in LEAVES[op]:
            x[k] = base[k].detach().clone().requires_grad_()

        def fb():
            (fn(x) * x["grad"]).sum().backward()
            for k in LEAVES[op]:
                x[k].grad = None

        return fb

    for mode in ("fwd", "fb"):
        calls = {name: call(fn, mode) for name, fn in provs.items() if name not in errors}
        run.progress(f"{op} N={N} V={V}: timing {mode}")
        timings = time_calls(
            calls,
            device=run.device,
            warmup=args.warmup,
            repeats=args.repeats,
            max_seconds=args.max_seconds,
            on_error=on_error,
        )
        for name, t in timings.items():
            rows[name].update(t.as_dict(prefix=f"{mode}_"))
        for name, fn in calls.items() if not args.no_memory else ():
            if name not in errors:
                run.progress(f"{op} N={N} V={V}: memory {mode} {name}")
                try:
                    rows[name][f"{mode}_peak_bytes"] = peak_extra_memory(fn, run.device)
                except Exception as exc:  # noqa: BLE001
                    on_error(name, exc)
    for name, why in errors.items():
        rows[name]["status"] = why
    out = list(rows.values())
    fill_ratios(out, UNFUSED[op])
    return out


def fill_ratios(rows, unfused_names):
    """Each row against the best unfused provider of its op (least time, least memory)."""
    unfused = [r for r in rows if r["provider"] in unfused_names]
    for key in ("fwd_median_ms", "fb_median_ms", "fwd_peak_bytes", "fb_peak_bytes"):
        vals = [(r[key], r["provider"]) for r in unfused if r.get(key)]
        if not vals:
            continue
        best, who = min(vals)
        for r in rows:
            if r.get(key) is not None:
                r[f"{key}_vs_unfused"] = r[key] / best
                r[f"{key}_baseline"] = who


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
        for key, bound, what in (("fb_peak_bytes", 0.25, "peak extra memory"), ("fb_median_ms", 1.2, "time")):
            title = f"{api} ({fused_name}) fwd+bwd {what} <= {bound:g} x unfused ({cfg})"
            r = head.get(fused_name)
            ratio = None if r is None else r.get(f"{key}_vs_unfused")
            if ratio is None:
                claims.append(not_applicable(title, "not run" if r is None else r.get("status", f"no {key}")))
                continue
            who = r[f"{key}_baseline"]
            fmt = (lambda b: f"{fmt_mb(b)} MB") if key.endswith("bytes") else (lambda t: f"{fmt_ms(t)} ms")
            detail = (
                f"{fused_name} {fmt(r[key])} / {who} {fmt(head[who][key])} = {ratio:.3f} "
                f"(the best unfused provider; {'medians' if key.endswith('ms') else 'one call'})"
            )
            if key == "fb_median_ms":
                detail += f"; from min times {r['fb_min_ms'] / head[who]['fb_min_ms']:.3f}"
            claims.append(claim(title, ratio, "<=", bound, detail))
    return claims


def format_table(all_rows, run) -> str:
    header = (
        f"{'provider':<20} {'fwd ms':>15} {'fwd+bwd ms':>15} {'fwd MB':>9} {'f+b MB':>9} "
        f"{'f+b time/unf':>13} {'f+b mem/unf':>12}"
    )
    lines = [f"== Fused LM-head ops vs materialised logits: {run.machine}"]
    for op, N, V in dict.fromkeys((r["op"], r["N"], r["V"]) for r in all_rows):
        rows = [r for r in all_rows if (r["op"], r["N"], r["V"]) == (op, N, V)]
        lines += [
            "",
            f"{op}: N={N}, H={rows[0]['H']}, V={V}, {rows[0]['dtype']}  (logits (N, V) = "
            f"{fmt_mb(4 * N * V)} MB in float32; ratios vs the best unfused provider)",
            header,
            "-" * len(header),
        ]
        for r in rows:
            if r.get("status"):
                lines.append(f"{r['provider']:<20} {r['status']}")
                continue
            lines.append(
                f"{r['provider']:<20} {spread(r, 'fwd_'):>15} {spread(r, 'fb_'):>15} "
                f"{fmt_mb(r.get('fwd_peak_bytes')):>9} {fmt_mb(r.get('fb_peak_bytes')):>9} "
                f"{fmt_ratio(r.get('fb_median_ms_vs_unfused')):>13} "
                f"{fmt_ratio(r.get('fb_peak_bytes_vs_unfused')):>12}"
            )
    return "\n".join(lines)


def cpu_backend_info() -> str | None:
    """The C++ extension's description of its LM-head build (private: None if it moved)."""
    try:
        from qstar_kernels import _ext

        return _ext.cpu_extension().lm_head_backend_info()
    except Exception:  # noqa: BLE001 - informative only
        return None


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--full", action="store_true", help="N 512,1024,2048 x V 32000,128256")
    ap.add_argument("--N", type=int, nargs="+", help="rows (overrides the grid; with --V)")
    ap.add_argument("--V", type=int, nargs="+", help="vocabulary sizes (overrides the grid; with --N)")
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--ops", nargs="+", default=["mixing", "sampling"], choices=["mixing", "sampling"])
    ap.add_argument("--providers", nargs="+", help="only these providers")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    add_run_args(ap, repeats_help="timed calls per provider (default 5)")
    args = ap.parse_args(argv)
    if args.N or args.V:
        args.grid = [(N, V) for V in (args.V or [HEADLINE["V"]]) for N in (args.N or [HEADLINE["N"]])]
    else:
        args.grid = FULL_GRID if args.full else QUICK_GRID
    args.dtype = dtype_name(args.dtype)
    args.repeats = args.repeats or 5
    args.warmup = 1 if args.warmup is None else args.warmup
    args.max_seconds = 20.0 if args.max_seconds is None else args.max_seconds
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(
        "mixing_ce",
        __doc__,
        args,
        args.device,
        default_tag=args.device.split(":")[0] + ("" if args.full else "_quick"),
    )
    if args.plot_only:
        return run.replot()
    run.start()
    if run.device.type == "cpu" and (info := cpu_backend_info()):
        print(info)
    selfcheck = run.memory_selfcheck()
    all_rows = [r for op in args.ops for N, V in args.grid for r in run_config(op, N, V, args, run)]
    return run.finish(
        all_rows,
        check_claims(all_rows, run.device),
        report=format_table(all_rows, run),
        config={"mode": "full" if args.full else "quick"},
        checks={"memory_selfcheck": selfcheck},
        note=NOTE,
        keep_text=True,
    )


if __name__ == "__main__":
    sys.exit(main())
