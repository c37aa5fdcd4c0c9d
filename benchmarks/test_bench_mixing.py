"""pytest-benchmark cases for the fused LM-head ops (small shapes, one case per provider), and a smoke
test of ``mixing_ce.py`` end to end (tiny grid, output files, claims section).

    pytest benchmarks/test_bench_mixing.py --benchmark-only      # the timing cases
    pytest benchmarks/test_bench_mixing.py -k smoke              # the script smoke test
"""

from __future__ import annotations

import json
import os

import mixing_ce as mc
import pytest
import torch
from _common import synchronize

DEVICE = torch.device(os.environ.get("QSTAR_BENCH_DEVICE", "cpu"))
CFG = {"N": 256, "H": 64, "V": 8000}
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("QSTAR_BENCH_DEVICE=cuda but no GPU is available", allow_module_level=True)


@pytest.mark.parametrize("op", ["mixing", "sampling"])
@pytest.mark.parametrize("provider", ["unfused", "unfused_gumbel", "cpu", "torch", "triton"])
def test_fwd_bwd(benchmark, op, provider):
    provs = mc.providers(op, DEVICE, requested=[provider])
    if provider not in provs:
        pytest.skip(f"{provider} is not a provider of {op} on {DEVICE.type} here")
    x = mc.make_inputs(CFG["N"], CFG["H"], CFG["V"], torch.float32, DEVICE, seed=0)
    x["gen"] = torch.Generator(device=DEVICE).manual_seed(0)
    for k in mc.LEAVES[op]:
        x[k] = x[k].clone().requires_grad_()
    fn = provs[provider]

    def run():
        (fn(x) * x["grad"]).sum().backward()
        for k in mc.LEAVES[op]:
            x[k].grad = None
        synchronize(DEVICE)

    benchmark.group = f"{op} fwd+bwd N={CFG['N']} H={CFG['H']} V={CFG['V']}"
    benchmark.extra_info.update(CFG, provider=provider, device=str(DEVICE))
    benchmark(run)


def test_smoke_script_end_to_end(tmp_path):
    """The script runs, writes its CSV/JSON/text report, measures every provider, and reports the
    claims (N/A here: the claim point is not in this tiny grid)."""
    rc = mc.main(
        ["--N", "64", "--V", "1000", "--H", "32", "--repeats", "1", "--max-seconds", "1", "--no-plot"]
        + ["--providers", "unfused", "unfused_gumbel", "unfused_multinomial", "authors", "cpu", "torch"]
        + ["--out-dir", str(tmp_path), "--tag", "smoke"]
    )
    assert rc == 0
    stem = tmp_path / "mixing_ce_smoke"
    data = json.loads((stem.with_suffix(".json")).read_text())
    assert stem.with_suffix(".csv").exists() and "Claims:" in stem.with_suffix(".txt").read_text()
    by_op = {}
    for r in data["rows"]:
        assert not r.get("status"), r
        assert r["fb_median_ms"] > 0 and r["fb_peak_bytes"] > 0
        by_op.setdefault(r["op"], set()).add(r["provider"])
    assert {"unfused", "cpu", "torch"} <= by_op["mixing"]
    assert {"unfused_gumbel", "unfused_multinomial", "authors", "cpu", "torch"} <= by_op["sampling"]
    assert [c["result"] for c in data["claims"]] == ["N/A"] * 4
