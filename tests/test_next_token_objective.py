"""The fine-tune without thoughts: ``forward(..., think=False)`` and :class:`NextTokenObjective`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from qstar.config import RunConfig, get_preset
from qstar.loading import build_model
from qstar.objective import NextTokenObjective
from qstar.train import OBJECTIVES, configs_from_args, main, parse_args, train


def tiny_model(dtype=torch.float64):
    method = dataclasses.replace(get_preset("tiny-demo").method, n_thought_tokens=2, n_talk_tokens=2)
    return build_model("tiny", method, seed=0).to(dtype)


def hf_nll(model, ids, mask, labels):
    """The reference twin: the HF model's full logits and F.cross_entropy over the shifted labels."""
    logits = model.base_model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, L-1, V)
    target = labels[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def test_think_false_is_the_base_models_nll_forward_and_backward():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.vocab_size - 2, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a "question" that is not trained on
    out = model(ids, attention_mask=mask, labels=labels, think=False)
    assert out.thought_tokens is None and out.talk_nll is None and out.mixing_weights is None
    assert out.base_logprobs.shape == (3, 11)
    params = [p for p in model.base_model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params)
    ref = hf_nll(model, ids, mask, labels)
    want = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # the masked question's positions carry no log-prob
    assert (out.base_logprobs[:, :3] == 0).all() and (out.base_logprobs[0, 3:-1] != 0).all()


def test_think_false_refuses_injected_thoughts():
    model = tiny_model()
    ids = torch.randint(3, 50, (1, 6))
    with pytest.raises(ValueError, match="give neither with think=False"):
        model(ids, thought_tokens=torch.zeros(2, 2, 6, dtype=torch.long), think=False)
    with pytest.raises(ValueError, match="give neither with think=False"):
        model(ids, output_logits=True, think=False)


def test_objective_counts_only_labelled_tokens_and_leaves_the_thought_parts_alone():
    model = tiny_model(torch.float32)
    ids = torch.randint(3, 50, (2, 9))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    result = NextTokenObjective()(model, batch, torch.Generator())
    assert result.n_tokens == 2 * 9 and result.stats.shape == (1,)  # the tokens read
    result.loss.backward()
    assert model.mixing_head[0].weight.grad is None
    assert model.base_model.get_input_embeddings().weight.grad is not None


def test_the_trainer_runs_it_and_resume_refuses_another_objective(tmp_path):
    preset = get_preset("tiny-demo")
    training = dataclasses.replace(
        preset.training, batch_size=2, micro_batch_size=2, seq_len=16, max_steps=3, log_every=1,
        save_every=1, warmup_steps=1, learning_rate=1e-2,
    )  # fmt: skip
    run = RunConfig(model="tiny", output_dir=str(tmp_path), progress=False, plot=False)
    result = train(preset.method, training, run, NextTokenObjective())
    losses = [r["loss"] for r in result.history]
    assert result.step == 3 and losses[-1] < losses[0]
    again = dataclasses.replace(run, resume="latest")
    with pytest.raises(ValueError, match="trained with the objective 'next-token NLL"):
        train(preset.method, dataclasses.replace(training, max_steps=4), again)


def test_the_cli_flag():
    args = parse_args(["--preset", "tiny-demo", "--objective", "next-token"])
    assert isinstance(OBJECTIVES[args.objective](), NextTokenObjective)
    configs_from_args(args)
    with pytest.raises(SystemExit):
        parse_args(["--objective", "dpo"])


def test_the_cli_trains_without_thoughts(tmp_path, capsys):
    result = main([
        "--preset", "tiny-demo", "--objective", "next-token", "--max-steps", "2", "--seq-len", "16",
        "--batch-size", "2", "--micro-batch-size", "2", "--output-dir", str(tmp_path), "--no-progress",
        "--no-plot",
    ])  # fmt: skip
    assert result.step == 2 and not (tmp_path / "thoughts.txt").exists()
