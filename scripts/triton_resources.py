"""Compile the Triton thought-attention kernels for sm_80 and sm_90 without a GPU, and report
registers, shared memory and spills of every config the autotuner may pick.

    python scripts/triton_resources.py                 # D=64 and 128, bf16, sm_80 + sm_90
    python scripts/triton_resources.py --dtype fp16 --head-dims 128 --json out.json

Each kernel is specialised exactly as a launch would specialise it (16-byte aligned pointers,
unit strides folded into constants, sizes divisible by 16 marked so) for Mistral-like shapes:
B=1, Hkv=8, Hq=8*G (G=4: Mistral), L=256, depth 14, contiguous tensors. Triton generates PTX, the ptxas that
ships with Triton builds the cubin, and ptxas is then re-run with ``-v`` on the same PTX and the
same flags to read its resource report. Exits 1 if any config spills at a head dim listed in
``--no-spill-dims`` (default 128).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this script compiles the kernels for real GPUs")

import torch  # noqa: E402

KERNELS = {
    "fwd": "thought_attention_fwd_kernel",
    "bwd_rows": "thought_attention_bwd_rows_kernel",
    "bwd_dkdv": "thought_attention_bwd_dkdv_kernel",
    "bwd_dq": "thought_attention_bwd_dq_kernel",
}
HKV = 8  # Mistral's key/value heads; the query heads are HKV * G
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _args(kind: str, D: int, dtype: torch.dtype, G: int) -> dict:
    """Example arguments of one kernel, by name (tensors stay on the CPU: only their dtype and
    alignment matter for the specialisation)."""
    B, Hkv, L, depth = 1, HKV, 256, 14
    Hq = Hkv * G
    q = torch.empty(B, Hq, L, D, dtype=dtype)
    k = torch.empty(B, Hkv, (depth + 1) * L, D, dtype=dtype)
    f32 = torch.empty(B, Hq, L, dtype=torch.float32)
    f32q = torch.empty(B, Hq, L, D, dtype=torch.float32)
    keep = torch.empty(B, L, dtype=torch.uint8)
    qk_scale = D**-0.5 * 1.4426950408889634
    common = dict(HAS_KEEP=True, BLOCK_D=max(16, D))

    def strides(prefix, t):
        return dict(zip((f"{prefix}b", f"{prefix}h", f"{prefix}l", f"{prefix}d"), t.stride(), strict=True))

    flags = dict(HAS_WINDOW=False, UPCAST=False, PRECISION="ieee")
    if kind == "fwd":
        return dict(
            Q=q, K=k, V=k, Out=q, Lse=f32, Keep=keep, **strides("stride_q", q), **strides("stride_k", k),
            **strides("stride_v", k), **strides("stride_o", q), stride_keep_b=L, stride_keep_l=1,
            Hq=Hq, L=L, D=D, DEPTH=depth, G=Hq // Hkv, WINDOW=0, qk_scale=qk_scale, **flags, **common,
        )  # fmt: skip
    base = dict(
        Q=q, K=k, V=k, dOut=q, Lse2=f32, Delta=f32, Keep=keep, **strides("stride_q", q),
        **strides("stride_k", k), **strides("stride_v", k), **strides("stride_g", q),
        stride_keep_b=L, stride_keep_l=1, Hq=Hq, L=L, D=D, G=Hq // Hkv, qk_scale=qk_scale, sm_scale=D**-0.5,
    )  # fmt: skip
    if kind == "bwd_rows":
        return dict(
            base, Out=q, dLse=f32, Lse=f32, dQ=f32q, dK=k, dV=k, **strides("stride_o", q),
            **strides("stride_dq", f32q), **strides("stride_dk", k), Hkv=Hkv, DEPTH=depth, HAS_DLSE=True,
            G_PAD=1 << (G - 1).bit_length(), **common,
        )  # fmt: skip
    if kind == "bwd_dkdv":
        return dict(base, dK=k, dV=k, **strides("stride_dk", k), Hkv=Hkv, WINDOW=0, **flags, **common)
    if kind == "bwd_dq":
        return dict(base, dQ=f32q, **strides("stride_dq", f32q), WINDOW=0, **flags, **common)
    raise KeyError(kind)


def _source(jitfn, args: dict, config):
    """The ASTSource a launch with ``args`` and ``config`` would compile (what JITFunction.run's
    binder computes: types, alignment attributes, and ints equal to 1 folded into constants)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    args = dict(args, **config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(jitfn.params):
        value = args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, attr = native_specialize_impl(
            BaseBackend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return triton.compiler.ASTSource(fn=jitfn, signature=signature, constexprs=constexprs, attrs=attrs)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_report(ptx: str, cc: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}"]
        res = subprocess.run([*cmd, src, "-o", src + ".o"], capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        out[key] = int(m.group(1)) if m else 0
    return out


def compile_one(job):
    kind, D, dtype_name, cc, G, spec = job
    import triton
    from triton.backends.compiler import GPUTarget

    from qstar_kernels.backends.attention import triton_kernels as tk

    kernel = getattr(tk, KERNELS[kind])
    config = tk._cfgs(spec)[0]
    src = _source(kernel.fn, _args(kind, D, DTYPES[dtype_name], G), config)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    rep = _ptxas_report(compiled.asm["ptx"], cc)
    return dict(
        kernel=kind, head_dim=D, dtype=dtype_name, arch=f"sm_{cc}", G=G,
        BLOCK_M=config.kwargs["BLOCK_M"], BLOCK_N=config.kwargs["BLOCK_N"],
        num_warps=config.num_warps, num_stages=config.num_stages,
        shared_bytes=int(compiled.metadata.shared), cubin_bytes=len(compiled.asm["cubin"]), **rep,
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    ap.add_argument(
        "--groups",
        type=int,
        nargs="+",
        default=[4, 1, 8],
        help="GQA group sizes Hq/Hkv; the row kernel's tiles hold a whole group (4 is Mistral's)",
    )
    ap.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=list(KERNELS))
    ap.add_argument("--no-spill-dims", type=int, nargs="*", default=[128])
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument(
        "--candidates", action="store_true", help="compile every candidate config, not only the tables'"
    )
    args = ap.parse_args(argv)

    from qstar_kernels.backends.attention import triton_kernels as tk

    def specs(kind, cc, D, G):
        if args.candidates:
            return tk.CANDIDATES[kind]
        g_pad = 1 << (G - 1).bit_length()
        return tk.table_specs(kind, tk.arch_family((cc // 10, cc % 10)), max(16, D), g_pad)

    jobs = [
        (kind, D, args.dtype, cc, G, spec)
        for kind in args.kernels
        for D in args.head_dims
        for cc in args.archs
        for G in (args.groups if kind == "bwd_rows" else [args.groups[0]])
        for spec in specs(kind, cc, D, G)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, jobs))

    import triton

    print(f"Triton {triton.__version__}, torch {torch.__version__}; compiled without a GPU for {args.archs}")
    head = f"{'kernel':9} {'D':>4} {'G':>2} {'arch':6} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} "
    head += f"{'regs':>5} {'smem KB':>8} {'spill st':>8} {'spill ld':>8} {'stack':>6}"
    print(head)
    bad = []
    for r in rows:
        print(
            f"{r['kernel']:9} {r['head_dim']:>4} {r['G']:>2} {r['arch']:6} "
            f"{r['BLOCK_M']:>4} {r['BLOCK_N']:>4} "
            f"{r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>5} {r['shared_bytes'] / 1024:>8.1f} "
            f"{r['spill_stores']:>8} {r['spill_loads']:>8} {r['stack_frame']:>6}"
        )
        if r["head_dim"] in args.no_spill_dims and (r["spill_stores"] or r["spill_loads"]):
            bad.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "dtype": args.dtype, "rows": rows}, f, indent=1)
    if bad:
        print(f"FAIL: {len(bad)} config(s) spill at D in {args.no_spill_dims}")
        return 1
    print(f"OK: no spills at D in {args.no_spill_dims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
