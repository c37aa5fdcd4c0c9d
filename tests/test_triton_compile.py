"""The Triton attention kernels compiled for real GPUs without one (sm_80 and sm_90). This runs on
any machine, with or without a GPU. (The fake implementations torch.compile uses are tested in
tests/test_custom_ops.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Compiled for real GPUs without one: sm_80 and sm_90, every config the autotuner may pick at
# D=128, with the resource report of ptxas. No config may spill.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "resources.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "triton_resources.py"), "--head-dims", "128"]
        + ["--archs", "80", "90", "--json", str(report), "--jobs", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    kinds = {r["kernel"] for r in rows}
    assert kinds == {"fwd", "bwd_rows", "bwd_dkdv", "bwd_dq"}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["registers"] > 0 and r["cubin_bytes"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        # A100 allows 163 KB of shared memory per block, H100 227 KB.
        assert r["shared_bytes"] <= (163 if r["arch"] == "sm_80" else 227) * 1024, r
