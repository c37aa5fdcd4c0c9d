"""Processes and devices for the trainer: the process group, DDP and FSDP2 wrapping.

    dist = setup_distributed("auto", None)      # under torchrun: ddp; alone: none
    model = wrap_model(model.to(dist.device), dist, fsdp_unit="model")
    with gradient_sync(model, dist, sync=is_last_micro_batch): loss.backward()

``torchrun --nproc-per-node N -m qstar.train --distributed ddp`` (or ``fsdp2``) starts one process
per device; nccl on CUDA, gloo on the CPU (the tests run both wrappings on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch

from .config import FSDP_UNITS

__all__ = ["Dist", "gradient_sync", "meta_copy", "setup_distributed", "unwrap", "wrap_model"]


@dataclass
class Dist:
    """This process's place in the run."""

    mode: str  # "none" | "ddp" | "fsdp2"
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.mode != "none":
            torch.distributed.barrier()


def setup_distributed(mode: str, device: str | None) -> Dist:
    """Initialise the process group under torchrun (nccl on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ValueError(f"--distributed none, but WORLD_SIZE={world}: use ddp or fsdp2 under torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if mode == "none":
        return Dist("none", 0, 1, dev)
    if not torch.distributed.is_initialized():
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(mode, torch.distributed.get_rank(), torch.distributed.get_world_size(), dev)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrap_model(model, dist: Dist, *, find_unused_parameters: bool = False, fsdp_unit: str = "model"):
    """DDP, or FSDP2 (``fully_shard`` on the whole model as one unit, or per decoder layer and on
    the root with ``fsdp_unit="layer"``; see below)."""
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if dist.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # "layer": each decoder layer is a unit (its parameters are gathered for its call and freed
        # after it, in the forward and again in the backward), and the root holds the rest
        # (embeddings, heads, final norm). Each layer runs once per rollout step, so a micro-batch
        # all-gathers each layer once per step in the forward and once per step in the backward.
        # Its gradient is reduce-scattered once: autograd sums a parameter's uses and accumulates
        # it once, and on the engine's ready queue (later-created nodes first) that happens before
        # the layer's last post-backward, step 0's. FSDP2 unshards a layer in the backward from
        # hooks on its outputs, but the KV cache carries gradient into the key/value projections
        # outside them (later steps read step a's keys; the last layer's output at the step after
        # the last thought token gets no gradient at all), so on its own the k/v backward meets
        # freed parameter storage; _unshard_before_kv_backward gathers the layer's parameters in
        # the backward of its key/value projections' outputs.
        # "model": the whole model is one unit, gathered once per micro-batch and held through its
        # backward, one reduce-scatter: more memory, far less communication.
        # tests/test_train_distributed.py checks both against one process's gradients, with and
        # without gradient checkpointing. "model" is the default: "layer"'s single reduce-scatter
        # rests on the autograd engine's node order, which no API promises; a change there would
        # drop gradient contributions silently.
        if fsdp_unit not in FSDP_UNITS:
            raise ValueError(f"fsdp_unit must be one of {FSDP_UNITS}, got {fsdp_unit!r}")
        if fsdp_unit == "layer":
            for layer in model.decoder.layers:
                fully_shard(layer)
                _unshard_before_kv_backward(layer)
        fully_shard(model)
    return model


class _UnshardInBackward(torch.autograd.Function):
    """Identity; its backward all-gathers ``module``'s parameters (FSDP2 ``unshard``, a no-op when
    they are gathered). On a projection's output it runs just before the projection's backward:
    no node created between the two (no other call's post-backward reshard) can run in between."""

    @staticmethod
    def forward(ctx, module, x):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.module.unshard()
        return None, grad


_KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj")


def _unshard_before_kv_backward(layer) -> None:
    """Gather ``layer``'s parameters before the backward of its key/value projections."""
    names = [n for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in _KV_PROJECTIONS]
    if not names:
        raise ValueError(
            f"no key/value projection ({', '.join(_KV_PROJECTIONS)}) in {type(layer).__name__}; "
            "use --fsdp-unit model"
        )

    def hook(module, args, output):
        if torch.is_grad_enabled() and output.requires_grad:
            return _UnshardInBackward.apply(layer, output)
        return output

    for n in names:
        layer.get_submodule(n).register_forward_hook(hook)


def gradient_sync(model, dist: Dist, sync: bool):
    """No gradient all-reduce on the accumulation micro-batches before the last (``sync=False``)."""
    if dist.mode == "ddp" and not sync:
        return model.no_sync()
    if dist.mode == "fsdp2":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def meta_copy(model):
    """A copy of ``model`` with every parameter and buffer on the meta device, made without copying
    any data (for exporting an FSDP2-sharded model with ``save_pretrained``)."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def unwrap(model):
    """The model inside a DDP wrapper (an FSDP2 model is its own module)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "base_model") else model
