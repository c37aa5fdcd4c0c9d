"""``benchmarks/memory_model.py``: the parameter counts equal real models', the predictions behave,
and one small measured point agrees (the whole table is ``benchmarks/validate_memory_model.py``)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from memory_model import MISTRAL_7B, Arch, Step, largest, main, predict  # noqa: E402

SMALL = Arch(layers=2, hidden=128, intermediate=384, heads=4, kv_heads=2, vocab=8002)


def test_parameter_counts_match_the_built_model():
    from validate_memory_model import build

    step = Step(batch=1, seq_len=16, n_thought=2, n_talk=1, precision="fp32", device="cpu")
    model = build(SMALL, step)
    assert sum(p.numel() for p in model.parameters()) == SMALL.n_params() == predict(SMALL, step)["params"]
    lora = build(SMALL, replace(step, lora_r=4))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == predict(SMALL, replace(step, lora_r=4))["trainable_params"]


def test_from_hf_config():
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)  # fmt: skip
    for arch in (Arch.from_hf_config(cfg), Arch.from_hf_config(cfg.to_dict())):
        assert replace(arch, head_dim=None) == MISTRAL_7B and arch.hd == 128
        assert arch.n_params() == MISTRAL_7B.n_params()
    assert 7.2e9 < MISTRAL_7B.n_params() < 7.3e9


def test_predictions_behave():
    paper = Step()
    ours, authors = predict(MISTRAL_7B, paper), predict(MISTRAL_7B, replace(paper, way="authors"))
    lora = predict(MISTRAL_7B, replace(paper, lora_r=16))
    assert authors["peak"] > ours["peak"] > lora["peak"]
    assert authors["masks"] > 0 and authors["vocab_tensors"] > 0 and ours["vocab_tensors"] == 0
    assert predict(MISTRAL_7B, replace(paper, batch=16))["peak"] > ours["peak"]
    b = largest(MISTRAL_7B, replace(paper, lora_r=16), 141, "batch")
    assert b >= 1
    assert predict(MISTRAL_7B, replace(paper, lora_r=16, batch=b))["peak"] <= 141e9
    assert predict(MISTRAL_7B, replace(paper, lora_r=16, batch=b + 1))["peak"] > 141e9
    with pytest.raises(ValueError, match="precision must be"):
        predict(MISTRAL_7B, replace(paper, precision="fp16"))


def test_one_measured_point_within_15_percent():
    from validate_memory_model import measure

    step = Step(batch=1, seq_len=32, n_thought=2, n_talk=2, precision="fp32", device="cpu")
    got = measure(SMALL, step)["peak"]
    assert abs(predict(SMALL, step)["peak"] / got - 1) <= 0.15


def test_cli_table(capsys):
    assert main(["--table", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=16" in out and "authors" in out
