"""LoRA under torchrun with 2 processes on the CPU (gloo): DDP and FSDP2 (``fully_shard`` on the whole
model, and per decoder layer). This file is also the worker (``python -m torch.distributed.run ...
tests/test_lora_distributed.py MODE OUT``):

1. the tiny model with rank-4 adapters (non-zero, so every adapter gets a gradient), wrapped as the
   trainer wraps it, does one forward and backward on this rank's half of a fixed global batch with
   injected thoughts; rank 0 writes the full gradients, which must equal one process's on the whole
   batch: adapters and heads only, the frozen base none;
2. ``qstar.train.main --lora-r 4`` runs 2 steps, then resumes from ``latest`` for a 3rd; the
   checkpoint holds adapters (no base weights) and loads with ``load_model``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as W  # noqa: E402

from qstar.loading import build_model  # noqa: E402
from qstar.lora import LORA_WEIGHTS, add_lora  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def lora_model():
    model = build_model("tiny", W.test_method(), seed=0)
    add_lora(model, r=4, alpha=8.0, base="tiny", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def worker(mode: str, out: Path) -> None:
    import qstar.train as T
    from qstar.distributed import setup_distributed, wrap_model

    torch.set_num_threads(1)
    mode, _, unit = mode.partition(":")
    dist = setup_distributed(mode, "cpu")
    model = wrap_model(lora_model(), dist, fsdp_unit=unit or "model")
    ids, thoughts = W.global_batch(W.test_method())
    per = ids.shape[0] // dist.world_size
    rows = per * W.test_method().n_rationales
    r = dist.rank
    model.train()
    model(ids[r * per : (r + 1) * per], thought_tokens=thoughts[:, r * rows : (r + 1) * rows]).loss.backward()
    grads = W.gradients(model)
    if r == 0:
        torch.save(grads, out / "grads.pt")
    common = ["--preset", "tiny-demo", "--distributed", mode, "--batch-size", "4", "--micro-batch-size", "1",
              "--seq-len", "24", "--n-thought-tokens", "2", "--save-every", "1", "--log-every", "1",
              "--fsdp-unit", unit or "model", "--output-dir", str(out / "run"), "--no-progress", "--no-plot",
              "--lora-r", "4", "--lora-alpha", "8"]  # fmt: skip
    T.main(common + ["--max-steps", "2"])
    T.main(common + ["--max-steps", "3", "--resume", "latest"])
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2:layer"])
def test_lora_two_processes_match_one_and_train(mode, tmp_path):
    from qstar.loading import load_model
    from qstar.metrics import read_metrics

    W.torchrun(Path(__file__), mode, tmp_path)

    ref = lora_model().train()
    ids, thoughts = W.global_batch(W.test_method())
    ref(ids, thought_tokens=thoughts).loss.backward()
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    for name, p in ref.named_parameters():
        assert (p.grad is None) == (got[name] is None), name
        assert (p.grad is not None) == ("lora_" in name or not name.startswith("base_model.")), name
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")

    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    model_dir = run / "checkpoint-3" / "model"
    assert (model_dir / LORA_WEIGHTS).is_file() and not (model_dir / "model.safetensors").exists()
    model = load_model(str(run))
    assert any("lora_" in n for n, _ in model.named_parameters())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    worker(sys.argv[1], Path(sys.argv[2]))
