"""Trainer checkpoints: written atomically, verified before a resume, and never unpickled.

``<output_dir>/checkpoint-<step>/`` (format 2) holds

* ``model/``: ``save_pretrained`` (loads with ``QuietStarForCausalLM.from_pretrained``);
* ``trainer_state.safetensors``: the optimizer (full state dict keyed by parameter name, so it loads
  under any wrapping), the scheduler, the step and skip counters, the sampler's position, the world
  size and the configs; ``{training,method,run}_config.json`` for people;
* ``rng_state_<rank>.safetensors``: Python's, torch's (CPU and CUDA) and the thought-sampling
  generator's state of each rank;
* ``manifest.json``: the size and sha256 of every other file, and a checksum of itself.

A *state file* is a safetensors file: its tensors, plus the rest of the state as JSON in the header
(tuples tagged, tensors referred to by key). Nothing is pickled, so nothing is unpickled.

Saving (:func:`save_checkpoint`): every file is written into ``.tmp-checkpoint-<step>``, fsynced and
hashed into the manifest (written last), the directory is renamed to ``checkpoint-<step>``, and then
``latest`` names it (written beside, fsynced, renamed). A checkpoint of the same step left from before
a rollback-resume is first renamed aside to ``.old-checkpoint-<step>`` and deleted only once ``latest``
names the new one; ``latest`` never names the directory being replaced (a resume points it at the
checkpoint resumed from), so at every moment it names a complete checkpoint. A failed write (a full
disk, no permission) removes the temporary directory and raises :class:`CheckpointWriteError`.

Resuming (:func:`resolve_checkpoint`): the manifest is verified (no file missing or extra, sizes,
sha256) and a bad file is named (:class:`CheckpointError`). ``--resume latest`` (or an output
directory) falls back to the newest verified checkpoint with a warning; an explicit checkpoint
directory that fails is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

import torch

from .distributed import Dist, unwrap
from .durable import fsync, remove, write_atomic
from .faults import fault_point

log = logging.getLogger("qstar.train")

__all__ = [
    "CheckpointError", "CheckpointWriteError", "FORMAT_VERSION", "adopt_checkpoint", "load_state",
    "load_trainer_state", "read_trainer_state", "resolve_checkpoint", "rng_state", "save_checkpoint",
    "save_state", "set_rng_state", "verify_checkpoint", "write_atomic", "write_manifest",
]  # fmt: skip

#: 1: ``trainer_state.pt`` / ``rng_state_<rank>.pt`` (pickles), no manifest: refused.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.safetensors"
_STATE_KEY = "qstar_state"  # the safetensors header entry holding the JSON part of a state file
_TENSOR, _TUPLE = "__tensor__", "__tuple__"
_NAME = re.compile(r"checkpoint-(\d+)")
_TRAINER_KEYS = ("step", "skipped_total", "scheduler", "sampler", "optimizer", "training", "method", "run")


class CheckpointError(ValueError):
    """A checkpoint that is refused (missing, corrupt, of an old format, malformed); the message is
    one line and names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, no permission). The message is one line: the
    cause, the checkpoint being written and the last good one. Its temporary files are removed."""


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# State files: tensors in safetensors, everything else as JSON in its header
# --------------------------------------------------------------------------------------------------


def _pack(obj, tensors: dict, where: str):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(obj, tuple):
        return {_TUPLE: [_pack(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj) or {_TENSOR, _TUPLE} & obj.keys():
            raise TypeError(f"{where}: only dicts with string keys (not {_TENSOR}/{_TUPLE}) can be stored")
        return {k: _pack(v, tensors, f"{where}.{k}") for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint's state")


def _unpack(obj, tensors: dict):
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if obj.keys() == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if obj.keys() == {_TUPLE}:
            return tuple(_unpack(v, tensors) for v in obj[_TUPLE])
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    return obj


def save_state(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, None, lists, tuples, string-keyed dicts) to the
    safetensors file ``path`` and fsync it."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_pack(state, tensors, path.name))
    save_file(tensors, str(path), metadata={_STATE_KEY: skeleton})
    fsync(path)


def load_state(path: Path) -> dict:
    """A state file written by :func:`save_state`; a :class:`CheckpointError` naming the file for
    anything else (a pickle, a truncated file, a foreign safetensors file)."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _STATE_KEY not in meta:
            raise ValueError(f"no {_STATE_KEY!r} entry in its header")
        state = _unpack(json.loads(meta[_STATE_KEY]), tensors)
    except Exception as e:  # SafetensorError, JSON, a reference to a tensor it lacks, ...
        raise CheckpointError(f"{path} is not a qstar state file ({_describe(e)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a qstar state file (its state is not a mapping)")
    return state


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _listing(directory: Path) -> list[str]:
    """The files under ``directory`` (relative, '/'-separated), the manifest excluded; a symbolic
    link is refused (a checkpoint never holds one)."""
    files = []
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            p = Path(root) / name
            if p.is_symlink():
                raise CheckpointError(f"{p} is a symbolic link (a checkpoint holds only plain files)")
        files += [(Path(root) / n).relative_to(directory).as_posix() for n in names]
    return sorted(f for f in files if f != MANIFEST)


def _checksum(body: dict) -> str:
    rest = {k: v for k, v in body.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """fsync every file under ``directory``, record its size and sha256 in ``manifest.json`` (written
    last), and fsync the directories."""
    files = {}
    for rel in _listing(directory):
        p = directory / rel
        fsync(p)
        files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    body = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    body["checksum"] = _checksum(body)
    with open(directory / MANIFEST, "w") as f:
        f.write(json.dumps(body, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for root, _, _ in sorted(os.walk(directory), reverse=True):  # the deepest first
        fsync(Path(root))


def verify_checkpoint(directory: Path, under: str | None = None) -> dict:
    """Check ``directory`` against its manifest: no file missing, none extra, every size and sha256
    as recorded. Return the manifest; raise :class:`CheckpointError` naming the first bad file.
    ``under`` (e.g. ``"model/"``): hash only the files below that folder (a model loaded for eval
    or generation need not read the optimizer state); their presence and sizes are checked all the same."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if (directory / "trainer_state.pt").exists():
            raise CheckpointError(
                f"{directory} is a checkpoint of format 1 (pickled trainer_state.pt, no {MANIFEST}), which "
                f"is not loaded: pickles can run code; this version of qstar reads format {FORMAT_VERSION}"
            )
        raise CheckpointError(f"{manifest} is missing: not a checkpoint, or one whose save did not finish")
    try:
        body = json.loads(manifest.read_text())
        files = body["files"]
        ok = body.get("checksum") == _checksum(body) and all(
            isinstance(k, str) and isinstance(v["size"], int) and isinstance(v["sha256"], str)
            for k, v in files.items()
        )
    except Exception:  # not JSON, not text, not the structure
        ok = False
    if not ok:
        raise CheckpointError(f"{manifest} is corrupt (it does not match its own checksum)")
    if body.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest}: format {body.get('format_version')!r}; this version of qstar reads {FORMAT_VERSION}"
        )
    name = _NAME.fullmatch(directory.name.removeprefix(".tmp-"))
    if name and int(name.group(1)) != body.get("step"):
        raise CheckpointError(f"{manifest} is of step {body.get('step')!r}, not of {directory.name}")
    present = _listing(directory)
    extra = sorted(set(present) - set(files))
    if extra:
        raise CheckpointError(f"{directory / extra[0]} is not in the checkpoint's manifest")
    for rel, want in sorted(files.items()):
        p = directory / rel
        if rel not in present:
            raise CheckpointError(f"{p} is missing (the checkpoint's manifest lists it)")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{p} has {size} bytes, its manifest says {want['size']} (truncated?)")
        if (under is None or rel.startswith(under)) and _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p} is corrupt: its sha256 does not match the checkpoint's manifest")
    return body


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _full_state_dicts(model, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _describe(e: BaseException) -> str:
    """The cause of ``e`` in a few words: an OSError's strerror (and file), else its first line."""
    if isinstance(e, OSError) and e.errno is not None:
        text = e.strerror or os.strerror(e.errno)
        return f"{text} ({e.filename})" if e.filename else text
    code = re.search(r"os error (\d+)", str(e))  # safetensors' (Rust) I/O errors
    if code:
        return os.strerror(int(code.group(1)))
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _agree(dist: Dist, failure: BaseException | None) -> BaseException | None:
    """Every rank learns whether any rank failed (and waits for all: a barrier)."""
    if dist.mode == "none":
        return failure
    flag = torch.tensor([0.0 if failure is None else 1.0], device=dist.device)
    torch.distributed.all_reduce(flag)
    if failure is None and flag.item() > 0:
        return RuntimeError("another process failed to write its part")
    return failure


def _latest_name(out: Path) -> str | None:
    """The checkpoint ``<out>/latest`` names, if it names one."""
    try:
        name = (out / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _NAME.fullmatch(name) else None


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>`` directories of ``out``, the newest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _write_files(tmp: Path, state: dict, optim_sd, model, model_sd, export_template) -> None:
    """The main rank's part: the model, the trainer state and the configs."""
    if export_template is None:
        unwrap(model).save_pretrained(str(tmp / "model"))
    else:  # FSDP2: the parameters are sharded; fill an unsharded copy on this rank only
        export = export_template.to_empty(device="cpu")
        export.load_state_dict(model_sd)
        export.save_pretrained(str(tmp / "model"))
        export.to("meta")
    save_state(tmp / TRAINER_STATE, {**state, "format_version": FORMAT_VERSION, "optimizer": optim_sd})
    for name in ("training", "method", "run"):
        (tmp / f"{name}_config.json").write_text(json.dumps(state[name], indent=2, sort_keys=True) + "\n")


def _point_latest_away(out: Path, final: Path) -> None:
    """Before ``final`` is replaced: ``latest`` names the newest earlier verified checkpoint, or is
    removed (``--resume latest`` then takes the newest verified one)."""
    step = int(_NAME.fullmatch(final.name).group(1))
    for s, c in _checkpoints(out):
        if s < step:
            try:
                verify_checkpoint(c)
            except CheckpointError:
                continue
            write_atomic(out / "latest", c.name + "\n")
            return
    (out / "latest").unlink(missing_ok=True)
    fsync(out)


def _commit(out: Path, tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``, then ``latest`` names it; an older ``final`` is set
    aside first and deleted last."""
    fault_point("checkpoint-write")  # the complete temporary checkpoint, not yet in place
    old = out / f".old-{final.name}"
    remove(old)
    if final.exists():  # a rollback-resume reached this step again
        if _latest_name(out) == final.name:
            _point_latest_away(out, final)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)  # put the old one back
        raise
    fsync(out)
    write_atomic(out / "latest", final.name + "\n")
    if old.exists():
        fault_point("checkpoint-delete")  # the replaced checkpoint, set aside, about to go
    remove(old)


def save_checkpoint(out: Path, step: int, state: dict, model, optimizer, dist: Dist, export_template) -> Path:
    """``<out>/checkpoint-<step>/``: ``model/`` (save_pretrained), ``trainer_state.safetensors``
    (``state`` plus the optimizer), ``rng_state_<rank>.safetensors`` (``state["rng"]``), the configs
    and the manifest; then ``<out>/latest``. Raises :class:`CheckpointWriteError` (on every rank) if
    any part cannot be written; the temporary directory is then removed.

    Every rank calls it. ``export_template``: under FSDP2, a meta-device copy of the model
    (:func:`qstar.distributed.meta_copy`) that rank 0 fills with the full weights to export."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    model_sd, optim_sd = _full_state_dicts(model, optimizer)  # every rank takes part
    rng = state.pop("rng")
    failure: BaseException | None = None
    try:
        if dist.is_main:
            try:
                remove(tmp)
                tmp.mkdir(parents=True)
            except Exception as e:
                failure = e
        failure = _agree(dist, failure)
        if failure is None:
            try:
                save_state(tmp / f"rng_state_{dist.rank}.safetensors", rng)
                if dist.is_main:
                    _write_files(tmp, state, optim_sd, model, model_sd, export_template)
            except Exception as e:
                failure = e
            failure = _agree(dist, failure)
        if failure is None and dist.is_main:
            try:
                write_manifest(tmp, step)
            except Exception as e:
                failure = e
    except BaseException:  # interrupted: leave no temporary directory behind
        if dist.is_main:
            remove(tmp)
        raise
    if failure is None and dist.is_main:
        try:
            _commit(out, tmp, final)
        except Exception as e:
            failure = e
    failure = _agree(dist, failure)
    if failure is not None:
        if dist.is_main:
            remove(tmp)
        last = _latest_name(out)
        last = f"the last good checkpoint is {out / last} ('latest')" if last else "no earlier checkpoint"
        error = CheckpointWriteError(
            f"could not write checkpoint {final}: {_describe(failure)}; temporary files removed; {last}"
        )
        code = re.search(r"os error (\d+)", str(failure))
        error.errno = getattr(failure, "errno", None) or (int(code.group(1)) if code else None)
        raise error from failure
    return final


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


def _finish_interrupted_swap(out: Path) -> None:
    """A crash while ``.old-checkpoint-<s>`` was set aside (see :func:`_commit`): finish the job.
    The replacement (verified first) is renamed into place if it is not yet, and ``latest`` names it
    unless it names a later checkpoint; then the old one is deleted."""
    for old in sorted(out.glob(".old-checkpoint-*")):
        final, name = out / old.name.removeprefix(".old-"), _NAME.fullmatch(old.name.removeprefix(".old-"))
        if name is None:
            continue
        tmp, step = out / f".tmp-{final.name}", int(name.group(1))
        try:
            verify_checkpoint(final if final.exists() else tmp)
        except CheckpointError:
            continue
        if not final.exists():
            os.replace(tmp, final)
            fsync(out)
        latest = _latest_name(out)
        if latest is None or int(_NAME.fullmatch(latest).group(1)) < step:
            write_atomic(out / "latest", final.name + "\n")
            log.warning("finished replacing %s, which a crash interrupted; 'latest' names it", final)
        remove(old)


def _not_a_checkpoint(resume: str, path: Path) -> ValueError:
    return ValueError(f"--resume {resume!r}: expected a checkpoint directory (with {MANIFEST}) or an output "
                      f"directory with a 'latest' file, got {str(path)!r}")  # fmt: skip


def _resolve_latest(out: Path, resume: str) -> Path:
    """``latest``'s checkpoint if it verifies, else the newest checkpoint that does (with a warning)."""
    named = _latest_name(out)
    if named is not None and (out / named).is_dir():
        try:
            verify_checkpoint(out / named)
            return out / named
        except CheckpointError as e:
            reason = f"'latest' names {named}, which fails verification: {e}"
    elif (out / "latest").is_file():
        reason = f"{out / 'latest'} does not name a checkpoint directory of {out}"
    else:
        reason = f"{out} has no 'latest' file"
    # Only checkpoints older than the one 'latest' names: a newer one is left from before a rollback
    # resume (another timeline, whose logs were cut away).
    below = int(_NAME.fullmatch(named).group(1)) if named is not None else None
    candidates = [c for s, c in _checkpoints(out) if c.name != named and (below is None or s < below)]
    if named is None and not candidates:
        raise _not_a_checkpoint(resume, out)
    for c in candidates:
        try:
            verify_checkpoint(c)
        except CheckpointError as e:
            log.warning("--resume %s: skipping %s: %s", resume, c.name, e)
            continue
        log.warning("--resume %s: %s; resuming from the newest verified checkpoint, %s", resume, reason, c)
        return c
    raise CheckpointError(f"--resume {resume!r}: no checkpoint in {out} passes verification ({reason})")


def _resolve(resume: str, output_dir: str) -> Path:
    if Path(output_dir).is_dir():
        _finish_interrupted_swap(Path(output_dir))
    path = Path(output_dir) if resume == "latest" else Path(resume)
    if resume == "latest" or (path / "latest").is_file() or _checkpoints(path):
        return _resolve_latest(path, resume)
    if not ((path / MANIFEST).is_file() or (path / "trainer_state.pt").is_file()):
        raise _not_a_checkpoint(resume, path)
    verify_checkpoint(path)
    return path


def resolve_checkpoint(resume: str, output_dir: str, dist: Dist | None = None) -> Path:
    """The verified checkpoint to resume from. ``latest`` -> ``<output_dir>/latest``'s target; an
    output directory -> its latest; else the path, a checkpoint directory. With ``latest`` or an
    output directory, a checkpoint that fails verification is skipped for the newest that passes
    (a warning says so); an explicit checkpoint that fails raises :class:`CheckpointError`.

    With ``dist``, rank 0 decides (and repairs an interrupted save) and every rank gets its answer."""
    if dist is None or dist.mode == "none":
        return _resolve(resume, output_dir)
    answer: list = [None, None]
    if dist.is_main:
        try:
            answer = [str(_resolve(resume, output_dir)), None]
        except Exception as e:
            answer = [None, e]
    message = [answer[0], None if answer[1] is None else str(answer[1])]
    torch.distributed.broadcast_object_list(message, src=0)  # strings between our own processes
    if answer[1] is not None:
        raise answer[1]
    if message[1] is not None:
        raise CheckpointError(message[1])
    return Path(message[0])


def adopt_checkpoint(out: Path, checkpoint: Path) -> None:
    """After a resume from ``checkpoint`` in ``out`` itself, ``latest`` names it: the run goes on from
    there (checkpoints of later steps, from before the resume, stay until the run replaces them).
    The main rank only."""
    if checkpoint.parent.resolve() != out.resolve() or _latest_name(out) == checkpoint.name:
        return
    step = int(_NAME.fullmatch(checkpoint.name).group(1)) if _NAME.fullmatch(checkpoint.name) else -1
    later = [c.name for s, c in _checkpoints(out) if s > step]
    write_atomic(out / "latest", checkpoint.name + "\n")
    log.info(
        "'latest' names %s, the checkpoint this run resumed from%s", checkpoint.name,
        f"; {', '.join(later)} (from before the resume) stay until this run replaces them" if later else "",
    )  # fmt: skip


def read_trainer_state(checkpoint: Path) -> dict:
    """The whole trainer state of a checkpoint (on the CPU); :class:`CheckpointError` if it is not one."""
    path = Path(checkpoint) / TRAINER_STATE
    state = load_state(path)
    missing = [k for k in _TRAINER_KEYS if k not in state]
    if missing or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a format-{FORMAT_VERSION} trainer state (missing {missing})")
    return state


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
    rng_file = checkpoint / f"rng_state_{dist.rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_state(rng_file), generator)
    else:
        log.warning(
            "%s not found (saved with fewer processes?): fresh RNG streams on rank %d", rng_file, dist.rank
        )
    return state
