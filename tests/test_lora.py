"""LoRA (:mod:`qstar.lora`): what trains, that zero adapters change nothing, the save/load/merge round
trip, the trainer with ``--lora-r`` (checkpoints hold adapters and heads, resume is exact) and the
errors. The 2-process DDP/FSDP2 runs are in ``tests/test_lora_distributed.py``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import qstar.train as T  # noqa: E402
from qstar.config import get_preset  # noqa: E402
from qstar.loading import build_model, load_model  # noqa: E402
from qstar.lora import LORA_META, LORA_WEIGHTS, add_lora, has_lora, merge_lora  # noqa: E402
from qstar.model import QuietStarForCausalLM  # noqa: E402
from qstar_kernels.hf.patch import is_patched  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as W  # noqa: E402

HEADS = ("start_embedding", "end_embedding", "mixing_head.")


def _method():
    return W.test_method()


def _lora_model(r=4, targets="all-linear", dropout=0.0):
    model = build_model("tiny", _method(), seed=0)
    return add_lora(model, r=r, alpha=8.0, dropout=dropout, target_modules=targets, base="tiny", seed=0)


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _loss(model):
    ids, thoughts = W.global_batch(_method())
    with torch.no_grad():
        return model.train()(ids, thought_tokens=thoughts).loss


def test_only_adapters_and_heads_train():
    model = _lora_model()
    _randomise_adapters(model)
    model.train()
    ids, thoughts = W.global_batch(_method())
    model(ids, thought_tokens=thoughts).loss.backward()
    for name, p in model.named_parameters():
        trains = "lora_" in name or name.startswith(HEADS)
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_zero_adapters_equal_the_full_model():
    full = build_model("tiny", _method(), seed=0).train()
    lora = _lora_model().train()
    assert is_patched(lora.base_model)  # the attention patch survives the injection
    ids, thoughts = W.global_batch(_method())
    a = full(ids, thought_tokens=thoughts)
    b = lora(ids, thought_tokens=thoughts)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    a.loss.backward()
    b.loss.backward()
    full_grads = dict(full.named_parameters())
    for name, p in lora.named_parameters():
        if name.startswith(HEADS):
            torch.testing.assert_close(p.grad, full_grads[name].grad, rtol=1e-6, atol=1e-8, msg=name)


def test_patch_through_a_peft_model_wrapper():
    """peft's own wrapper (``get_peft_model``) around a patched base keeps the patch, and its base
    model (the HF model with the adapters inside) runs the Quiet-STaR forward."""
    model = build_model("tiny", _method(), seed=0)
    wrapped = peft.get_peft_model(model.base_model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert is_patched(wrapped.get_base_model())
    assert model.base_model is wrapped.get_base_model()  # injected in place
    loss = _loss(model)
    assert torch.isfinite(loss)


def test_save_load_merge_round_trip(tmp_path):
    model = _lora_model()
    _randomise_adapters(model)
    with torch.no_grad():
        model.mixing_head[-1].weight.normal_(0, 0.05)
    want = _loss(model)
    model.save_pretrained(tmp_path / "lora")
    names = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {LORA_WEIGHTS, LORA_META, "quietstar_heads.safetensors", "quietstar_config.json"} <= names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)  # no base weights

    loaded = load_model(str(tmp_path / "lora"))
    assert has_lora(loaded)
    torch.testing.assert_close(_loss(loaded), want, rtol=0, atol=0)

    merge_lora(loaded)
    assert not has_lora(loaded) and not any("lora_" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(_loss(loaded), want, rtol=1e-5, atol=1e-6)
    loaded.save_pretrained(tmp_path / "merged")
    again = QuietStarForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_loss(again), want, rtol=1e-5, atol=1e-6)


def test_merge_cli(tmp_path):
    from qstar.lora_merge import cli

    model = _lora_model()
    _randomise_adapters(model)
    model.save_pretrained(tmp_path / "lora")
    assert cli([str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(
        _loss(QuietStarForCausalLM.from_pretrained(tmp_path / "merged")), _loss(model), rtol=1e-5, atol=1e-6
    )


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="--lora-target-modules: 'lm_head' is the LM head"):
        _lora_model(targets="lm_head")
    with pytest.raises(ValueError, match="--lora-target-modules: 'nope' names no linear layer"):
        _lora_model(targets="q_proj,nope")
    model = _lora_model(targets="q_proj,v_proj")
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        QuietStarForCausalLM.from_pretrained(tmp_path / "lora")
    meta = json.loads((tmp_path / "lora" / LORA_META).read_text())
    (tmp_path / "lora" / LORA_META).write_text(json.dumps({**meta, "seed": 1}))  # another tiny base
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_model(str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="lora_dropout must be"):
        dataclasses.replace(get_preset("tiny-demo").training, lora_dropout=1.5)


def _args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["--preset", "tiny-demo", "--batch-size", "2", "--micro-batch-size", "1", "--seq-len", "24",
            "--n-thought-tokens", "2", "--save-every", "1", "--log-every", "1", "--output-dir", str(out),
            "--no-progress", "--no-plot", "--max-steps", str(steps), "--lora-r", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.1", "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj",
            *extra]  # fmt: skip


def test_trainer_lora_checkpoints_and_exact_resume(tmp_path):
    straight = T.main(_args(tmp_path / "a", 3))
    T.main(_args(tmp_path / "b", 2))
    resumed = T.main(_args(tmp_path / "b", 3, "--resume", "latest"))
    assert [r["loss"] for r in resumed.history] == [straight.history[-1]["loss"]]

    ckpt = tmp_path / "b" / "checkpoint-3"
    files = {p.name for p in (ckpt / "model").iterdir()}
    assert LORA_WEIGHTS in files and "model.safetensors" not in files
    a, b = load_model(str(tmp_path / "a")), load_model(str(ckpt))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    trained = {n for n, p in b.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in b.named_parameters() if "lora_" in n or n.startswith(HEADS)}
    from qstar.checkpoint import read_trainer_state

    assert len(read_trainer_state(ckpt)["optimizer"]["state"]) == len(trained)
    assert json.loads((ckpt / "training_config.json").read_text())["lora_r"] == 4
