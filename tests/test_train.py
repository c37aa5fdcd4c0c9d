"""qstar.train: exact resume, the NaN/Inf guard, complete checkpoints, CLI errors, the shortened demo.

The checkpoint, metrics, objective and loading modules have their own files (test_checkpoint.py, ...)."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

pytest.importorskip("transformers")

import qstar.train as T  # noqa: E402
from qstar.checkpoint import load_state, read_trainer_state  # noqa: E402
from qstar.config import RunConfig, get_preset  # noqa: E402
from qstar.metrics import read_metrics  # noqa: E402
from qstar.model import QuietStarForCausalLM as MODEL  # noqa: E402


def small(tmp_path, **training):
    """A few-second run: tiny Mistral, 2 thought tokens, 24-token windows, 2 micro-batches per step."""
    preset = get_preset("tiny-demo")
    method = dataclasses.replace(preset.method, n_thought_tokens=2, n_talk_tokens=2)
    kw = dict(batch_size=4, micro_batch_size=2, seq_len=24, max_steps=4, log_every=1, save_every=2,
              warmup_steps=2, log_sample_thoughts=1)  # fmt: skip
    kw.update(training)
    run = RunConfig(model="tiny", output_dir=str(tmp_path), progress=False, plot=False)
    return method, dataclasses.replace(preset.training, **kw), run


def params(model_dir):
    m = MODEL.from_pretrained(str(model_dir))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_resume_is_exact(tmp_path):
    method, training, run = small(tmp_path / "straight", max_steps=4)
    straight = T.train(method, training, run)
    assert straight.step == 4 and (tmp_path / "straight" / "latest").read_text().strip() == "checkpoint-4"

    method, training, run = small(tmp_path / "split", max_steps=2)
    first = T.train(method, training, run)
    assert first.checkpoint.name == "checkpoint-2"
    run = dataclasses.replace(run, resume="latest")
    second = T.train(method, dataclasses.replace(training, max_steps=4), run)
    assert second.step == 4 and [r["step"] for r in second.history] == [3, 4]

    for a, b in zip(straight.history, first.history + second.history):
        for key in ("loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    p1, p2 = params(straight.checkpoint / "model"), params(second.checkpoint / "model")
    assert p1.keys() == p2.keys()
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-6, atol=1e-7, msg=k)
    # metrics.csv of the resumed run holds steps 1..4 once each
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.csv")] == [1, 2, 3, 4]


def test_checkpoint_is_atomic_and_complete(tmp_path):
    method, training, run = small(tmp_path, max_steps=2, save_every=1)
    T.train(method, training, run)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert (
        "checkpoint-1" in names and "checkpoint-2" in names and not any(n.startswith(".tmp") for n in names)
    )
    ckpt = tmp_path / "checkpoint-2"
    state = read_trainer_state(ckpt)
    assert state["step"] == 2 and state["sampler"]["position"] == 8
    assert {"optimizer", "scheduler", "training", "method", "run"} <= state.keys()
    assert {"python", "torch", "sampling"} <= load_state(ckpt / "rng_state_0.safetensors").keys()
    assert (ckpt / "training_config.json").is_file() and (ckpt / "model").is_dir()


def _poison(monkeypatch, bad_calls):
    """Make the model's forward return a NaN loss on the given (1-based) calls."""
    forward, calls = MODEL.forward, [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_calls or "all" in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MODEL, "forward", poisoned)


def test_nan_guard_skips_the_step_and_training_continues(tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, {3})  # the first micro-batch of step 2 (2 micro-batches per step)
    method, training, run = small(tmp_path, max_steps=3, save_every=1)
    with caplog.at_level(logging.WARNING, logger="qstar.train"):
        result = T.train(method, training, run)
    assert [r["skipped"] for r in result.history] == [0, 1, 0] and result.skipped == 1
    assert "step 2: non-finite loss, grad_norm on this rank; the update is skipped" in caplog.text
    p1, p2, p3 = (params(tmp_path / f"checkpoint-{s}" / "model") for s in (1, 2, 3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1), "a skipped step changed the parameters"
    assert any(not torch.equal(p2[k], p3[k]) for k in p2), "training did not go on after the skip"
    assert all(math.isfinite(v) for k in p3 for v in p3[k].flatten()[:1].tolist())
    opt1 = read_trainer_state(tmp_path / "checkpoint-1")["optimizer"]
    opt2 = read_trainer_state(tmp_path / "checkpoint-2")["optimizer"]
    for k, s in opt1["state"].items():
        assert torch.equal(s["exp_avg"], opt2["state"][k]["exp_avg"]), "the skipped step moved Adam's state"
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["skipped_total"] for r in rows] == [0, 1, 1]


def test_nan_guard_stops_after_consecutive_skips(tmp_path, monkeypatch):
    _poison(monkeypatch, {"all"})
    method, training, run = small(tmp_path, max_steps=5, max_consecutive_skips=2)
    with pytest.raises(T.NonFiniteLossError, match=r"2 consecutive steps \(up to step 2\)"):
        T.train(method, training, run)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "tiny-demo", "--batch-size", "6", "--micro-batch-size", "4"],
         r"--batch-size \(6\) must be a multiple of --micro-batch-size x processes \(4 x 1 = 4\)"),
        (["--preset", "tiny-demo", "--report-to", "mlflow"], r"--report-to must name some of"),
        (["--preset", "default"], r"--model is required with --preset default"),
        (["--preset", "tiny-demo", "--data", "no/such/file.txt"], r"--data 'no/such/file.txt': no such file"),
        (["--preset", "tiny-demo", "--seq-len", "0"], r"seq_len must be > 0, got 0"),
    ],
)  # fmt: skip
def test_bad_arguments_are_clear_errors(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        T.main(argv + ["--output-dir", str(tmp_path), "--no-progress", "--max-steps", "1"])


def test_lr_schedule_warmup_then_linear_decay():
    training = dataclasses.replace(get_preset("tiny-demo").training, warmup_steps=4, decay_steps=10)
    f = T.lr_lambda(training)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == 0.0 and f(20) == 0.0


def test_short_demo_loss_falls_and_writes_its_files(tmp_path):
    """The README's demo command, shortened (20 steps of 4 sequences of 32 tokens): the NLL falls,
    and the CSV, plot, thoughts, TensorBoard events and checkpoint exist."""
    out = tmp_path / "demo"
    argv = ["--preset", "tiny-demo", "--max-steps", "20", "--batch-size", "4", "--micro-batch-size", "4",
            "--seq-len", "32", "--save-every", "20", "--output-dir", str(out), "--no-progress",
            "--report-to", "tensorboard"]  # fmt: skip
    result = T.main(argv)
    h = result.history
    first, last = sum(r["talk_nll"] for r in h[:3]) / 3, sum(r["talk_nll"] for r in h[-3:]) / 3
    assert last < first - 0.5, (first, last)
    for name in ("metrics.csv", "metrics.png", "thoughts.txt", "latest", "checkpoint-20", "tensorboard"):
        assert (out / name).exists(), name
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 5, 10, 15, 20]
    assert "<|startthought|>" in (out / "thoughts.txt").read_text()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_precisions_train(tmp_path, precision):
    """bf16-mixed: fp32 weights under bf16 autocast; bf16: bf16 weights and AdamW state."""
    method, training, run = small(tmp_path, max_steps=2, save_every=2, precision=precision)
    method = dataclasses.replace(method, gradient_checkpointing=True)
    result = T.train(method, training, run)
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in result.history)
    state = read_trainer_state(result.checkpoint)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {s["exp_avg"].dtype for s in state["optimizer"]["state"].values()} == {want}
    saved = params(result.checkpoint / "model")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {want}


def test_cli_gradient_checkpointing_and_overrides():
    args = T.parse_args(
        ["--preset", "tiny-demo", "--gradient-checkpointing", "--lr", "0.01", "--n-rationales", "3"]
    )
    method, training, run = T.configs_from_args(args)
    assert method.gradient_checkpointing and method.n_rationales == 3 and training.learning_rate == 0.01
    assert run.model == "tiny" and run.output_dir == "runs/tiny-demo" and run.data.endswith("arithmetic.txt")
    # a real model's default text is the shipped word problems (the paper trained on math text)
    _, _, run = T.configs_from_args(T.parse_args(["--model", "smollm2"]))
    assert run.data == "word-problems"


def test_console_script_exits_zero(tmp_path, monkeypatch):
    """``qstar-train`` is ``sys.exit(cli())``: it must return 0, not the TrainResult."""
    argv = ["qstar-train", "--preset", "tiny-demo", "--max-steps", "1", "--batch-size", "2",
            "--micro-batch-size", "2", "--seq-len", "16", "--output-dir", str(tmp_path), "--no-progress",
            "--no-plot"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    assert T.cli() == 0 and (tmp_path / "checkpoint-1").is_dir()
