"""Checkpoint integrity (issue 15, items 1, 2, 6 and 11's corruption part):

* nothing is unpickled: a crafted pickle in a checkpoint is refused, naming the file, and never runs;
* every file is in the manifest (size, sha256); a flipped or truncated file is detected and named;
* ``--resume latest`` falls back to the newest verified checkpoint and says so;
* a crash at any file-system operation while a rollback-resume replaces a checkpoint of the same
  step leaves ``latest`` naming a verified checkpoint, and no complete save stranded in a temp dir;
* a full disk (or no permission) mid-save: one line naming the cause, the checkpoint being written
  and the last good one; no temporary files; ``latest`` unchanged.

The suite prints what it did ("corruptions detected: N/N", "crash points survived: N/N").
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import qstar.checkpoint as C  # noqa: E402
import qstar.train as T  # noqa: E402
from qstar.checkpoint import CheckpointError, CheckpointWriteError, resolve_checkpoint  # noqa: E402
from qstar.config import RunConfig, get_preset  # noqa: E402
from qstar.distributed import Dist  # noqa: E402
from qstar.model import QuietStarForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def small(out, **training):
    """A few-second run: tiny Mistral, 2 thought tokens, 24-token windows."""
    preset = get_preset("tiny-demo")
    method = dataclasses.replace(preset.method, n_thought_tokens=2, n_talk_tokens=2)
    kw = dict(batch_size=2, micro_batch_size=2, seq_len=24, max_steps=2, log_every=1, save_every=1,
              warmup_steps=1, log_sample_thoughts=0)  # fmt: skip
    kw.update(training)
    run = RunConfig(model="tiny", output_dir=str(out), progress=False, plot=False)
    return method, dataclasses.replace(preset.training, **kw), run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run: checkpoint-1, checkpoint-2, latest -> checkpoint-2 (do not modify)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    T.train(*small(out))
    return out


def copy_run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def resume(out, checkpoint="latest", max_steps=3):
    method, training, run = small(out, max_steps=max_steps)
    return T.train(method, training, dataclasses.replace(run, resume=str(checkpoint)))


def test_a_checkpoint_is_exactly_its_manifest(trained):
    ckpt = trained / "checkpoint-2"
    manifest = C.verify_checkpoint(ckpt)
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk
    assert {"model/model.safetensors", "trainer_state.safetensors", "rng_state_0.safetensors"} <= set(
        manifest["files"]
    )
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (ckpt / rel).stat().st_size and len(entry["sha256"]) == 64
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.bin")), "nothing pickled is written"


# --------------------------------------------------------------------------------------------------
# Item 1: nothing user-supplied is unpickled
# --------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(path: Path, marker: Path) -> None:
    torch.save({"step": 1, "optimizer": Payload(marker), "scheduler": {}}, path)


@pytest.mark.parametrize("where", ["old-format", "state-file", "rng-file", "extra-file"])
def test_a_crafted_pickle_is_refused_and_never_runs(trained, tmp_path, where):
    out = copy_run(trained, tmp_path)
    ckpt, marker = out / "checkpoint-2", tmp_path / "pwned"
    if where == "old-format":  # a format-1 checkpoint: trainer_state.pt, no manifest
        for name in ("manifest.json", "trainer_state.safetensors", "rng_state_0.safetensors"):
            (ckpt / name).unlink()
        crafted_pickle(ckpt / "trainer_state.pt", marker)
        crafted_pickle(ckpt / "rng_state_0.pt", marker)
        bad = "trainer_state.pt"
    elif where in ("state-file", "rng-file"):  # the pickle under a new name, with a consistent manifest
        bad = "trainer_state.safetensors" if where == "state-file" else "rng_state_0.safetensors"
        crafted_pickle(ckpt / bad, marker)
        (ckpt / "manifest.json").unlink()
        C.write_manifest(ckpt, 2)
    else:  # dropped beside a valid checkpoint
        bad = "trainer_state.pt"
        crafted_pickle(ckpt / bad, marker)
    with pytest.raises(CheckpointError) as err:
        resume(out, ckpt)
    message = str(err.value)
    print(f"{where}: {message}")
    assert bad in message and "\n" not in message
    assert not marker.exists(), "the pickle ran"


def test_an_old_format_output_directory_is_refused_with_a_clear_error(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    for ckpt in (out / "checkpoint-1", out / "checkpoint-2"):
        (ckpt / "manifest.json").unlink()
        crafted_pickle(ckpt / "trainer_state.pt", tmp_path / "pwned")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* passes verification .*format 1"):
        resume(out)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------------
# Item 11 (corruption) and item 2 (verification): every file, flipped and truncated
# --------------------------------------------------------------------------------------------------


def flip_middle(path: Path) -> None:
    """Overwrite up to 4 KiB in the middle with their complement: same size, different bytes."""
    data = bytearray(path.read_bytes())
    n = max(1, min(4096, len(data) // 2))
    start = (len(data) - n) // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_every_corruption_of_every_file_is_detected_and_named(trained, tmp_path, capsys):
    files = sorted(
        p.relative_to(trained).as_posix() for p in (trained / "checkpoint-2").rglob("*") if p.is_file()
    )
    assert len(files) >= 9
    tried, detected, missed = 0, 0, []
    for rel in files:
        for name, corrupt in (("flipped", flip_middle), ("truncated", truncate)):
            case = tmp_path / f"{rel.replace('/', '_')}-{name}"
            shutil.copytree(trained / "checkpoint-2", case / "checkpoint-2")
            target = case / rel
            corrupt(target)
            tried += 1
            try:
                resolve_checkpoint(str(case / "checkpoint-2"), str(case))
            except CheckpointError as e:
                if Path(rel).name in str(e) and "\n" not in str(e):
                    detected += 1
                else:
                    missed.append(f"{rel} {name}: the error does not name it: {e}")
            else:
                missed.append(f"{rel} {name}: not detected")
            shutil.rmtree(case)
    with capsys.disabled():
        print(f"\ncorruptions detected: {detected}/{tried} ({len(files)} files, flipped and truncated)")
    assert not missed, missed
    assert detected == tried == 2 * len(files)


@pytest.mark.parametrize("rel", ["model/model.safetensors", "trainer_state.safetensors"])
def test_a_garbled_file_stops_the_resume_naming_it(trained, tmp_path, rel):
    """The issue's case: 4 KiB overwritten, same size. It used to load silently (NaN Adam state)."""
    out = copy_run(trained, tmp_path)
    flip_middle(out / "checkpoint-2" / rel)
    with pytest.raises(CheckpointError, match=rf"checkpoint-2/{rel} is corrupt: its sha256 does not match"):
        resume(out, out / "checkpoint-2")


# --------------------------------------------------------------------------------------------------
# Item 2: --resume latest falls back to the newest verified checkpoint, and says so
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbled", "truncated", "latest-missing", "latest-garbage"])
def test_resume_latest_falls_back_to_the_newest_verified_checkpoint(trained, tmp_path, caplog, damage):
    out = copy_run(trained, tmp_path)
    if damage == "garbled":
        flip_middle(out / "checkpoint-2" / "model" / "model.safetensors")
    elif damage == "truncated":
        truncate(out / "checkpoint-2" / "trainer_state.safetensors")
    elif damage == "latest-missing":
        (out / "latest").unlink()
        flip_middle(out / "checkpoint-2" / "rng_state_0.safetensors")
    else:
        (out / "latest").write_bytes(b"\xff../../etc\n")
        shutil.rmtree(out / "checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="qstar.train"):
        assert resolve_checkpoint("latest", str(out)) == out / "checkpoint-1"
        assert resolve_checkpoint(str(out), "elsewhere") == out / "checkpoint-1"
    assert "resuming from the newest verified checkpoint" in caplog.text and "checkpoint-1" in caplog.text
    if damage in ("garbled", "truncated"):  # an explicit checkpoint is refused, not replaced
        with pytest.raises(CheckpointError, match="checkpoint-2/"):
            resolve_checkpoint(str(out / "checkpoint-2"), str(out))


def test_resume_latest_resumes_from_the_fallback_and_latest_follows(trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path)
    flip_middle(out / "checkpoint-2" / "trainer_state.safetensors")
    with caplog.at_level(logging.WARNING, logger="qstar.train"):
        result = resume(out, "latest", max_steps=2)
    assert [r["step"] for r in result.history] == [2] and "newest verified checkpoint" in caplog.text
    assert (out / "latest").read_text() == "checkpoint-2\n"
    C.verify_checkpoint(out / "checkpoint-2")  # replaced by a complete one
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_the_fallback_never_picks_a_checkpoint_left_from_before_a_rollback(trained, tmp_path, caplog):
    """After a rollback to checkpoint-1, 'latest' names checkpoint-1 while checkpoint-2 (the old
    timeline) is still there; if checkpoint-1 is then damaged, nothing older is left: the fallback
    refuses instead of resuming the abandoned checkpoint-2."""
    out = copy_run(trained, tmp_path)
    C.adopt_checkpoint(out, out / "checkpoint-1")  # what a rollback resume does first
    assert (out / "latest").read_text() == "checkpoint-1\n"
    flip_middle(out / "checkpoint-1" / "trainer_state.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint in .* passes verification"):
        resolve_checkpoint("latest", str(out))
    assert "checkpoint-2" not in caplog.text


# --------------------------------------------------------------------------------------------------
# Item 2: rollback-resume replaces a checkpoint of the same step; a crash at any point is survived
# --------------------------------------------------------------------------------------------------


def test_rollback_resume_into_the_same_directory(trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path)
    before = (out / "checkpoint-2" / "manifest.json").read_text()
    with caplog.at_level(logging.INFO, logger="qstar.train"):
        result = resume(out, out / "checkpoint-1", max_steps=2)
    assert (
        result.step == 2
        and "'latest' names checkpoint-1, the checkpoint this run resumed from" in caplog.text
    )
    assert (out / "latest").read_text() == "checkpoint-2\n"
    assert C.verify_checkpoint(out / "checkpoint-2") and before  # a complete new checkpoint-2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


class Killed(BaseException):
    """The process died here: nothing after it runs (not even clean-up handlers)."""


@pytest.fixture(scope="module")
def saver(trained):
    """A model and optimizer to call save_checkpoint with directly (fast)."""
    model = QuietStarForCausalLM.from_pretrained(str(trained / "checkpoint-2" / "model"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.base_model.lm_head.weight.sum().backward()
    optimizer.step()
    state = C.read_trainer_state(trained / "checkpoint-2")
    state.pop("optimizer")
    return model, optimizer, state


def save_with_crash(monkeypatch, out, saver, crash_at: int | None) -> int:
    """Save checkpoint-2 into ``out``; die at the ``crash_at``-th file-system operation (None: count
    them). After the death every file-system operation is a no-op, as in a killed process."""
    model, optimizer, state = saver
    ops, dead = [0], [False]

    def wrap(fn):
        def op(*args, **kwargs):
            if dead[0]:
                return None
            ops[0] += 1
            if ops[0] == crash_at:
                dead[0] = True
                raise Killed
            return fn(*args, **kwargs)

        return op

    with monkeypatch.context() as m:
        for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync"):
            m.setattr(os, name, wrap(getattr(os, name)))
        g = torch.Generator().manual_seed(0)
        state = {**state, "skipped_total": 7, "rng": C.rng_state(g)}  # 7: tells the new save apart
        try:
            C.save_checkpoint(out, 2, state, model, optimizer, Dist("none", 0, 1, torch.device("cpu")), None)
        except Killed:
            pass
    return ops[0]


@pytest.mark.parametrize("latest_names", ["checkpoint-1", "checkpoint-2"])
def test_a_crash_while_a_checkpoint_is_replaced_leaves_latest_complete(
    trained, tmp_path, monkeypatch, saver, capsys, latest_names
):
    """``latest`` names checkpoint-1 (a rollback-resume points it there) or checkpoint-2 itself (a
    resume from elsewhere); the new checkpoint-2 replaces the old. Die at each operation in turn."""
    probe = copy_run(trained, tmp_path / "probe")
    n_ops = save_with_crash(monkeypatch, probe, saver, None)
    assert C.read_trainer_state(probe / "checkpoint-2")["skipped_total"] == 7
    assert n_ops > 20
    survived, problems = 0, []
    for k in range(1, n_ops + 1):
        out = copy_run(trained, tmp_path / f"k{k}")
        (out / "latest").write_text(latest_names + "\n")
        save_with_crash(monkeypatch, out, saver, k)
        # at the moment of death
        named = C._latest_name(out)
        swapping = (out / ".old-checkpoint-2").exists()
        try:
            new_in_place = C.read_trainer_state(out / "checkpoint-2")["skipped_total"] == 7
        except CheckpointError:
            new_in_place = False
        try:
            if named is not None:
                C.verify_checkpoint(out / named)  # latest names a complete checkpoint
            found = resolve_checkpoint("latest", str(out))  # what a resume takes (it repairs)
            C.verify_checkpoint(out / "checkpoint-2")  # the old or the new one, complete
            new = C.read_trainer_state(out / "checkpoint-2")["skipped_total"] == 7
            if (out / ".old-checkpoint-2").exists():
                problems.append(f"op {k}: the replaced checkpoint is left in .old-checkpoint-2")
            elif (swapping or new_in_place) and not (new and found.name == "checkpoint-2"):
                problems.append(f"op {k}: the new save is complete, but a resume takes the old {found.name}")
            else:
                survived += 1
        except CheckpointError as e:
            problems.append(f"op {k}: {e}")
        shutil.rmtree(out.parent)
    with capsys.disabled():
        print(f"\ncrash points survived ({latest_names} was latest): {survived}/{n_ops}")
    assert not problems, problems


# --------------------------------------------------------------------------------------------------
# Item 6: a full disk or an unwritable directory
# --------------------------------------------------------------------------------------------------


def fail_after_writing_half(code: int):
    def fail(path, size=1000):
        with open(path, "wb") as f:
            f.write(b"\0" * size)
        raise OSError(code, os.strerror(code), str(path))

    return fail


@pytest.mark.parametrize(
    "part, code",
    [
        ("model", errno.ENOSPC),
        ("trainer_state", errno.ENOSPC),
        ("trainer_state-rust", errno.ENOSPC),  # safetensors' own error (seen on a full tmpfs)
        ("manifest", errno.ENOSPC),
        ("latest", errno.ENOSPC),
        ("model", errno.EACCES),
    ],
)
def test_a_full_disk_mid_save_is_one_clear_line(tmp_path, monkeypatch, part, code):
    out = tmp_path / "run"
    fail = fail_after_writing_half(code)
    calls = [0]
    if part == "model":  # the weights are half written when the disk fills
        save_pretrained = QuietStarForCausalLM.save_pretrained

        def patched(self, directory, **kw):
            calls[0] += 1
            if calls[0] < 2:
                return save_pretrained(self, directory, **kw)
            Path(directory).mkdir(parents=True, exist_ok=True)
            fail(Path(directory) / "model.safetensors")

        monkeypatch.setattr(QuietStarForCausalLM, "save_pretrained", patched)
    elif part.startswith("trainer_state"):
        import safetensors.torch

        save_file = safetensors.torch.save_file

        def patched(tensors, filename, metadata=None):
            if Path(filename).name == "trainer_state.safetensors":
                calls[0] += 1
                if calls[0] == 2 and part.endswith("rust"):
                    Path(filename).write_bytes(b"\0" * 1000)
                    raise RuntimeError(
                        "Error while serializing: I/O error: No space left on device (os error 28)"
                    )
                if calls[0] == 2:
                    fail(Path(filename))
            return save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", patched)
    elif part == "manifest":
        write_manifest = C.write_manifest

        def patched(directory, step):
            if step == 2:
                fail(directory / "manifest.json")
            return write_manifest(directory, step)

        monkeypatch.setattr(C, "write_manifest", patched)
    else:
        write_atomic = C.write_atomic

        def patched(path, text):  # latest.tmp is written, then its fsync finds the disk full
            def full(fd):
                raise OSError(code, os.strerror(code), str(path) + ".tmp")

            with monkeypatch.context() as m:
                if text == "checkpoint-2\n":
                    m.setattr(os, "fsync", full)
                return write_atomic(path, text)

        monkeypatch.setattr(C, "write_atomic", patched)
    with pytest.raises(CheckpointWriteError) as err:
        T.train(*small(out))
    message = str(err.value)
    print(message)
    assert "\n" not in message and os.strerror(code) in message
    assert f"could not write checkpoint {out / 'checkpoint-2'}" in message
    assert f"the last good checkpoint is {out / 'checkpoint-1'} ('latest')" in message
    assert err.value.errno == code and isinstance(err.value, OSError)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == [], leftovers
    assert (out / "latest").read_text() == "checkpoint-1\n"
    assert resolve_checkpoint("latest", str(out)) == out / "checkpoint-1"
