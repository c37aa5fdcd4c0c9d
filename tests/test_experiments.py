"""The experiment scripts' own arithmetic (their runs take hours; this checks what they claim)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from qstar.config import get_preset
from qstar.loading import build_model

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matched_compute_counts_the_decoder_passes_of_a_training_step():
    """The baseline of the real-model experiment gets as many decoder passes over a window as the
    Quiet-STaR run: count the passes of a real training forward and compare with the script's count."""
    exp = load_script("smollm2_word_problems")
    s = dict(exp.SETTINGS)
    counts = {k: s[k] for k in ("n_thought_tokens", "n_talk_tokens", "n_rationales")}
    method = dataclasses.replace(get_preset("tiny-demo").method, **counts)
    model = build_model("tiny", method, seed=0).train()
    rows = []
    hook = model.decoder.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    ids = torch.randint(3, 60, (1, 12))
    model(ids, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert sum(rows) == exp.passes_per_window(s)  # row-passes over one window
    no_thought = []
    hook = model.decoder.register_forward_hook(
        lambda m, args, kwargs, out: no_thought.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    model(ids, think=False)
    hook.remove()
    assert no_thought == [1]
    windows = s["batch_size"] * s["max_steps"] * exp.passes_per_window(s)
    assert (
        exp.baseline_steps(s) * s["baseline_batch_size"]
        >= windows
        > (exp.baseline_steps(s) - 1) * s["baseline_batch_size"]
    )


def test_training_seconds_reads_the_trainer_log(tmp_path):
    exp = load_script("smollm2_word_problems")
    log = tmp_path / "run.log"
    log.write_text(
        "2026-12-05 02:00:00,1 INFO qstar.loading: loading\n"
        "2026-12-05 02:00:30,181 INFO qstar.train: 2000 windows of 128 tokens; ...\n"
        "step 1/80 | loss 1.8\n"
        "2026-12-05 02:29:40,5 INFO qstar.train: wrote metrics.csv and metrics.png\n"
    )
    assert exp.training_seconds(log) == 29 * 60 + 10
