"""Issue 15, items 7, 9 and 10: input is validated at the door (configs, data, the model path,
resume overrides, generation arguments, meta tokens in prompts), the authors' single-file
``pytorch_model.bin`` is recognised, a NaN row never yields a banned id, a batch of 0 is refused.

Every test here fails on the code before these checks (see each docstring) and takes seconds."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch

pytest.importorskip("transformers")

import qstar.train as T  # noqa: E402
from qstar.config import QuietStarConfig, RunConfig, TrainingConfig, get_preset  # noqa: E402
from qstar.data import load_documents  # noqa: E402
from qstar.loading import build_model, load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

INF, NAN = float("inf"), float("nan")


# --------------------------------------------------------------------------------------------------
# Configs: finite, positive numbers; the Python API gets the same checks as the CLI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (TrainingConfig, "learning_rate", INF),
        (TrainingConfig, "learning_rate", NAN),
        (TrainingConfig, "weight_decay", NAN),
        (TrainingConfig, "adam_eps", INF),
        (TrainingConfig, "max_grad_norm", NAN),
        (TrainingConfig, "max_grad_norm", INF),
        (TrainingConfig, "adam_betas", (NAN, 0.9)),
        (TrainingConfig, "seq_len", 1),
        (TrainingConfig, "seed", -1),
        (QuietStarConfig, "policy_loss_weight", NAN),
        (QuietStarConfig, "policy_loss_weight", INF),
        (QuietStarConfig, "base_loss_weight", NAN),
        (QuietStarConfig, "talk_loss_weight", -INF),
        (QuietStarConfig, "thought_temperature", NAN),
        (QuietStarConfig, "eval_thought_temperature", INF),
        (QuietStarConfig, "reinforce_temperature", INF),
        (QuietStarConfig, "meta_embedding_scale", NAN),
        (QuietStarConfig, "gradient_checkpointing", "yes"),
        (QuietStarConfig, "start_token", ""),
    ],
)
def test_config_refuses_non_finite_and_nonsense(cls, field, value):
    """Before: NaN and inf passed ``value < 0`` and were accepted (``--lr inf`` trained to an all
    non-finite checkpoint with exit status 0; ``--policy-loss-weight nan`` skipped every step)."""
    with pytest.raises((ValueError, TypeError), match=field):
        cls(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [("cpu_threads", 0), ("cpu_threads", 1.5), ("model", ""), ("output_dir", ""), ("device", "nonsense")],
)
def test_run_config_refuses(field, value):
    """Before: a fractional thread count, an empty --model or --output-dir and a bad --device were
    accepted and failed late (or never)."""
    run = RunConfig(**{field: value})
    flag = "--" + field.replace("_", "-")
    with pytest.raises((ValueError, TypeError), match=flag):
        run.validate()


def test_cli_cpu_threads_zero_is_refused_not_one():
    """Before: ``--cpu-threads 0`` with tiny-demo silently became 1 thread."""
    args = T.parse_args(["--preset", "tiny-demo", "--cpu-threads", "0"])
    with pytest.raises(ValueError, match="--cpu-threads must be > 0, got 0"):
        T.configs_from_args(args)


@pytest.mark.parametrize(
    "flag, value, field",
    [("--lr", "inf", "learning_rate"), ("--policy-loss-weight", "nan", "policy_loss_weight"),
     ("--max-grad-norm", "nan", "max_grad_norm"), ("--weight-decay", "-1", "weight_decay")],
)  # fmt: skip
def test_cli_flag_errors_name_the_flag(flag, value, field):
    args = T.parse_args(["--preset", "tiny-demo", flag, value])
    with pytest.raises(ValueError, match=f"^{flag}: {field} must be a finite number"):
        T.configs_from_args(args)


# --------------------------------------------------------------------------------------------------
# Data: text fields must be strings; undecodable bytes name the file and the line
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [5, None, ["a"], {"a": 1}, True])
def test_jsonl_text_must_be_a_string(tmp_path, value):
    """Before: ``{"text": 5}`` and ``{"text": null}`` became the documents "5" and "None"."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(
        ValueError, match=r"d\.jsonl' line 2: the 'text' field \(--text-field\) must be a string"
    ):
        load_documents(str(f))


def test_eval_jsonl_text_must_be_a_string(tmp_path):
    from qstar.eval.data import load_texts

    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(ValueError, match=r"--text .*t\.jsonl' line 2: the 'text' field .* got NoneType"):
        load_texts(str(f))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_undecodable_data_names_file_and_line(tmp_path, suffix):
    """Before: a bare ``UnicodeDecodeError`` that named no file."""
    f = tmp_path / f"binary{suffix}"
    f.write_bytes(b'{"text": "a"}\n{"text": "b"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(ValueError, match=rf"--data .*binary\{suffix}' line 3: not UTF-8 text"):
        load_documents(str(f))


# --------------------------------------------------------------------------------------------------
# The model path
# --------------------------------------------------------------------------------------------------


def test_missing_model_is_one_line(tmp_path):
    """Before: an 80-line chained traceback ending in "Repo id must be in the form ..."."""
    missing = str(tmp_path / "nonexistent")
    for call in (lambda: build_model(missing, QuietStarConfig(), seed=0), lambda: load_model(missing)):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"--model {missing!r}") and "no such directory" in msg and "\n" not in msg
    args = T.parse_args(["--model", "/nonexistent/model", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--model '/nonexistent/model': no such directory"):
        T.configs_from_args(args)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Resume: one warning per given flag that the checkpoint overrides
# --------------------------------------------------------------------------------------------------


def test_resume_warns_about_each_overridden_flag(tmp_path, caplog):
    """Before: ``--lr``, ``--batch-size`` and the like were ignored on resume without a word."""
    out = str(tmp_path / "run")
    base = ["--preset", "tiny-demo", "--output-dir", out, "--batch-size", "2", "--micro-batch-size", "2",
            "--seq-len", "16", "--n-thought-tokens", "2", "--no-progress", "--no-plot",
            "--save-every", "1"]  # fmt: skip
    T.main(base + ["--max-steps", "1"])
    caplog.clear()
    argv = base + ["--resume", "latest", "--max-steps", "2", "--lr", "0.5", "--n-thought-tokens", "3",
                   "--model", "some/other-model"]  # fmt: skip
    argv[argv.index("--batch-size") + 1] = "4"
    argv[argv.index("--micro-batch-size") + 1] = "4"
    with caplog.at_level(logging.WARNING, logger="qstar.train"):
        result = T.main(argv)
    assert result.step == 2
    lines = [r.getMessage() for r in caplog.records if "is ignored: resuming from" in r.getMessage()]
    flags = sorted(line.split(" ", 1)[0] for line in lines)
    assert flags == ["--batch-size", "--lr", "--micro-batch-size", "--model", "--n-thought-tokens"], lines
    assert any("--lr 0.5 is ignored" in line and "learning_rate = 0.002" in line for line in lines)


# --------------------------------------------------------------------------------------------------
# Generation: max_new_tokens against the positions, meta tokens in prompts
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_max_new_tokens_beyond_the_positions_is_refused_at_once(tiny):
    """Before: ``max_new_tokens=10**9`` tried to allocate a cache of that many positions."""
    with pytest.raises(ValueError, match=r"max_new_tokens \(1000000000\) .* 1024 positions"):
        tiny.generate("Q: 1+2=", max_new_tokens=10**9)
    out = tiny.generate("Q: 1+2=", max_new_tokens=2, temperature=0)  # within the positions: fine
    assert out.new_tokens.shape == (1, 2)


@pytest.mark.parametrize("text", ["<|startthought|>", "1+1=<|endthought|>2"])
def test_meta_token_text_in_a_prompt_is_refused(tiny, text):
    """Before: the text became the meta token silently (the untrained vocabulary row)."""
    with pytest.raises(ValueError, match="prompt 1 contains a meta token"):
        tiny.generate(["fine", text], max_new_tokens=1)
    ids = torch.tensor([[5, 6, tiny.start_id, 7]])
    with pytest.raises(ValueError, match="prompt 0 contains a meta token"):
        tiny.generate(ids, max_new_tokens=1)


# --------------------------------------------------------------------------------------------------
# Item 9: the authors' checkpoint as one pytorch_model.bin
# --------------------------------------------------------------------------------------------------


def authors_dir(tmp_path, model, save):
    d = tmp_path / "authors"
    d.mkdir()
    model.base_model.config.save_pretrained(d)
    model.tokenizer.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_ahead"] = model.config.n_thought_tokens + 3
    (d / "config.json").write_text(json.dumps(cfg))
    state = {k: v.detach().clone().contiguous() for k, v in model.base_model.state_dict().items()}
    state["start_embedding"] = model.start_embedding.detach().clone()
    state["end_embedding"] = model.end_embedding.detach().clone()
    state.update({f"talk_head.0.{k}": v.clone() for k, v in model.mixing_head.state_dict().items()})
    save(state, d)
    return d


def test_authors_single_bin_keeps_its_heads(tmp_path):
    """Before: eval and generate loaded it as a plain model with a zero mixing head."""
    from qstar.eval import evaluate_direct, gsm8k_direct_prompt

    model = build_model("tiny", QuietStarConfig(n_thought_tokens=2, eval_thought_temperature=0.0), seed=0)
    with torch.no_grad():
        last = model.mixing_head[-1].weight
        last.copy_(torch.randn(last.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    model.eval()
    d = authors_dir(tmp_path, model, lambda state, d: torch.save(state, d / "pytorch_model.bin"))
    loaded = load_model(str(d))
    for k, v in model.heads_state_dict().items():
        torch.testing.assert_close(loaded.heads_state_dict()[k], v, msg=k)
    prompts = [gsm8k_direct_prompt("2+2?", "#### 4")]
    want, got = evaluate_direct(model, prompts), evaluate_direct(loaded, prompts)
    assert want.with_thoughts != want.without_thoughts
    assert got.with_thoughts == pytest.approx(want.with_thoughts, rel=1e-6)


def test_a_pickle_posing_as_pytorch_model_bin_is_refused(tmp_path):
    """Only tensors are read from a .bin (``weights_only=True``): a pickle that would run code is
    refused with an error naming the file, and nothing runs."""
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"start_embedding": Evil()}, d / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a plain tensor file"):
        load_model(str(d))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Item 10: the API
# --------------------------------------------------------------------------------------------------


def _backends():
    import qstar_kernels

    return [
        b for b in ("reference", "torch", "cpu", "triton") if b in qstar_kernels.available_backends("cpu")
    ]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("banned", [[0, 1], [0, 1, 2, 4], [3, 9], None])
def test_a_nan_row_never_yields_a_banned_id(backend, temperature, banned):
    """Before: a NaN row came back as id 0 on the fused backends (cpu, torch, triton), banned or not.
    Now every backend gives such a row the smallest allowed id and a NaN log-probability."""
    from qstar_kernels import sample_thought_tokens

    h = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    w = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    h[1] = NAN  # every logit NaN
    h[2, 0] = NAN  # also every logit NaN (each is a dot with h[2])
    h[3] = 1e38  # overflow: +-inf logits, the row's log-sum-exp is not finite
    gen = torch.Generator().manual_seed(0)
    tokens, logp = sample_thought_tokens(h, w, banned_ids=banned, temperature=temperature, backend=backend,
                                         generator=gen)  # fmt: skip
    first_allowed = min(set(range(10)) - set(banned or []))
    assert not set(tokens.tolist()) & set(banned or [])
    for row in (1, 2, 3):
        assert tokens[row] == first_allowed and math.isnan(logp[row]), (row, tokens, logp)
    assert torch.isfinite(logp[[0, 4]]).all()


def test_batch_of_zero_is_refused():
    """Before: it failed deep inside a reshape."""
    from tiny_models import tiny_quietstar

    model = tiny_quietstar(QuietStarConfig(n_thought_tokens=2, n_talk_tokens=2))
    with pytest.raises(ValueError, match=r"at least one sequence \(B >= 1\), got shape \(0, 8\)"):
        model(torch.zeros(0, 8, dtype=torch.long))


def test_presets_still_validate():
    for name in ("paper", "default", "tiny-demo"):
        p = get_preset(name)
        p.method.validate(), p.training.validate()
        dataclasses.replace(p.training, max_grad_norm=0.0)  # 0 still switches clipping off
