"""Run by tests/test_train_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py MODE OUT

MODE is ddp, fsdp2 (the whole model as one FSDP2 unit, the default) or fsdp2:layer (one unit per
decoder layer, and the root).

1. Gradients: the tiny model, wrapped as the trainer wraps it, does one forward
   and backward on this rank's half of a fixed global batch with injected thoughts, with and without
   gradient checkpointing; rank 0 writes the full gradients (FSDP2: ``full_tensor()``) to OUT/grads.pt.
2. The trainer: ``qstar.train.main`` for 2 optimizer steps, then again with ``--resume latest`` to 3.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import qstar.train as T
from qstar.distributed import setup_distributed, wrap_model
from qstar.loading import build_model
from qstar.tiny import tiny_tokenizer

torch.set_num_threads(1)


def global_batch(method, B=4, L=16, seed=0):
    """The same ids and thoughts as the single-process reference: no padding, equal tokens per rank."""
    g = torch.Generator().manual_seed(seed)
    n_chars = len(tiny_tokenizer())
    ids = torch.randint(4, n_chars, (B, L), generator=g)
    thoughts = torch.randint(4, n_chars, (method.n_thought_tokens, B * method.n_rationales, L), generator=g)
    return ids, thoughts


def test_method():
    from qstar.config import get_preset

    p = get_preset("tiny-demo")
    import dataclasses

    return dataclasses.replace(p.method, n_thought_tokens=2, n_talk_tokens=2, n_rationales=2)


def gradients(model) -> dict:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()  # collective: every rank calls it, in the same order
        grads[name.removeprefix("module.")] = None if g is None else g.detach().clone()
    return grads


def main(mode: str, out: Path) -> None:
    import dataclasses

    mode, _, unit = mode.partition(":")
    unit = unit or "model"
    dist = setup_distributed(mode, "cpu")
    rank, world = dist.rank, dist.world_size
    results = {}
    for ckpt in (False, True):
        method = dataclasses.replace(test_method(), gradient_checkpointing=ckpt)
        model = build_model("tiny", method, seed=0)
        ids, thoughts = global_batch(method)
        per = ids.shape[0] // world
        rows = per * method.n_rationales
        model = wrap_model(model, dist, fsdp_unit=unit)
        if mode == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            layers = model.decoder.layers
            assert all(isinstance(layer, FSDPModule) == (unit == "layer") for layer in layers), unit
        model.train()
        o = model(
            ids[rank * per : (rank + 1) * per], thought_tokens=thoughts[:, rank * rows : (rank + 1) * rows]
        )
        o.loss.backward()
        results[ckpt] = gradients(model)
    if rank == 0:
        torch.save(results, out / "grads.pt")

    common = ["--preset", "tiny-demo", "--distributed", mode, "--batch-size", "4", "--micro-batch-size", "1",
              "--seq-len", "24", "--n-thought-tokens", "2", "--save-every", "1", "--log-every", "1",
              "--fsdp-unit", unit, "--output-dir", str(out / "run"),
              "--no-progress", "--no-plot"]  # fmt: skip
    T.main(common + ["--max-steps", "2"])  # the process group stays this worker's
    T.main(common + ["--max-steps", "3", "--resume", "latest"])
    # the fine-tune without thoughts leaves the mixing head and meta embeddings without gradients
    nt = [a if a != str(out / "run") else str(out / "next-token") for a in common]
    T.main(nt + ["--max-steps", "2", "--objective", "next-token"])
    torch.distributed.destroy_process_group()


def torchrun(script: Path, mode: str, out: Path, timeout: float = 300) -> None:
    """Run ``script MODE OUT`` under ``torchrun --nproc-per-node 2`` (gloo, 1 thread per process) in
    its own process group, so that a hang (a collective that never completes) is killed whole; fail
    the calling test with the output's tail on a timeout or a non-zero exit."""
    import signal
    import subprocess

    import pytest

    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), mode, str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {mode} timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], Path(sys.argv[2]))
