"""The trainer under torchrun with 2 processes on the CPU (gloo): DDP and FSDP2 (``fully_shard``),
on the whole model as one unit (the default) and per decoder layer (``fsdp2:layer``).

Each mode is one ``torchrun --nproc-per-node 2`` launch of ``tests/distributed_worker.py``:

* the gradients after one backward on a global batch of 4 sequences (2 per rank, no padding, so
  both ranks hold the same number of tokens and the average of the ranks' means is the global mean)
  with injected thoughts equal those of one process on the whole batch, with and without gradient
  checkpointing across the rollout;
* ``qstar.train.main`` runs 2 optimizer steps (1 sequence per rank and micro-batch, 2 accumulation
  steps), saves checkpoints, and resumes from ``latest`` for a 3rd step; the losses are finite and
  the checkpoint loads as a ``QuietStarForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from qstar.checkpoint import read_trainer_state, verify_checkpoint  # noqa: E402
from qstar.loading import build_model  # noqa: E402
from qstar.metrics import read_metrics  # noqa: E402
from qstar.model import QuietStarForCausalLM  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def reference_gradients(ckpt: bool) -> dict:
    method = dataclasses.replace(W.test_method(), gradient_checkpointing=ckpt)
    model = build_model("tiny", method, seed=0)
    model.train()
    ids, thoughts = W.global_batch(method)
    model(ids, thought_tokens=thoughts).loss.backward()
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    return {ckpt: reference_gradients(ckpt) for ckpt in (False, True)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2:layer"])
def test_two_processes_match_one_and_train(mode, tmp_path, reference):
    W.torchrun(HERE / "distributed_worker.py", mode, tmp_path)

    got = torch.load(tmp_path / "grads.pt", weights_only=False)
    for ckpt in (False, True):
        ref = reference[ckpt]
        assert got[ckpt].keys() == ref.keys()
        for name, g in ref.items():
            assert (g is None) == (got[ckpt][name] is None), name
            if g is not None:
                torch.testing.assert_close(got[ckpt][name], g, rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")

    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert (run / "latest").read_text().strip() == "checkpoint-3"
    assert sorted(p.name for p in (run / "checkpoint-3").glob("rng_state_*")) == [
        "rng_state_0.safetensors",
        "rng_state_1.safetensors",
    ]
    verify_checkpoint(run / "checkpoint-3")
    state = read_trainer_state(run / "checkpoint-3")
    assert state["step"] == 3 and state["world_size"] == 2 and state["sampler"]["position"] == 12
    model = QuietStarForCausalLM.from_pretrained(run / "checkpoint-3" / "model")
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(state["optimizer"]["state"]) == n_params
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = read_metrics(tmp_path / "next-token" / "metrics.csv")  # 2 steps without thoughts
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
