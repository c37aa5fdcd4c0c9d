"""qstar.checkpoint: RNG state round trips (also through a state file), atomic writes, finding a
checkpoint, and a saved trainer state that loads back into a fresh optimizer and scheduler.
(Integrity, refusals and failures: test_checkpoint_safety.py.)"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from qstar.checkpoint import (  # noqa: E402
    load_state,
    load_trainer_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
    write_atomic,
    write_manifest,
)
from qstar.config import QuietStarConfig  # noqa: E402
from qstar.distributed import Dist  # noqa: E402
from qstar.loading import build_model  # noqa: E402


def draws(generator):
    return random.random(), torch.rand(3), torch.rand(2, generator=generator)


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(7)
    random.seed(1)
    torch.manual_seed(2)
    state = rng_state(g)
    first = draws(g)
    set_rng_state(state, g)
    again = draws(g)
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_state_file_round_trip_is_exact(tmp_path):
    """A state file (safetensors + JSON, no pickle) gives back tuples, None, floats and tensors exactly,
    and an RNG state restored from it draws the same numbers."""
    g = torch.Generator().manual_seed(7)
    random.seed(1)
    random.gauss(0, 1)  # a pending gauss_next float in Python's state
    state = {"rng": rng_state(g), "x": (0.1, None, [1, 2.5e-300, "s"]), "t": torch.tensor(3.0)}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["x"] == state["x"] and isinstance(back["x"], tuple) and torch.equal(back["t"], state["t"])
    assert back["rng"]["python"] == state["rng"]["python"]
    first = draws(g)
    set_rng_state(back["rng"], g)
    again = draws(g)
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    write_atomic(tmp_path / "latest", "checkpoint-1\n")
    write_atomic(tmp_path / "latest", "checkpoint-2\n")
    assert (tmp_path / "latest").read_text() == "checkpoint-2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_resolve_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.safetensors").write_bytes(b"x")
    write_manifest(ckpt, 4)
    (tmp_path / "latest").write_text("checkpoint-4\n")
    assert resolve_checkpoint("latest", str(tmp_path)) == ckpt
    assert resolve_checkpoint(str(tmp_path), "elsewhere") == ckpt
    assert resolve_checkpoint(str(ckpt), "elsewhere") == ckpt
    with pytest.raises(ValueError, match="--resume .*expected a checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "nowhere"), str(tmp_path))


def test_saved_state_loads_into_a_fresh_optimizer(tmp_path):
    dist = Dist("none", 0, 1, torch.device("cpu"))

    def fresh():
        model = build_model("tiny", QuietStarConfig(n_thought_tokens=2), seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
        return model, optimizer, scheduler

    model, optimizer, scheduler = fresh()
    model.base_model.lm_head.weight.sum().backward()  # one step of the LM head only
    optimizer.step()
    scheduler.step()
    g = torch.Generator().manual_seed(3)
    state = {"step": 1, "skipped_total": 0, "scheduler": scheduler.state_dict(), "rng": rng_state(g)}
    state.update(sampler={}, training={"seed": 0}, method={}, run={})
    final = save_checkpoint(tmp_path, 1, state, model, optimizer, dist, None)
    assert final == tmp_path / "checkpoint-1" and (tmp_path / "latest").read_text() == "checkpoint-1\n"
    assert {p.name for p in final.iterdir()} >= {
        "model",
        "trainer_state.safetensors",
        "rng_state_0.safetensors",
        "run_config.json",
        "manifest.json",
    }
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    after = torch.rand(2, generator=g)

    model2, optimizer2, scheduler2 = fresh()
    g2 = torch.Generator().manual_seed(99)
    loaded = load_trainer_state(final, model2, optimizer2, scheduler2, dist, g2)
    assert loaded["step"] == 1 and scheduler2.state_dict()["last_epoch"] == 1
    assert torch.equal(torch.rand(2, generator=g2), after)
    saved = optimizer.state[model.base_model.lm_head.weight]
    restored = optimizer2.state[model2.base_model.lm_head.weight]
    assert torch.equal(saved["exp_avg"], restored["exp_avg"])
    assert torch.equal(saved["exp_avg_sq"], restored["exp_avg_sq"])
    # a parameter without a gradient had no state, and has none after loading: its first update
    # then uses step 1's bias correction, as in the run that never stopped
    for p in model2.mixing_head.parameters():
        assert not optimizer2.state.get(p)
    with torch.no_grad():  # the weights come from the checkpoint's model/ in a real resume
        for a, b in zip(model.parameters(), model2.parameters(), strict=True):
            b.copy_(a)
    for m, opt in ((model, optimizer), (model2, optimizer2)):  # both runs: now the head learns too
        opt.zero_grad()
        (m.base_model.lm_head.weight.sum() + sum(p.sum() for p in m.mixing_head.parameters())).backward()
        opt.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
