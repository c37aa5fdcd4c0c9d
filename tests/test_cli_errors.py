"""Issue 15, item 8: every error of ``qstar-train``, ``qstar-eval`` and ``qstar-generate`` is one
line on stderr (``prog: error: ...``), exit status 2 for refused input and 1 for anything else, no
traceback unless ``QSTAR_DEBUG=1`` (``qstar/cli.py``). Also the checks that run before the work
starts: output paths, the prompt file, ``--max-new-tokens`` against the model's positions.

Before this change each of these errors was an uncaught traceback (exit status 1), or, for the
output paths, came only after the work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import qstar.eval.command as E  # noqa: E402
import qstar.generate_cli as G  # noqa: E402
import qstar.train as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")


def run(cli, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = cli(argv)
    return status, capsys.readouterr().err


def one_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: the error must come before the work."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(E, "load_model", refuse)
    monkeypatch.setattr(G, "load_model", refuse)
    monkeypatch.setattr(T, "build_model", refuse)


# --------------------------------------------------------------------------------------------------
# qstar-train
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--lr", "inf"], "--lr: learning_rate must be a finite number > 0, got inf"),
        (["--policy-loss-weight", "nan"], "--policy-loss-weight: policy_loss_weight must be a finite"),
        (["--max-grad-norm", "nan"], "--max-grad-norm: max_grad_norm must be a finite"),
        (["--cpu-threads", "0"], "--cpu-threads must be > 0, got 0"),
        (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such directory"),
        (["--seq-len", "3"], "--seq-len (3) must be at least --n-talk-tokens + 2"),
        (["--data", "missing.jsonl"], "--data 'missing.jsonl': no such file"),
        (["--resume", "latest"], "--resume 'latest': expected a checkpoint directory"),
    ],
)
def test_train_errors_are_one_line(tmp_path, capsys, argv, expect):
    argv = ["--preset", "tiny-demo", "--output-dir", str(tmp_path / "out"), "--no-progress"] + argv
    status, err = run(T.cli, argv, capsys)
    assert status == 2
    assert expect in one_line(err, "qstar-train")


def test_train_seq_len_beyond_the_models_positions_is_named(tmp_path, capsys):
    argv = ["--preset", "tiny-demo", "--output-dir", str(tmp_path / "o"), "--seq-len", "100000000"]
    status, err = run(T.cli, argv, capsys)
    assert status == 2
    assert "--seq-len 100000000: with 4 thought and 2 talk tokens the rollout needs" in one_line(
        err, "qstar-train"
    )
    assert "the model has 1024 (max_position_embeddings)" in err


def test_train_output_dir_that_is_a_file_is_named(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("not a directory")
    status, err = run(T.cli, ["--preset", "tiny-demo", "--output-dir", str(a_file)], capsys)
    assert status == 2
    assert f"--output-dir {str(a_file)!r}: expected a directory, but it is a file" in one_line(
        err, "qstar-train"
    )


def test_unexpected_errors_are_one_line_with_their_type(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(T, "train", boom)
    argv = ["--preset", "tiny-demo", "--output-dir", str(tmp_path)]
    status, err = run(T.cli, argv, capsys)
    assert status == 1
    assert one_line(err, "qstar-train") == (
        "qstar-train: error: RuntimeError: boom second line (QSTAR_DEBUG=1 shows the traceback)"
    )
    # QSTAR_DEBUG=1: the traceback too, then the same line
    monkeypatch.setenv("QSTAR_DEBUG", "1")
    status, err = run(T.cli, argv, capsys)
    assert status == 1 and "Traceback (most recent call last)" in err and 'raise RuntimeError("boom' in err
    assert err.strip().splitlines()[-1].startswith("qstar-train: error: RuntimeError: boom")
    monkeypatch.setenv("QSTAR_DEBUG", "0")
    status, err = run(T.cli, ["--lr", "inf", "--preset", "tiny-demo"], capsys)
    assert status == 2 and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# qstar-eval
# --------------------------------------------------------------------------------------------------


def test_eval_errors_are_one_line_and_come_before_the_model(tmp_path, capsys, no_model):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    gsm = ["--gsm8k", str(FIXTURES / "gsm8k_test.jsonl"), "--tasks", "gsm8k"]
    cases = [
        (["--tasks", "nope"], "--tasks: unknown task(s) ['nope']"),
        (gsm + ["--output-dir", str(a_file)], f"--output-dir {str(a_file)!r}: expected a directory"),
        (gsm + ["--output-dir", str(a_file / "sub")], "cannot create it"),
        (gsm + ["--thought-temperature", "nan"], "--thought-temperature must be a finite number >= 0"),
        (gsm + ["--cpu-threads", "0"], "--cpu-threads must be >= 1, got 0"),
        (gsm + ["--device", "nonsense"], "--device 'nonsense': not a device"),
        (["--batch-size", "x"], "argument --batch-size: invalid int value"),
    ]
    for argv, expect in cases:
        status, err = run(E.cli, ["--model", "tiny", "--output-dir", str(tmp_path / "ev")] + argv, capsys)
        assert status == 2, (argv, err)
        assert expect in one_line(err, "qstar-eval"), argv


def test_eval_missing_model_is_one_line(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "nonexistent"), "--gsm8k", str(FIXTURES / "gsm8k_test.jsonl"),
            "--tasks", "gsm8k", "--output-dir", str(tmp_path / "ev")]  # fmt: skip
    status, err = run(E.cli, argv, capsys)
    assert status == 2 and "no such directory" in one_line(err, "qstar-eval")


# --------------------------------------------------------------------------------------------------
# qstar-generate
# --------------------------------------------------------------------------------------------------


def test_generate_errors_before_the_model_are_one_line(tmp_path, capsys, no_model):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"Q: 1+1=\n\xff\xfe\n")
    cases = [
        ([], "give --prompt TEXT (repeatable) or --prompt-file FILE"),
        (["--prompt", "x", "--json", str(tmp_path / "missing" / "out.json")], "does not exist"),
        (["--prompt", "x", "--json", str(tmp_path)], "expected a file name, but it is a directory"),
        (["--prompt-file", str(tmp_path / "none.txt")], "--prompt-file"),
        (["--prompt-file", str(binary)], f"--prompt-file {str(binary)!r} line 2: not UTF-8 text"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--prompt", "x", "--device", "nonsense"], "--device 'nonsense': not a device"),
        (["--prompt", "x", "--top-p", "abc"], "argument --top-p: invalid float value"),
    ]
    for argv, expect in cases:
        status, err = run(G.cli, ["--model", "tiny"] + argv, capsys)
        assert status == 2, (argv, err)
        assert expect in one_line(err, "qstar-generate"), argv


def test_generate_errors_after_the_model_are_one_line(tmp_path, capsys):
    out = tmp_path / "out.json"
    cases = [
        (["--max-new-tokens", "1000000000"], "--max-new-tokens 1000000000: the model has 1024 positions"),
        (["--max-new-tokens", "1020"], "max_new_tokens (1020) + prompt"),
        (["--prompt", "<|startthought|>"], "prompt 1 contains a meta token"),
        (["--top-p", "nan"], "top_p must be a finite number"),
    ]
    for argv, expect in cases:
        status, err = run(
            G.cli, ["--model", "tiny", "--prompt", "Q: 1+1=", "--json", str(out)] + argv, capsys
        )
        assert status == 2, (argv, err)
        assert expect in one_line(err, "qstar-generate"), argv
        assert not out.exists()
    status, err = run(G.cli, ["--model", str(tmp_path / "nonexistent"), "--prompt", "x"], capsys)
    assert status == 2 and "no such directory" in one_line(err, "qstar-generate")


# --------------------------------------------------------------------------------------------------
# The console scripts, as a user runs them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, argv, prog",
    [
        ("qstar.train", ["--preset", "tiny-demo", "--lr", "inf"], "qstar-train"),
        ("qstar.eval", ["--model", "/nonexistent/x", "--tasks", "nope"], "qstar-eval"),
        ("qstar.generate_cli", ["--model", "/nonexistent/x", "--prompt", "hi"], "qstar-generate"),
    ],
)
def test_console_scripts_exit_2_with_one_line(tmp_path, module, argv, prog):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("QSTAR_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"{prog}: error: "), proc.stderr
    assert len([line for line in lines if "error" in line.lower()]) == 1, proc.stderr
