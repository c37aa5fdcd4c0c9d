"""qstar.objective: the loop trains any objective. A toy objective (plain next-token cross-entropy of
the base model, no thoughts) trains, checkpoints, resumes exactly and meets the NaN guard through
the same ``qstar.train.train`` as Quiet-STaR; the Quiet-STaR objective's own pieces."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from qstar.config import RunConfig, get_preset  # noqa: E402
from qstar.metrics import read_metrics  # noqa: E402
from qstar.model import QuietStarForCausalLM  # noqa: E402
from qstar.objective import (  # noqa: E402
    STAT_NAMES,
    Objective,
    ObjectiveOutput,
    QuietStarObjective,
    non_finite,
    sample_thoughts,
)
from qstar.train import NonFiniteLossError, train  # noqa: E402


class NextTokenCrossEntropy(Objective):
    """The base model's next-token cross-entropy over the real tokens; ``poison`` makes the loss of
    the given (1-based) calls NaN."""

    name = "next-token CE"
    stat_names = ("loss", "accuracy")
    guarded = ("loss",)
    panels = (("cross-entropy", ("loss",)), ("accuracy", ("accuracy",)))
    samples_file = "samples.txt"

    def __init__(self, poison=()):
        self.poison, self.calls = set(poison), 0

    def __call__(self, model, batch, generator):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model.base_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (b, L-1, V)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (b, L-1)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        self.calls += 1
        if self.calls in self.poison:
            loss = loss * float("nan")
        real = target != -100
        accuracy = (logits.argmax(-1)[real] == target[real]).double().mean()
        stats = torch.stack([loss.detach().double(), accuracy]).cpu()
        return ObjectiveOutput(loss, stats, int(mask.sum()), logits.detach())

    def samples(self, out, batch, tokenizer, n):
        return [repr(tokenizer.decode(out.output[0, :12].argmax(-1).tolist()))][:n]


def small(tmp_path, **training):
    preset = get_preset("tiny-demo")
    kw = dict(batch_size=4, micro_batch_size=2, seq_len=24, max_steps=4, log_every=1, save_every=2,
              warmup_steps=2, log_sample_thoughts=1)  # fmt: skip
    kw.update(training)
    run = RunConfig(model="tiny", output_dir=str(tmp_path), progress=False, plot=False)
    return preset.method, dataclasses.replace(preset.training, **kw), run


def weights(model_dir) -> dict:
    return dict(QuietStarForCausalLM.from_pretrained(str(model_dir)).state_dict())


def test_a_toy_objective_trains_checkpoints_and_resumes_exactly(tmp_path):
    method, training, run = small(tmp_path / "straight")
    straight = train(method, training, dataclasses.replace(run, plot=True), NextTokenCrossEntropy())
    assert straight.step == 4 and straight.skipped == 0
    assert straight.history[-1]["loss"] < straight.history[0]["loss"]

    method, training, run = small(tmp_path / "split", max_steps=2)
    first = train(method, training, run, NextTokenCrossEntropy())
    run = dataclasses.replace(run, resume="latest")
    second = train(method, dataclasses.replace(training, max_steps=4), run, NextTokenCrossEntropy())
    assert [r["step"] for r in second.history] == [3, 4]
    for a, b in zip(straight.history, first.history + second.history):
        for key in ("loss", "accuracy", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)
    w1, w2 = weights(straight.checkpoint / "model"), weights(second.checkpoint / "model")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    # The objective's columns, samples and plot; the Quiet-STaR heads got no gradient, so stayed put.
    out = tmp_path / "straight"
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {"loss", "accuracy", "grad_norm"} <= rows[0].keys()
    assert "talk_nll" not in rows[0]
    assert (out / "samples.txt").read_text().count("step ") == 4 and not (out / "thoughts.txt").exists()
    assert (out / "metrics.png").is_file()
    w0 = weights(tmp_path / "split" / "checkpoint-2" / "model")
    assert torch.equal(w0["mixing_head.0.weight"], w1["mixing_head.0.weight"])
    assert not torch.equal(
        w0["base_model.model.embed_tokens.weight"], w1["base_model.model.embed_tokens.weight"]
    )


def test_the_nan_guard_covers_any_objective(tmp_path):
    method, training, run = small(tmp_path, max_steps=3, save_every=1)
    result = train(method, training, run, NextTokenCrossEntropy(poison={3}))  # step 2's first micro-batch
    assert [r["skipped"] for r in result.history] == [0, 1, 0]
    w1, w2 = (weights(tmp_path / f"checkpoint-{s}" / "model") for s in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "a skipped step changed the parameters"
    method, training, run = small(tmp_path / "all", max_steps=4, max_consecutive_skips=2)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps \(up to step 2\)"):
        train(method, training, run, NextTokenCrossEntropy(poison=range(1, 100)))


def test_non_finite_names_the_guarded_statistics():
    stats = torch.tensor([1.0, math.nan, math.inf, 2.0], dtype=torch.float64)
    assert non_finite(("a", "b", "c", "d"), stats, ("a", "b", "c")) == ["b", "c"]
    assert non_finite(("a", "b", "c", "d"), stats, ("a", "d")) == []


def test_quietstar_objective_logs_the_model_output(tmp_path):
    from qstar.loading import build_model
    from qstar.tiny import tiny_tokenizer

    method = dataclasses.replace(get_preset("tiny-demo").method, n_thought_tokens=2, n_talk_tokens=2)
    model = build_model("tiny", method, seed=0).train()
    tok = tiny_tokenizer()
    enc = tok(["12+7=19\n38+47=85", "5+5=10"], padding="max_length", max_length=20, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    out = QuietStarObjective()(model, batch, torch.Generator().manual_seed(0))
    assert out.stats.dtype == torch.float64 and out.stats.shape == (len(STAT_NAMES),)
    assert out.stats[0].item() == pytest.approx(out.loss.item()) and out.n_tokens == int(
        batch["attention_mask"].sum()
    )
    lines = sample_thoughts(out.output, batch["input_ids"], batch["attention_mask"], tok, 3)
    assert len(lines) == 3 and all("<|startthought|>" in line for line in lines)
    assert sample_thoughts(out.output, batch["input_ids"], batch["attention_mask"], tok, 0) == []
