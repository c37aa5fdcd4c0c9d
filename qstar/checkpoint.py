"""Trainer checkpoints: written atomically, read back for an exact resume.

``<output_dir>/checkpoint-<step>/`` holds

* ``model/``: ``save_pretrained`` (loads with ``QuietStarForCausalLM.from_pretrained``);
* ``trainer_state.pt``: the optimizer (full state dict keyed by parameter name, so it loads under
  any wrapping), the scheduler, the step and skip counters, the sampler's position, the world
  size and the configs; ``{training,method,run}_config.json`` for people;
* ``rng_state_<rank>.pt``: Python's, torch's (CPU and CUDA) and the thought-sampling generator's
  state of each rank.

A checkpoint is written into ``.tmp-checkpoint-<step>`` and renamed into place, then
``<output_dir>/latest`` names it (also replaced atomically): a crash leaves the last complete one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from .distributed import Dist, unwrap
from .faults import fault_point

log = logging.getLogger("qstar.train")

__all__ = [
    "load_trainer_state",
    "read_trainer_state",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_atomic",
]


def rng_state(generator: torch.Generator) -> dict:
    """Python's, torch's (CPU and CUDA) and the thought-sampling generator's; numpy is not used."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "sampling": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampling"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _full_state_dicts(model, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def save_checkpoint(out: Path, step: int, state: dict, model, optimizer, dist: Dist, export_template) -> Path:
    """``<out>/checkpoint-<step>/``: ``model/`` (save_pretrained), ``trainer_state.pt`` (``state``
    plus the optimizer), ``rng_state_<rank>.pt`` (``state["rng"]``); then ``<out>/latest``.

    Every rank calls it. ``export_template``: under FSDP2, a meta-device copy of the model
    (:func:`qstar.distributed.meta_copy`) that rank 0 fills with the full weights to export."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    model_sd, optim_sd = _full_state_dicts(model, optimizer)  # every rank takes part
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(state.pop("rng"), tmp / f"rng_state_{dist.rank}.pt")
    if dist.is_main:
        if export_template is None:
            unwrap(model).save_pretrained(str(tmp / "model"))
        else:  # FSDP2: the parameters are sharded; fill an unsharded copy on this rank only
            export = export_template.to_empty(device="cpu")
            export.load_state_dict(model_sd)
            export.save_pretrained(str(tmp / "model"))
            export.to("meta")
        torch.save({**state, "optimizer": optim_sd}, tmp / "trainer_state.pt")
        for name in ("training", "method", "run"):
            (tmp / f"{name}_config.json").write_text(json.dumps(state[name], indent=2, sort_keys=True) + "\n")
    dist.barrier()
    if dist.is_main:
        fault_point("checkpoint-write")
        if final.exists():
            shutil.rmtree(final)
            fault_point("checkpoint-delete")
        os.replace(tmp, final)
        write_atomic(out / "latest", final.name + "\n")
    dist.barrier()
    return final


def resolve_checkpoint(resume: str, output_dir: str) -> Path:
    """``latest`` -> ``<output_dir>/latest``'s target; an output directory -> its latest; else the path."""
    path = Path(output_dir) if resume == "latest" else Path(resume)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise ValueError(
            f"--resume {resume!r}: expected a checkpoint directory (with trainer_state.pt) or an output "
            f"directory with a 'latest' file, got {str(path)!r}"
        )
    return path


def read_trainer_state(checkpoint: Path) -> dict:
    """The whole ``trainer_state.pt`` of a checkpoint (on the CPU)."""
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def _state_dict_name(name: str) -> str:
    """A parameter's name in a full optimizer state dict: without the DDP, activation-checkpoint and
    torch.compile wrappers' prefixes (FSDP2 keeps the names)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def load_trainer_state(checkpoint: Path, model, optimizer, scheduler, dist: Dist, generator) -> dict:
    """Restore the optimizer, the scheduler and this rank's RNG streams; return the saved state
    (its ``step``, ``skipped_total``, ``sampler``, ...)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = read_trainer_state(checkpoint)
    # Not strict: a parameter the objective never gave a gradient has no AdamW state in the
    # checkpoint. torch initialises every state (a zero step) before loading, so such a parameter
    # would come back with step 1 and zero moments, and its first real update would use the wrong
    # bias correction; its state is dropped again, as in the run that never stopped.
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False)
    )
    saved = set(state["optimizer"]["state"])
    for name, param in model.named_parameters():
        if _state_dict_name(name) not in saved:
            optimizer.state.pop(param, None)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = checkpoint / f"rng_state_{dist.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False), generator)
    else:
        log.warning(
            "%s not found (saved with fewer processes?): fresh RNG streams on rank %d", rng_file, dist.rank
        )
    return state
