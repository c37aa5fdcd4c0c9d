#!/usr/bin/env python
"""What would thought attention cost on an H100? An analytic model: FLOPs, HBM bytes, implied times.

It is a model, not a measurement; ``mask_attention.py`` prints it beside measured times on a GPU
and on its own elsewhere.

    python benchmarks/attention_model.py                   # the GPU claim config + a depth sweep
    python benchmarks/attention_model.py --L 256 --depths 8 14 20 --B 8

Machine: H100 SXM, 989 TFLOP/s dense bf16/fp16 on the tensor cores, 3.35 TB/s HBM3, and 67 TFLOP/s
fp32 on the CUDA cores (the row-wise dot products of the diagonal keys do not use tensor cores).

Per provider and mode, the model counts
  * tensor-core FLOPs of the tiles a kernel actually computes (masked-out entries of a computed
    tile count: that is the waste of a block-sparse or dense kernel),
  * CUDA-core FLOPs (our diagonal keys),
  * HBM bytes: every tensor read or written once per kernel (tiles re-read from L2 are free), plus
    what the provider materialises (the dense mask, ``repeat_kv`` copies, score matrices),
  * kernel launches.
Time = max(tensor FLOPs / 989e12 + CUDA-core FLOPs / 67e12, bytes / 3.35e12) (a roofline), and a
second time that adds ``--launch-us`` (default 4 us) per kernel launch, since at L = 256 a whole
attention call moves only a few MB and latency matters. Occupancy, L2 hits and pipelining are not
modelled: treat ratios within ~1.5x as ties.

Backward conventions: a flash-style backward recomputes the scores, so it costs 5 tile matmuls
(S, dP, dV, dQ, dK) against the forward's 2; an eager backward saves the probabilities and costs 4.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from _report import write_results

TC_FLOPS = 989e12  # dense bf16/fp16 tensor-core FLOP/s, H100 SXM
SIMT_FLOPS = 67e12  # fp32 CUDA-core FLOP/s, H100 SXM
HBM_BYTES = 3.35e12  # HBM3 bytes/s, H100 SXM
MACHINE = "modelled H100 SXM (989 TFLOP/s bf16 tensor, 67 TFLOP/s fp32 CUDA cores, 3.35 TB/s)"

#: The configuration of the issue's GPU claim: L = 256, depth 14, bf16, Mistral-7B heads, and the
#: authors' micro-batch of 8 rows (4 sequences x 2 rationales).
CLAIM_CFG = {"B": 8, "Hq": 32, "Hkv": 8, "D": 128, "dtype": "bfloat16", "L": 256, "depth": 14}
PROVIDERS = ["original", "eager", "flex", "triton", "flash_attn"]
#: Every provider name the model knows ("cuda" is modelled like "triton": the same algorithm).
MODELLED = set(PROVIDERS) | {"cuda"}
FLEX_BLOCK = 128  # FlexAttention's default BlockMask block size
TILE = 64  # our and flash-attn's typical query/key tile at D=128

_ELT = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _diag_tile_entries(L: int, tile: int) -> float:
    """Score entries a causal tiled kernel computes: L^2/2 plus the upper halves of the diagonal
    tiles it computes in full."""
    n = math.ceil(L / tile)
    full_below = n * (n - 1) / 2 * tile * tile
    return min(full_below + n * tile * tile, L * L)


def model(provider: str, cfg: dict, mode: str) -> dict:
    """FLOPs, bytes and launches of one provider; ``mode`` is "fwd" or "fb" (forward+backward)."""
    B, Hq, Hkv, L, D, a = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["L"], cfg["D"], cfg["depth"]
    e = _ELT[cfg["dtype"]]
    S = (a + 1) * L
    fb = mode == "fb"
    q_bytes = B * Hq * L * D * e  # q, out, dout, dq are each this size
    kv_bytes = B * Hkv * S * D * e  # k or v, all steps
    kv_text_bytes = B * Hkv * L * D * e
    tc = simt = 0.0
    nbytes = 0.0
    launches = 0

    if provider in ("original", "eager"):
        # The authors' step: build/concatenate the dense (B, 1, L, S) additive mask in the model
        # dtype, repeat_kv copies of k and v to Hq heads, then attention over all S keys.
        mask = B * L * S * e
        rep = B * Hq * S * D * e  # one repeated k or v
        nbytes += 2 * mask  # concatenation: read the old blocks, write the new mask
        nbytes += 2 * (kv_bytes + rep)  # repeat_kv of k and v: read Hkv heads, write Hq heads
        launches += 4
        unit = 2 * B * Hq * L * S * D  # FLOPs of one (L x S x D) matmul over all heads
        scores = B * Hq * L * S
        if provider == "original":
            # GPU SDPA with an arbitrary additive mask: the memory-efficient kernel, flash-style
            # (no score matrix in HBM), reading the mask tile of every head.
            tc += 2 * unit
            nbytes += 2 * q_bytes + 2 * rep + Hq * mask
            launches += 1
            if fb:
                tc += 5 * unit
                nbytes += 4 * q_bytes + 4 * rep + Hq * mask  # q, out, dout, dq; k, v, dk, dv (Hq heads)
                nbytes += 2 * rep + 2 * kv_bytes  # sum the repeated dk, dv back to Hkv heads
                launches += 4
        else:
            # HF eager: fp32 scores in HBM, + mask, softmax in fp32, cast, P @ V.
            tc += 2 * unit
            nbytes += 2 * q_bytes + 2 * rep + mask + scores * (4 + 4 + 4 + 4 + 4 + e + e)
            launches += 5
            if fb:
                tc += 4 * unit
                nbytes += 4 * q_bytes + 4 * rep + scores * (e + 4 + 4 + 4 + 4 + e + e)
                nbytes += 2 * rep + 2 * kv_bytes
                launches += 7
    elif provider == "flex":
        # Block-sparse: every 128 x 128 block that holds a live entry is computed in full. The
        # text block is causal; each thought block has L / 128 diagonal blocks for L live entries.
        n = math.ceil(L / FLEX_BLOCK)
        blocks = n * (n + 1) / 2 + a * n
        entries = B * Hq * blocks * FLEX_BLOCK * FLEX_BLOCK
        tc += 2 * 2 * entries * D
        nbytes += 2 * q_bytes + 2 * kv_bytes
        launches += 1
        if fb:
            tc += 5 * 2 * entries * D
            nbytes += 4 * q_bytes + 4 * kv_bytes
            launches += 2
    elif provider in ("triton", "cuda"):
        # Causal flash tiles over the text, then a row-wise dot product per thought key.
        entries = B * Hq * _diag_tile_entries(L, TILE)
        tc += 2 * 2 * entries * D
        simt += 2 * 2 * B * Hq * a * L * D  # q.k and p*v per diagonal key
        nbytes += 2 * q_bytes + 2 * kv_bytes
        launches += 1
        if fb:
            tc += 5 * 2 * entries * D
            simt += 5 * 2 * B * Hq * a * L * D  # s, dp, dq, dk, dv per diagonal key
            thought_kv = kv_bytes - kv_text_bytes
            # row kernel: q, out, dout, thought k/v -> delta, fp32 dq, thought dk/dv (each once)
            nbytes += 3 * q_bytes + 2 * thought_kv + 2 * q_bytes + 2 * thought_kv
            nbytes += 2 * q_bytes + 4 * kv_text_bytes  # text dk, dv: q, dout, k, v -> dk, dv
            nbytes += 2 * q_bytes + 2 * kv_text_bytes + 4 * q_bytes  # text dq: + read/write fp32 dq
            launches += 3
    elif provider == "flash_attn":
        # Causal attention over the text block alone: the floor.
        entries = B * Hq * _diag_tile_entries(L, TILE)
        tc += 2 * 2 * entries * D
        nbytes += 2 * q_bytes + 2 * kv_text_bytes
        launches += 1
        if fb:
            tc += 5 * 2 * entries * D
            nbytes += 4 * q_bytes + 4 * kv_text_bytes + 2 * q_bytes  # + fp32 dq accumulator
            launches += 3
    else:
        raise KeyError(provider)

    t_compute = tc / TC_FLOPS + simt / SIMT_FLOPS
    t_memory = nbytes / HBM_BYTES
    t = max(t_compute, t_memory)
    return {
        "provider": provider,
        "mode": mode,
        "tc_gflop": tc / 1e9,
        "simt_gflop": simt / 1e9,
        "hbm_mb": nbytes / 2**20,
        "launches": launches,
        "bound": "compute" if t_compute >= t_memory else "memory",
        "model_us": t * 1e6,
        "model_launch_us": (t + launches * LAUNCH_US * 1e-6) * 1e6,
    }


LAUNCH_US = 4.0


def model_table(cfg: dict, providers=PROVIDERS) -> list[dict]:
    rows = []
    for mode in ("fwd", "fb"):
        for p in providers:
            rows.append({**cfg, **model(p, cfg, mode)})
    return rows


def ratios(rows: list[dict]) -> dict:
    """The ratios the GPU claims are about, from modelled times (roofline and with launches)."""
    by = {(r["provider"], r["mode"]): r for r in rows}
    out = {}
    for key in ("model_us", "model_launch_us"):
        fb = {p: by[(p, "fb")][key] for p in {r["provider"] for r in rows}}
        out[key] = {
            "flex / triton (fwd+bwd)": fb["flex"] / fb["triton"],
            "triton / flash_attn (fwd+bwd)": fb["triton"] / fb["flash_attn"],
            "original / triton (fwd+bwd)": fb["original"] / fb["triton"],
        }
    return out


def format_model(rows: list[dict], title: str = "") -> str:
    r0 = rows[0]
    head = (
        f"{'provider':<11} {'mode':<7} {'TC GFLOP':>9} {'SIMT GFLOP':>10} {'HBM MB':>9} {'launch':>6} "
        f"{'bound':>8} {'model us':>9} {'+launch us':>10}"
    )
    lines = [
        title
        or (
            f"Analytic model, {MACHINE}: B={r0['B']}, Hq={r0['Hq']}, Hkv={r0['Hkv']}, D={r0['D']}, "
            f"{r0['dtype']}, L={r0['L']}, depth {r0['depth']} (modelled, not measured)"
        ),
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r['provider']:<11} {('fwd' if r['mode'] == 'fwd' else 'fwd+bwd'):<7} {r['tc_gflop']:>9.2f} "
            f"{r['simt_gflop']:>10.3f} {r['hbm_mb']:>9.1f} {r['launches']:>6} {r['bound']:>8} "
            f"{r['model_us']:>9.1f} {r['model_launch_us']:>10.1f}"
        )
    return "\n".join(lines)


def format_ratios(rat: dict) -> str:
    lines = ["Modelled ratios (roofline | roofline + launch latency):"]
    for name in rat["model_us"]:
        lines.append(f"  {name:<32} {rat['model_us'][name]:6.2f}x | {rat['model_launch_us'][name]:6.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    global LAUNCH_US
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k in ("B", "Hq", "Hkv", "D", "L"):
        ap.add_argument(f"--{k}", type=int, default=CLAIM_CFG[k])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8, 14, 20])
    ap.add_argument("--dtype", default=CLAIM_CFG["dtype"], choices=sorted(_ELT))
    ap.add_argument("--launch-us", type=float, default=LAUNCH_US, help="latency per kernel launch (us)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    LAUNCH_US = args.launch_us
    all_rows = []
    for depth in args.depths:
        cfg = {k: getattr(args, k) for k in ("B", "Hq", "Hkv", "D", "L")} | {
            "dtype": args.dtype,
            "depth": depth,
        }
        rows = model_table(cfg)
        all_rows += rows
        print(format_model(rows))
        print(format_ratios(ratios(rows)))
        print()
    stem = os.path.join(args.out_dir, "attention_model_h100")
    results = {
        "benchmark": "attention_model",
        "question": __doc__.strip().splitlines()[0],
        "machine": {"description": MACHINE},
        "config": {"args": vars(args), "launch_us": LAUNCH_US},
        "rows": all_rows,
        "claims": [],
    }
    print("wrote " + ", ".join(write_results(stem, results, plot=not args.no_plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
