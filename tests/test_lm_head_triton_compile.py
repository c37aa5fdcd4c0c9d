"""The LM-head Triton kernels (``qstar_kernels/backends/lm_head/triton_kernels.py``) compiled for
real GPUs without one (sm_80 and sm_90, through PTX and the ptxas that ships with Triton). The
interpreter tests check what the kernels compute; this checks that the GPU compiler accepts them
(integer types of the Philox rounds, the 64-bit seeds, every dtype of the logit tiles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a subprocess: TRITON_INTERPRET must not be set when the kernels are defined.
PROGRAM = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from qstar_kernels.backends.lm_head import triton_kernels as K

def source(kernel, types, constexprs):
    fn = kernel if hasattr(kernel, "params") else kernel.fn  # a JITFunction (or an autotuner)
    names = [p.name for p in fn.params]
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)

jobs = []
for z in ("bf16", "fp32"):
    row = dict(Z="*" + z, stride_z="i32", n_rows="i32", n_cols="i32")
    jobs.append(("lse", z, K.lse_rows_kernel, dict(row, scale="fp32", LSE="*fp32"), {}))
    for greedy in (False, True):
        types = dict(row, inv_t="fp32", lp_scale="fp32", seed_lo="i64", seed_hi="i64", row0="i32",
                     v0="i32", TOK="*i64", KEY="*fp32", LSE="*fp32")
        jobs.append((f"sample greedy={greedy}", z, K.sample_rows_kernel, types, {"GREEDY": greedy}))
    types = dict(row, LSE="*fp32", IDX="*i64", COEF="*fp32", scale="fp32")
    jobs.append(("grad", z, K.grad_rows_kernel, types, {}))
types = dict(OUT="*fp32", n_rows="i32", n_cols="i32", seed_lo="i64", seed_hi="i64", row0="i32")
jobs.append(("noise", "fp32", K.gumbel_noise_kernel, types, {}))

rows = []
for cc in (80, 90):
    for name, z, kernel, types, consts in jobs:
        for block_r, block in ((2, 1024), (128, 16)):
            src = source(kernel, types, dict(consts, BLOCK_R=block_r, BLOCK=block))
            out = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 8})
            rows.append(dict(kernel=name, z=z, arch=cc, block=[block_r, block],
                             cubin_bytes=len(out.asm["cubin"]), shared=int(out.metadata.shared)))
json.dump(rows, sys.stdout)
"""


@pytest.mark.slow
def test_lm_head_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in rows} == {80, 90}
    names = {"lse", "sample greedy=False", "sample greedy=True", "grad", "noise"}
    assert {r["kernel"] for r in rows} == names
    assert len(rows) == 2 * 2 * 9  # 2 archs x 2 block shapes x 9 kernel variants
    for r in rows:
        assert r["cubin_bytes"] > 0, r
