"""qstar.loading: every way to get a model (tiny, save_pretrained, a trainer checkpoint or output
directory, the authors' layout) gives the same model back."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from qstar import QuietStarConfig  # noqa: E402
from qstar.eval import evaluate_direct, gsm8k_direct_prompt  # noqa: E402
from qstar.loading import build_model, load_model, resolve_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_looking_model():
    """The tiny model with greedy eval thoughts and a non-zero mixing head (with != without)."""
    config = QuietStarConfig(n_thought_tokens=2, eval_thought_temperature=0.0)
    model = build_model("tiny", config, seed=0)
    with torch.no_grad():
        last = model.mixing_head[-1].weight
        last.copy_(torch.randn(last.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    return model.eval()


def test_load_model_from_each_layout(tmp_path):
    from safetensors.torch import save_file

    model = trained_looking_model()
    prompts = [gsm8k_direct_prompt("2+2?", "#### 4"), gsm8k_direct_prompt("9+9?", "#### 18")]
    want = evaluate_direct(model, prompts)
    assert want.with_thoughts != want.without_thoughts
    # save_pretrained, found directly, as a trainer checkpoint's model/ and through an output dir's latest
    model.save_pretrained(tmp_path / "run" / "checkpoint-3" / "model")
    (tmp_path / "run" / "latest").write_text("checkpoint-3\n")
    for spec in ("run/checkpoint-3/model", "run/checkpoint-3", "run"):
        assert resolve_model_dir(tmp_path / spec) == tmp_path / "run" / "checkpoint-3" / "model", spec
        loaded = load_model(str(tmp_path / spec))
        assert not loaded.training
        got = evaluate_direct(loaded, prompts)
        assert (got.with_thoughts, got.without_thoughts) == (want.with_thoughts, want.without_thoughts), spec
    # the authors' layout: Mistral weights + start/end_embedding + talk_head.0.* in one state dict
    authors = tmp_path / "authors"
    authors.mkdir()
    model.base_model.config.save_pretrained(authors)
    model.tokenizer.save_pretrained(authors)
    cfg = json.loads((authors / "config.json").read_text())
    cfg.update({"n_ahead": 5})  # 2 thought tokens, as the model's config
    (authors / "config.json").write_text(json.dumps(cfg))
    state = {k: v.detach().clone().contiguous() for k, v in model.base_model.state_dict().items()}
    state["start_embedding"] = model.start_embedding.detach().clone()
    state["end_embedding"] = model.end_embedding.detach().clone()
    state.update({f"talk_head.0.{k}": v.clone() for k, v in model.mixing_head.state_dict().items()})
    save_file(state, str(authors / "model.safetensors"))
    loaded = load_model(str(authors))
    assert loaded.config.n_thought_tokens == 2
    got = evaluate_direct(loaded, prompts)
    assert got.with_thoughts == pytest.approx(want.with_thoughts, rel=1e-6)
    assert got.without_thoughts == pytest.approx(want.without_thoughts, rel=1e-6)
    with pytest.raises(ValueError, match="--model '.*nowhere': not 'tiny'"):
        load_model(str(tmp_path / "nowhere"))


def test_build_model_depends_on_its_seed_only():
    """The base and the new heads are drawn from ``seed``: the caller's RNG state does not change
    them; another seed gives another model."""
    method = QuietStarConfig(n_thought_tokens=2, mixing_head_zero_init=False)
    torch.manual_seed(123)
    a = build_model("tiny", method, seed=0).state_dict()
    torch.manual_seed(456)
    b = build_model("tiny", method, seed=0).state_dict()
    c = build_model("tiny", method, seed=1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_load_model_tiny_in_eval_mode_and_dtype():
    model = load_model("tiny", dtype=torch.bfloat16)
    assert not model.training and model.tokenizer is not None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.n_thought_tokens == 4  # the tiny-demo method


def test_a_damaged_trainer_checkpoint_is_refused_by_name(tmp_path):
    from qstar.checkpoint import CheckpointError, write_manifest

    ckpt = tmp_path / "run" / "checkpoint-2"
    trained_looking_model().save_pretrained(ckpt / "model")
    write_manifest(ckpt, 2)
    (tmp_path / "run" / "latest").write_text("checkpoint-2\n")
    assert resolve_model_dir(tmp_path / "run") == ckpt / "model"  # intact: verified, then its model/
    weights = ckpt / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    for spec in ("run", "run/checkpoint-2"):
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_model(str(tmp_path / spec))
