"""STaR (``qstar.star``) on the tiny model: answers, prompts and the hint, rows and loss masking, the
step schedule, the sampler, the loop (kept / rationalized / dropped, restart from base, resume) and
bad inputs.

The loop tests replace the sampler by a script (:func:`scripted`) that answers from the question
alone: a random tiny model never writes a correct rationale, and the loop's bookkeeping is what is
tested there. The real sampler is tested on its own on the tiny model (:func:`test_the_sampler_...`).
The fine-tunes are real (the trainer, on the tiny model, a few steps).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qstar.star.loop as loop
from qstar.config import get_preset
from qstar.loading import build_model
from qstar.star import (
    Problem,
    StarConfig,
    StarObjective,
    Task,
    build_rows,
    extract_letter,
    extract_number,
    make_task,
    run_star,
    steps_for_iteration,
)
from qstar.star.command import cli
from qstar.star.sampling import Completion, batch_seed, majority, sample_batches
from qstar.star.tasks import HINT, WordProblemTask, csqa_task, gsm8k_task

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# --------------------------------------------------------------------------------------------------
# Answers and prompts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        (" 3 + 4 = 7.\nThe answer is 7.", "7"),
        ("The answer is 1,234.", "1234"),
        ("so 5 - 2 = 3\nThe answer is $12", "12"),
        ("The answer is 42 apples. Then 7 more", "42"),
        ("She has 9 left", "9"),
        ("#### -3", "-3"),
        ("The answer is 4.5", None),
        ("no number here", None),
        ("The answer is 12.0.", "12"),
    ],
)
def test_number_extraction(text, want):
    assert extract_number(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("Milk must be cold.\nThe answer is (C).", "C"),
        ("The answer is b", None),  # a lower-case letter alone is a word
        ("The answer is (b).", "B"),
        ("The answer is E.", "E"),
        ("I think (A) fits, the answer is D", "D"),
        ("I pick (B) over (A)", "A"),
        ("no letter", None),
        ("The answer is (F).", None),  # not a label
    ],
)
def test_letter_extraction(text, want):
    assert extract_letter(text) == want


def toy_task(n_train=6, n_heldout=3) -> Task:
    """Questions 'What is a plus b?' with a + b as the gold answer, and one exemplar."""
    mk = lambda i: Problem(f"p{i}", f"What is {i} plus 2?", str(i + 2))  # noqa: E731
    shot = Problem("shot", "What is 1 plus 1?", "2", "1 + 1 = 2.")
    return Task(
        "toy", "number", [mk(i) for i in range(n_train)], [mk(100 + i) for i in range(n_heldout)], [shot]
    )


def test_prompts_and_the_hint():
    task = toy_task()
    p = task.train[3]
    plain = task.prompt(p, few_shot=True)
    hinted = task.prompt(p, few_shot=True, hint=True)
    assert plain == "Q: What is 1 plus 1?\nA: 1 + 1 = 2.\nThe answer is 2.\n\nQ: What is 3 plus 2?\nA:"
    assert hinted.count(HINT.format(gold="5")) == 1 and HINT.format(gold="2") in hinted
    assert "Hint" not in plain and "Hint" not in task.prompt(p, few_shot=False)
    assert task.prompt(p, few_shot=False) == "Q: What is 3 plus 2?\nA:"
    assert task.is_correct(" 3 + 2 = 5.\nThe answer is 5.", "5")


def test_the_shipped_word_problems_and_the_jsonl_tasks(tmp_path):
    task = WordProblemTask(ops=(1,), n_train=10, n_heldout=5, n_exemplars=2)
    assert len(task.train) == 10 and len(task.heldout) == 5 and len(task.exemplars) == 2
    assert {p.id for p in task.exemplars}.isdisjoint(p.id for p in task.train)
    assert all(p.gold.lstrip("-").isdigit() and p.rationale for p in task.train)
    ages = WordProblemTask(ops=(1,), templates=("age_future",), n_exemplars=1)
    assert all(" + " in p.rationale and "years" in p.question for p in ages.train + ages.heldout)
    with pytest.raises(ValueError, match="--templates: unknown"):
        WordProblemTask(templates=("nope",))
    gsm = gsm8k_task(str(FIXTURES / "gsm8k_test.jsonl"), str(FIXTURES / "gsm8k_test.jsonl"), n_exemplars=1)
    assert gsm.kind == "number" and "<<" not in gsm.exemplars[0].rationale
    csqa = csqa_task(str(FIXTURES / "csqa_validation.jsonl"), str(FIXTURES / "csqa_validation.jsonl"))
    assert csqa.kind == "letter" and "Answer choices:\n(A)" in csqa.train[0].question
    assert csqa.prompt(csqa.train[0], few_shot=True).count("Q: ") == 4


# --------------------------------------------------------------------------------------------------
# Rows, loss masking, the step schedule
# --------------------------------------------------------------------------------------------------


def tiny(dtype=torch.float32):
    return build_model("tiny", get_preset("tiny-demo").method, seed=0).to(dtype)


def test_rows_label_only_the_completion():
    tok = tiny().tokenizer
    examples = [("Q: What is 3 plus 2?\nA:", " 3 + 2 = 5.\nThe answer is 5."), ("Q: 1?\nA:", " 1.")]
    rows, dropped = build_rows(examples, tok, seq_len=64)
    assert dropped == 0 and set(rows) == {"input_ids", "attention_mask", "labels"}
    for i, (prompt, completion) in enumerate(examples):
        n_prompt = len(tok.encode(prompt))
        real = int(rows["attention_mask"][i].sum())
        labels = rows["labels"][i]
        assert (labels[:n_prompt] == -100).all() and (labels[real:] == -100).all()
        assert tok.decode(labels[n_prompt:real]) == completion + "\n\n"
        assert (
            tok.decode(rows["input_ids"][i, :real], skip_special_tokens=True) == prompt + completion + "\n\n"
        )
    # too long: the prompt loses its start; a completion that alone does not fit is dropped
    rows, dropped = build_rows(examples + [("Q:", " " + "x" * 80)], tok, seq_len=40)
    assert dropped == 1 and rows["input_ids"].shape == (2, 40)
    assert tok.decode(rows["input_ids"][0]).endswith(examples[0][1] + "\n\n")  # the start went
    assert int((rows["labels"][0] != -100).sum()) == len(examples[0][1]) + 2
    with pytest.raises(ValueError, match="no training examples"):
        build_rows([], tok, 16)


def test_the_loss_counts_only_rationale_and_answer_tokens():
    model = tiny(torch.float64)
    examples = [("Q: What is 3 plus 2?\nA:", " 3 + 2 = 5.\nThe answer is 5."), ("Q: 7?\nA:", " 7.")]
    objective = StarObjective(examples)
    training = dataclasses.replace(get_preset("tiny-demo").training, batch_size=2, micro_batch_size=2)
    rows = objective.dataset(None, training, model.tokenizer)
    out = objective(model, rows, torch.Generator())
    logits = model.base_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    target = rows["labels"][:, 1:]
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    assert out.n_tokens == int(rows["attention_mask"].sum())  # tokens read (tokens/s), as Quiet-STaR counts
    # the prompt's tokens change nothing but the context: a different prompt token, same label set
    assert int((target != -100).sum()) == sum(  # exactly the completions' tokens are trained on
        len(model.tokenizer.encode(c + "\n\n", add_special_tokens=False)) for _, c in examples
    )


def test_fewer_examples_than_a_batch_are_repeated_to_fill_one():
    tok = tiny().tokenizer
    training = get_preset("tiny-demo").training  # batch_size 8
    rows = StarObjective([("Q: 1?\nA:", " 1."), ("Q: 22?\nA:", " 22.")]).dataset(None, training, tok)
    assert rows["input_ids"].shape[0] == 8
    assert torch.equal(rows["labels"][:2], rows["labels"][6:])


def test_the_step_schedule_grows():
    assert [steps_for_iteration(n, 40, 0.2) for n in (1, 2, 3, 4)] == [40, 48, 58, 70]
    assert [steps_for_iteration(n, 5, 0.0) for n in (1, 2, 3)] == [5, 5, 5]
    with pytest.raises(ValueError, match="--steps"):
        steps_for_iteration(1, 0, 0.2)
    with pytest.raises(ValueError, match="--step-growth"):
        steps_for_iteration(1, 5, -0.1)


# --------------------------------------------------------------------------------------------------
# The sampler (real, on the tiny model)
# --------------------------------------------------------------------------------------------------


def test_the_sampler_is_batched_seeded_per_batch_and_resumable():
    model = tiny().eval()
    prompts = ["Q: What is 3 plus 2?\nA:", "Q: 1?\nA:", "Q: What is 10 plus 20?\nA:"]
    kw = dict(
        k=2, temperature=1.0, top_p=0.9, max_new_tokens=12, batch_size=4, seed=3, label="t", progress=False
    )
    full = list(sample_batches(model, prompts, **kw))
    assert [b for b, _, _ in full] == [0, 1]
    assert full[0][1] == [0, 0, 1, 1] and full[1][1] == [2, 2]
    again = list(sample_batches(model, prompts, skip={0}, **kw))
    assert [b for b, _, _ in again] == [1]
    assert [c.text for c in again[0][2]] == [c.text for c in full[1][2]]  # batch 1 alone, same draws
    for _, _, comps in full:
        for c in comps:
            assert c.finish_reason in ("stop", "eos", "length") and "\n\n" not in c.text
    greedy = list(sample_batches(model, prompts, **{**kw, "k": 1, "temperature": 0.0}))
    assert len(greedy[0][2]) == 3
    assert batch_seed(0, "a", 1) != batch_seed(0, "a", 2) and batch_seed(0, "a", 1) == batch_seed(0, "a", 1)


def test_majority():
    assert majority(["3", None, "4", "4", "3"]) == "3"  # a tie goes to the first seen
    assert majority(["5", None, None]) == "5" and majority([None, None]) is None


# --------------------------------------------------------------------------------------------------
# The loop, with a scripted sampler
# --------------------------------------------------------------------------------------------------


def default_script(question: str, hinted: bool, j: int, label: str) -> str:
    """Even problems: solved (both samples the same text: a duplicate). Odd ones: wrong unhinted;
    with the hint, 1 is rationalized, 3 leaks the hint, 5 stays wrong. Held-out: right for p100."""
    a = int(question.split("What is ")[1].split(" plus")[0])
    right = f" {a} + 2 = {a + 2}.\nThe answer is {a + 2}."
    if "heldout" in label:
        return right if a == 100 else " The answer is 0."
    if not hinted:
        return right if a % 2 == 0 else " The answer is 0."
    return {1: right, 3: f" The hint says {a + 2}.\nThe answer is {a + 2}."}.get(a, " The answer is 1.")


def scripted(script=default_script, crash_after: tuple[str, int] | None = None):
    """A stand-in for :func:`sample_batches`: same batching, completions from ``script``; raises
    after yielding batch ``crash_after[1]`` of the phase ``crash_after[0]``."""

    def sample(
        model,
        prompts,
        *,
        k,
        temperature,
        top_p,
        max_new_tokens,
        batch_size,
        seed,
        label,
        skip=frozenset(),
        progress=True,
    ):
        rows = [p for p in range(len(prompts)) for _ in range(k)]
        for b, start in enumerate(range(0, len(rows), batch_size)):
            if b in skip:
                continue
            chunk = rows[start : start + batch_size]
            comps = []
            for i, p in enumerate(chunk):
                last = prompts[p].rsplit("Q: ", 1)[1]
                hinted = "(Hint:" in last
                comps.append(
                    Completion(script(last.split("\nA:")[0], hinted, (start + i) % k, label), "stop")
                )
            yield b, chunk, comps
            if crash_after is not None and label.endswith(crash_after[0]) and b == crash_after[1]:
                raise RuntimeError("simulated crash")

    return sample


def config(tmp_path, **kw) -> StarConfig:
    base = dict(
        model="tiny",
        output_dir=str(tmp_path / "run"),
        iterations=1,
        samples=2,
        batch_size=3,
        majority_samples=2,
        steps=2,
        step_growth=0.5,
        train_batch_size=2,
        micro_batch_size=2,
        seq_len=64,
        learning_rate=1e-3,
        progress=False,
        plot=True,
    )
    base.update(kw)
    return StarConfig(**base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_iteration_keeps_rationalizes_drops_and_never_trains_on_the_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "sample_batches", scripted())
    result = run_star(config(tmp_path), toy_task())
    out = result.output_dir
    assert [r["iteration"] for r in result.rows] == [0, 1]
    row = result.rows[1]
    assert row["solved_by_rationale"] == 3 and row["kept_rationales"] == 3 and row["duplicates"] == 3
    assert row["solved_by_rationalization"] == 1 and row["hint_leaks"] == 1 and row["unsolved"] == 2
    assert row["dataset_size"] == 4 and row["train_accuracy"] == 0.5
    assert row["train_accuracy_with_rationalization"] == pytest.approx(4 / 6)
    assert row["steps"] == 2 and row["heldout_greedy"] == pytest.approx(1 / 3)
    assert row["heldout_majority"] == pytest.approx(1 / 3)
    # every sample is saved, kept or not, with its question, iteration and correctness
    samples = read_jsonl(out / "iteration-1" / "samples.jsonl")
    phases = [r["phase"] for r in samples]
    assert phases.count("rationale") == 12 and phases.count("rationalization") == 3
    assert phases.count("heldout-greedy") == 3 and phases.count("heldout-vote") == 6
    assert all({"question", "iteration", "correct", "kept", "text"} <= set(r) for r in samples)
    assert {r["problem_id"] for r in samples if r["hint"]} == {"p1", "p3", "p5"}
    # the hint never reaches a training example: not in the kept examples, not in the trained rows
    examples = read_jsonl(out / "iteration-1" / "examples.jsonl")
    assert sorted(e["problem_id"] for e in examples) == ["p0", "p1", "p2", "p4"]
    tok = tiny().tokenizer
    rows, _ = build_rows([(e["prompt"], e["completion"]) for e in examples], tok, 64)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in rows["input_ids"]]
    assert not any("hint" in t.lower() for t in texts)
    assert "Q: What is 1 plus 2?\nA: 1 + 2 = 3.\nThe answer is 3.\n\n" in texts  # the rationalized one, plain
    # the report, the plot and the iteration's checkpoint
    assert (out / "report.csv").read_text().startswith("iteration,train_problems,")
    assert len(json.loads((out / "report.json").read_text())["iterations"]) == 2
    assert (out / "accuracy.png").stat().st_size > 1000
    assert (out / "iteration-1" / "train" / "latest").is_file()


def run_config(out: Path, n: int) -> dict:
    train = out / f"iteration-{n}" / "train"
    return json.loads((train / (train / "latest").read_text().strip() / "run_config.json").read_text())


def test_each_iteration_restarts_from_the_base_model_or_continues(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "sample_batches", scripted())
    result = run_star(config(tmp_path, iterations=2, majority_samples=0, rationalization=False), toy_task())
    out = result.output_dir
    assert [r["steps"] for r in result.rows[1:]] == [2, 3]  # grows
    assert run_config(out, 1)["model"] == "tiny" and run_config(out, 2)["model"] == "tiny"
    assert result.rows[2]["solved_by_rationalization"] == 0 and result.rows[1]["heldout_majority"] is None
    cont = run_star(
        config(tmp_path, output_dir=str(tmp_path / "c"), iterations=2, majority_samples=0, restart=False),
        toy_task(),
    )
    prev = run_config(cont.output_dir, 2)["model"]
    assert Path(prev).parent.parent == cont.output_dir / "iteration-1" / "train"


def test_resume_after_a_crash_gives_the_uninterrupted_run(tmp_path, monkeypatch):
    cfg = config(tmp_path, majority_samples=0)
    monkeypatch.setattr(loop, "sample_batches", scripted(crash_after=("rationale", 1)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_star(cfg, toy_task())
    samples = cfg.output_dir + "/iteration-1/samples.jsonl"
    with open(samples, "a") as f:
        f.write('{"iteration": 1, "phase": "rationale", "bat')  # a torn last write
    with pytest.raises(ValueError, match="already holds a STaR run"):
        run_star(cfg, toy_task())
    monkeypatch.setattr(loop, "sample_batches", scripted())
    real_finetune, calls = loop._Run.finetune, []
    monkeypatch.setattr(loop._Run, "finetune", lambda self, n: (calls.append(n), real_finetune(self, n)))

    def crash_eval(self, n):
        if n == 1:
            raise RuntimeError("crash in evaluation")
        return real_eval(self, n)

    real_eval = loop._Run.evaluate
    monkeypatch.setattr(loop._Run, "evaluate", crash_eval)
    resumed = StarConfig(**{**cfg.to_dict(), "ops": tuple(cfg.ops), "resume": True})
    with pytest.raises(RuntimeError, match="crash in evaluation"):
        run_star(resumed, toy_task())
    monkeypatch.setattr(loop._Run, "evaluate", real_eval)
    result = run_star(resumed, toy_task())
    assert calls == [1]  # the fine-tune was done before the crash and is not run again
    fresh = run_star(config(tmp_path, output_dir=str(tmp_path / "fresh"), majority_samples=0), toy_task())
    a = read_jsonl(Path(samples))
    b = read_jsonl(fresh.output_dir / "iteration-1" / "samples.jsonl")
    key = lambda r: (r["phase"], r["batch"], r["row"])  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key)
    drop = (
        "sample_seconds",
        "rationalize_seconds",
        "finetune_seconds",
        "eval_seconds",
        "seconds",
        "final_loss",
    )
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(result.rows) == strip(fresh.rows)
    # a resume with other settings is refused
    other = StarConfig(**{**resumed.to_dict(), "ops": (1, 2, 3), "samples": 3})
    with pytest.raises(ValueError, match="samples: 2 -> 3"):
        run_star(other, toy_task())
    with pytest.raises(ValueError, match="other settings \\(the problems\\)"):
        run_star(resumed, toy_task(n_train=5))


def test_the_direct_baseline_trains_on_answers_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "sample_batches", scripted())
    result = run_star(config(tmp_path, method="direct", iterations=3), toy_task())
    assert [r["iteration"] for r in result.rows] == [0, 1]
    examples = read_jsonl(result.output_dir / "iteration-1" / "examples.jsonl")
    assert len(examples) == 6 and examples[0]["completion"] == " The answer is 2."
    assert examples[0]["prompt"] == "Q: What is 0 plus 2?\nA:"


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def test_no_correct_rationale_at_all_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "sample_batches", scripted(lambda q, h, j, label: " The answer is 0."))
    with pytest.raises(
        ValueError, match="iteration 1: no correct rationale for any of the 6 training problems"
    ):
        run_star(config(tmp_path), toy_task())


def test_bad_data_and_settings(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        make_task("gsm8k", train=str(empty), heldout=str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"--train .*bad.jsonl.* line 2: not valid JSON"):
        make_task("gsm8k", train=str(bad), heldout=str(bad))
    nohash = tmp_path / "nohash.jsonl"
    nohash.write_text('{"question": "a", "answer": "1"}\n')
    with pytest.raises(ValueError, match="no '#### <number>'"):
        make_task("gsm8k", train=str(nohash), heldout=str(nohash))
    with pytest.raises(ValueError, match="needs --train and --heldout"):
        make_task("csqa")
    with pytest.raises(ValueError, match=r"the training set repeats the problem id\(s\) \['a'\]"):
        Task("x", "number", [Problem("a", "q", "1"), Problem("a", "r", "2")], [], [])
    with pytest.raises(ValueError, match="answers must be capital letters"):
        Task("x", "letter", [Problem("a", "q", "b")], [], [])
    with pytest.raises(ValueError, match="the training set is empty"):
        Task("x", "number", [], [], [])
    with pytest.raises(ValueError, match="--train-size 5000: only"):
        WordProblemTask(ops=(1,), n_train=5000)
    with pytest.raises(ValueError, match="--ops"):
        WordProblemTask(ops=(4,))
    with pytest.raises(ValueError, match="--temperature 0 is greedy"):
        StarConfig(temperature=0.0).validate()
    with pytest.raises(ValueError, match="--samples must be an int >= 1"):
        StarConfig(samples=0).validate()
    # the fine-tune's settings are checked before any sampling, under their flags' names
    with pytest.raises(ValueError, match="--lr must be a finite number > 0, got -1"):
        StarConfig(learning_rate=-1).validate()
    with pytest.raises(ValueError, match="--step-growth must be a finite number >= 0, got nan"):
        StarConfig(step_growth=float("nan")).validate()
    with pytest.raises(
        ValueError, match=r"--train-batch-size \(8\) must be a multiple of --micro-batch-size \(3\)"
    ):
        StarConfig(train_batch_size=8, micro_batch_size=3).validate()
    with pytest.raises(ValueError, match=r"--exemplars must be an int in 0 \.\. 3 \(the shipped"):
        csqa_task(
            str(FIXTURES / "csqa_validation.jsonl"), str(FIXTURES / "csqa_validation.jsonl"), n_exemplars=4
        )
    with pytest.raises(ValueError, match=r"--exemplars must be an int in 0 \.\. "):
        gsm8k_task(str(FIXTURES / "gsm8k_test.jsonl"), str(FIXTURES / "gsm8k_test.jsonl"), n_exemplars=-1)
    with pytest.raises(ValueError, match="--resume: .* holds no STaR run"):
        run_star(config(tmp_path, resume=True), toy_task())


def test_the_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    status = cli(
        [
            "--task",
            "gsm8k",
            "--train",
            str(bad),
            "--heldout",
            str(bad),
            "--output-dir",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("qstar-star: error: --train")
    assert cli(["--ops", "one"]) == 2
    assert "--ops must be" in capsys.readouterr().err


def answer_key(task: Task):
    """A script that answers right for every other training problem of ``task`` (by its question)."""
    gold = {p.question: (k, p.gold) for k, p in enumerate(task.train + task.heldout)}

    def script(question: str, hinted: bool, j: int, label: str) -> str:
        k, g = gold[question.split(" (Hint:")[0]]
        if k % 2 == 0 or hinted:
            return f" Because of that, it is {g if task.kind == 'number' else f'({g})'}.\nThe answer is {g}."
        return " I do not know.\nThe answer is 0." if task.kind == "number" else " The answer is (A)."

    return script


def test_the_cli_runs_gsm8k_and_csqa_jsonl(tmp_path, monkeypatch, capsys):
    for name, path in (("gsm8k", "gsm8k_test.jsonl"), ("csqa", "csqa_validation.jsonl")):
        data = str(FIXTURES / path)
        n_shots = 1
        task = make_task(name, train=data, heldout=data, n_exemplars=n_shots)
        monkeypatch.setattr(loop, "sample_batches", scripted(answer_key(task)))
        out = tmp_path / name
        args = [
            "--task",
            name,
            "--train",
            data,
            "--heldout",
            data,
            "--exemplars",
            str(n_shots),
            "--output-dir",
            str(out),
            "--iterations",
            "1",
            "--samples",
            "1",
            "--majority-samples",
            "0",
            "--steps",
            "1",
            "--train-batch-size",
            "2",
            "--micro-batch-size",
            "2",
            "--seq-len",
            "160",
            "--no-progress",
            "--no-plot",
        ]
        assert cli(args) == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())["iterations"]
        assert [r["iteration"] for r in report] == [0, 1] and report[1]["dataset_size"] == len(task.train)
        examples = read_jsonl(out / "iteration-1" / "examples.jsonl")
        assert all("hint" not in e["prompt"].lower() for e in examples)


def test_the_demo_script_runs_at_toy_size(tmp_path):
    """``experiments/star_smollm2.py --smoke``: the tiny random model never reaches a correct rationale,
    so both STaR arms stop with that error (recorded); the direct baseline and the report still run."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "star_smollm2.py"
    spec = importlib.util.spec_from_file_location("star_smollm2", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert (
        demo.main(
            ["--smoke", "--work-dir", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--no-progress"]
        )
        == 0
    )
    info = json.loads((tmp_path / "r" / "results.json").read_text())
    assert "no correct rationale" in info["arms"]["star"]["error"] and info["arms"]["direct"]["error"] is None
    assert [(r["arm"], r["iteration"]) for r in info["rows"]] == [("star", 0), ("direct", 1)]
    assert info["machine"]["cores"] >= 1 and (tmp_path / "r" / "accuracy.png").is_file()
    assert (tmp_path / "r" / "results.csv").read_text().startswith("arm,iteration,")


def test_csqa_exemplars_file_keeps_rationales_and_refuses_a_missing_one(tmp_path):
    data = [json.loads(line) for line in (FIXTURES / "csqa_validation.jsonl").read_text().splitlines()]
    shots = tmp_path / "shots.jsonl"
    shots.write_text(
        "".join(json.dumps({**r, "rationale": f"Because {k}."}) + "\n" for k, r in enumerate(data))
    )
    fixture = str(FIXTURES / "csqa_validation.jsonl")
    task = csqa_task(fixture, fixture, exemplars=str(shots), n_exemplars=2)
    assert [p.rationale for p in task.exemplars] == ["Because 0.", "Because 1."]
    assert [p.id for p in task.exemplars] == ["shot-0", "shot-1"]
    shots.write_text(json.dumps(data[0]) + "\n")
    with pytest.raises(ValueError, match="an exemplar needs a non-empty 'rationale'"):
        csqa_task(fixture, fixture, exemplars=str(shots), n_exemplars=1)
