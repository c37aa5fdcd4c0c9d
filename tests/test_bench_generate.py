"""Smoke test of ``benchmarks/generate.py``: it runs end to end on tiny sizes and writes its files.

No timing is asserted (the claims are N/A at these sizes); what is checked is that every provider
ran, produced the requested tokens without a meta token, and that the providers agree on the first
token's distribution.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load():
    # The script imports its shared modules (_common, _report, _models) by plain name, as it does
    # when run from the command line.
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(BENCHMARKS, "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_benchmark_runs_and_writes_its_files(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the test extra has it)")
    bench = _load()
    argv = ["--quick", "--sizes", "2", "3", "--vocab", "300", "--prompt", "6", "--thought", "3"]
    argv += ["--repeats", "1", "--out-dir", str(tmp_path), "--tag", "smoke"]
    assert bench.main(argv) == 0
    stem = tmp_path / "generate_smoke"
    assert stem.with_suffix(".csv").exists()
    assert stem.with_suffix(".png").exists()
    data = json.loads(stem.with_suffix(".json").read_text())
    got = {(r["provider"], r["new_tokens"]) for r in data["rows"]}
    assert got == {(p, n) for p in bench.PROVIDERS for n in (2, 3)}
    for r in data["rows"]:
        assert r["emitted"] == r["new_tokens"] and r["meta_emitted"] == 0, r
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["n"] == 1  # --repeats 1; the recompute providers run once anyway
        if r["provider"] in bench.THINKING:
            assert r["vs_ideal6_base_qstar"] > 0 and r["vs_ideal4_base_hf"] > 0  # 3 + 3 and 1 + 3 steps
    assert data["benchmark"] == "generate" and data["question"].startswith("How fast")
    assert data["machine"]["loadavg_after"] is not None or not hasattr(os, "getloadavg")
    assert data["config"]["ideal_steps"] == {"claim": 6, "strict": 4}
    assert data["config"]["args"]["sizes"] == [2, 3]
    agree = data["checks"]["agreement"]
    assert agree["qstar_same_thought_as_fused"]
    for key in ("authors_vs_fused_logits_rel", "qstar_vs_fused_logits_rel", "base_qstar_vs_hf_logits_rel"):
        assert agree[key] < 1e-4, (key, agree[key])
    assert [c["result"] for c in data["claims"]] == ["PASS", "N/A", "N/A", "N/A"]
    stem.with_suffix(".png").unlink()  # --plot-only redraws it from the JSON, without running anything
    assert bench.main(argv + ["--plot-only"]) == 0
    assert stem.with_suffix(".png").stat().st_size > 1000
