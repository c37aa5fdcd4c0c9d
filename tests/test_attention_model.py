"""The analytic H100 model of benchmarks/attention_model.py: its counts against independent
formulas, and the claims section of the headline benchmark that prints it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention_model as am  # noqa: E402
import mask_attention as ma  # noqa: E402

CFG = dict(am.CLAIM_CFG)


def test_causal_text_flops_match_the_closed_form():
    """A causal tiled kernel computes L^2/2 + L*TILE/2 score entries per head (the diagonal tiles
    in full); forward = 2 matmuls, forward+backward = 7."""
    B, Hq, L, D, T = CFG["B"], CFG["Hq"], CFG["L"], CFG["D"], am.TILE
    entries = L * L / 2 + L * T / 2
    for mode, mults in (("fwd", 2), ("fb", 7)):
        got = am.model("flash_attn", CFG, mode)["tc_gflop"] * 1e9
        assert got == pytest.approx(mults * 2 * B * Hq * entries * D, rel=1e-12)


def test_ours_adds_only_the_diagonal_to_the_text_work():
    for depth in (0, 1, 14):
        cfg = dict(CFG, depth=depth)
        ours, flash = am.model("triton", cfg, "fwd"), am.model("flash_attn", cfg, "fwd")
        assert ours["tc_gflop"] == pytest.approx(flash["tc_gflop"])
        want_simt = 4 * cfg["B"] * cfg["Hq"] * depth * cfg["L"] * cfg["D"] / 1e9
        assert ours["simt_gflop"] == pytest.approx(want_simt)


def test_dense_and_block_sparse_work_grow_with_depth_as_expected():
    d1, d15 = dict(CFG, depth=1), dict(CFG, depth=15)
    # Dense: every score of the (a+1)L keys.
    assert am.model("original", d15, "fwd")["tc_gflop"] == pytest.approx(
        8 * am.model("original", d1, "fwd")["tc_gflop"]
    )
    # Flex: causal blocks + one 128x128 block per 128 rows per thought step.
    n = CFG["L"] // am.FLEX_BLOCK
    blocks = lambda a: n * (n + 1) / 2 + a * n  # noqa: E731
    ratio = am.model("flex", d15, "fwd")["tc_gflop"] / am.model("flex", d1, "fwd")["tc_gflop"]
    assert ratio == pytest.approx(blocks(15) / blocks(1))


def test_times_are_the_roofline_of_the_counts():
    for p in am.PROVIDERS:
        r = am.model(p, CFG, "fb")
        compute = r["tc_gflop"] * 1e9 / am.TC_FLOPS + r["simt_gflop"] * 1e9 / am.SIMT_FLOPS
        memory = r["hbm_mb"] * 2**20 / am.HBM_BYTES
        assert r["model_us"] == pytest.approx(max(compute, memory) * 1e6)
        assert r["bound"] == ("compute" if compute >= memory else "memory")
        assert r["model_launch_us"] == pytest.approx(r["model_us"] + r["launches"] * am.LAUNCH_US)


def test_ordering_at_the_claim_config():
    t = {p: am.model(p, CFG, "fb")["model_us"] for p in am.PROVIDERS}
    assert t["flash_attn"] < t["triton"] < t["original"] < t["eager"]


def test_gpu_claims_are_not_applicable_without_a_gpu_and_quote_the_model():
    claims = ma.gpu_claims([])
    assert len(claims) == 2
    for c in claims:
        assert c["result"] == "N/A" and c["gpu"]
        assert "modelled on an H100" in c["detail"]


def test_gpu_claims_are_checked_from_measured_rows():
    rows = [
        {"provider": p, "device_kind": "cuda", **CFG, "fb_median_ms": t}
        for p, t in (("flex", 3.0), ("triton", 0.9), ("flash_attn", 0.8))
    ]
    flex, flash = ma.gpu_claims(rows)
    assert flex["result"] == "PASS" and flex["value"] == pytest.approx(3.0 / 0.9)
    assert flash["result"] == "PASS" and flash["value"] == pytest.approx(0.9 / 0.8)
    rows[1]["fb_median_ms"] = 2.0
    flex, flash = ma.gpu_claims(rows)
    assert flex["result"] == "FAIL" and flash["result"] == "FAIL"
