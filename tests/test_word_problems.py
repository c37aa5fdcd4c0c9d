"""qstar.word_problems: the seeded generator, the worked solutions, the split, the shipped files and
the answer extractor. Fast: no model is loaded."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from qstar import word_problems as wp
from qstar.word_problem_templates import TEMPLATES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_word_problems.py"
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
#: numbers a solution may use that the question says in words ("twice", "every weekday").
IMPLICIT = {2, 5}


@pytest.fixture(scope="module")
def sample():
    return wp.generate_problems(3000, seed=123)


@pytest.fixture(scope="module")
def shipped():
    return wp.load_split("train"), wp.load_split("heldout")


def _script():
    spec = importlib.util.spec_from_file_location("make_word_problems", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_worked_solution(p: dict) -> None:
    """Every line holds one equation that is exact; its operands come from the question, an earlier
    line or IMPLICIT; the last result is ``final``, which the answer, the text and the extractor agree on."""
    known = {int(x) for x in re.findall(r"\d+", p["question"])} | IMPLICIT
    lines = p["solution"].split("\n")
    assert len(lines) == p["n_ops"] == TEMPLATES[p["template"]][0]
    result = None
    for line in lines:
        found = EQUATION.findall(line)
        assert len(found) == 1, line
        a, op, b, result = (int(found[0][0]), found[0][1], int(found[0][2]), int(found[0][3]))
        assert a in known and b in known, (line, p["question"])
        expected = {"+": a + b, "-": a - b, "*": a * b}.get(op)
        if op == "/":
            assert b and a % b == 0, line
            expected = a // b
        assert result == expected >= 0, line
        known.add(result)
    assert type(p["final"]) is int and p["final"] == result
    assert p["answer"] == p["solution"] + f"\n#### {p['final']}"
    assert p["text"] == wp.render_text(p) and p["text"].endswith(f"The answer is {p['final']}.")
    assert wp.extract_answer(p["answer"]) == wp.extract_answer(p["text"]) == p["final"]
    assert p["id"] == "wp-" + hashlib.sha256(wp.normalise(p["question"]).encode()).hexdigest()[:12]


def test_determinism_by_seed():
    a, b = wp.generate_problems(200, seed=7), wp.generate_problems(200, seed=7)
    assert a == b
    assert wp.generate_problems(50, seed=7) == a[:50]
    other = wp.generate_problems(200, seed=8)
    assert [p["question"] for p in other] != [p["question"] for p in a]
    assert wp.make_splits(30, 5, seed=3) == wp.make_splits(30, 5, seed=3)


def test_every_answer_is_the_worked_solution(sample, shipped):
    for p in sample + shipped[0] + shipped[1]:
        check_worked_solution(p)


def test_a_broken_solution_is_caught(sample):
    p = dict(sample[0])
    p["solution"] = re.sub(r"= (\d+)", lambda m: f"= {int(m.group(1)) + 1}", p["solution"], count=1)
    with pytest.raises(AssertionError):
        check_worked_solution(p)


def test_one_to_three_operations(sample):
    counts = Counter(p["n_ops"] for p in sample)
    assert set(counts) == {1, 2, 3}
    for k in (1, 2, 3):
        assert 0.25 < counts[k] / len(sample) < 0.42, counts
    assert {p["n_ops"] for p in wp.generate_problems(100, seed=1, ops=(2,))} == {2}
    assert {p["n_ops"] for p in wp.generate_problems(100, seed=1, ops=[1, 3])} == {1, 3}


def test_template_variety(sample):
    assert len(TEMPLATES) >= 20
    for k in (1, 2, 3):
        assert sum(n == k for n, _ in TEMPLATES.values()) >= 6
    used = Counter(p["template"] for p in sample)
    assert set(used) == set(TEMPLATES)
    assert max(used.values()) < 3 * min(used.values()), used
    names = Counter(p["question"].split()[0] for p in sample)
    assert len(names) >= 30  # names (and "A" for the problems that start with an object)
    assert len({p["question"] for p in sample}) == len(sample)
    assert len({wp.normalise(p["question"]) for p in sample}) == len(sample)


def test_split_is_disjoint_and_deterministic(sample, shipped):
    train, heldout = shipped
    assert (len(train), len(heldout)) == (2000, 200)
    for key in (lambda p: wp.normalise(p["question"]), wp.problem_key, lambda p: p["id"]):
        assert not {key(p) for p in train} & {key(p) for p in heldout}
        assert len({key(p) for p in heldout}) == len(heldout)
    assert len({wp.normalise(p["question"]) for p in train}) == len(train)
    assert all(wp.is_heldout(p) for p in heldout) and not any(wp.is_heldout(p) for p in train)
    # The rule is a function of the problem: more problems from another seed never put a held-out
    # skeleton on the train side.
    more_train, more_heldout = wp.split(sample)
    assert 0.07 < len(more_heldout) / len(sample) < 0.13
    assert not {wp.problem_key(p) for p in more_train} & {wp.problem_key(p) for p in heldout}
    # Names and objects do not decide the side: the skeleton does.
    p = dict(sample[0])
    renamed = dict(p, question=p["question"].replace(p["question"].split()[0], "Zed", 1))
    assert wp.is_heldout(renamed) == wp.is_heldout(p)


def test_split_deduplicates_by_normalised_question(sample):
    p = sample[0]
    twin = dict(p, question="  " + p["question"].upper().replace(" ", "   ") + " ")
    train, heldout = wp.split([p, twin, sample[1]])
    assert len(train) + len(heldout) == 2 and p in train + heldout and twin not in train + heldout


def test_script_regenerates_the_shipped_files_byte_for_byte():
    for name, text in _script().build().items():
        assert (wp.TRAIN_PATH.parent / name).read_bytes() == text.encode("utf-8"), name


def test_shipped_files_load_for_training_and_eval(shipped):
    from qstar.data import load_documents
    from qstar.eval.data import gsm8k_gold, load_gsm8k

    train, heldout = shipped
    assert load_documents("word-problems") == [p["text"] for p in train]
    assert load_documents(str(wp.TRAIN_PATH)) == [p["text"] for p in train]
    assert load_documents("word-problems-heldout") == [p["text"] for p in heldout]
    records = load_gsm8k(str(wp.HELDOUT_PATH))
    assert [gsm8k_gold(r["answer"]) for r in records] == [p["final"] for p in heldout]
    # The files are package data and travel in the sdist.
    assert '"demo_data/*.jsonl"' in (ROOT / "pyproject.toml").read_text()
    assert re.search(r"recursive-include qstar/demo_data .*\*\.jsonl", (ROOT / "MANIFEST.in").read_text())
    assert wp.TRAIN_PATH.stat().st_size + wp.HELDOUT_PATH.stat().st_size < 3_000_000


def test_tiny_tokenizer_windows_the_corpus():
    from qstar.data import load_documents, make_windows
    from qstar.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    docs = load_documents("word-problems")[:16]
    windows = make_windows(docs, tok, seq_len=64, seed=0)
    assert windows.input_ids.shape == (16, 64)
    assert tok.unk_token_id not in set(windows.input_ids[windows.attention_mask.bool()].tolist())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 42", 42),
        ("She spends 4 * 6 = 24 dollars.\n#### 24", 24),
        ("#### 1,234", 1234),
        ("The answer is 42.", 42),
        ("the answer is 1,234.", 1234),
        ("The answer is $15", 15),
        ("So 3 + 4 = 7. The answer is 7", 7),
        ("Therefore, the answer (arabic numerals) is 19.\n\nQ: next 5", 19),
        ("Answer: 8", 8),
        ("3 + 4 = 7", 7),
        ("We get 12.", 12),
        ("It is 42.0", 42),
        ("It is 4.5", None),
        ("The answer is -3.", -3),
        ("no number here", None),
        ("", None),
        ("The answer is 12, so 12 apples.", 12),
        ("After 3 steps the answer is 10 and then 99", 10),
    ],
)
def test_extract_answer(text, expected):
    assert wp.extract_answer(text) == expected


def test_check_answer():
    assert wp.check_answer("The answer is 2,000.", 2000)
    assert not wp.check_answer("The answer is 20.", 2000)
    assert not wp.check_answer("nothing", 0)
    with pytest.raises(TypeError, match="gold must be an int, got str"):
        wp.check_answer("1", "1")
    with pytest.raises(TypeError, match="text must be a str, got int"):
        wp.extract_answer(5)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: wp.generate_problems(0, seed=0), ValueError, r"n must be >= 1, got 0"),
        (lambda: wp.generate_problems(-3, seed=0), ValueError, r"n must be >= 1, got -3"),
        (lambda: wp.generate_problems(2.0, seed=0), TypeError, r"n must be an int, got float"),
        (lambda: wp.generate_problems(5, seed="1"), TypeError, r"seed must be an int, got str '1'"),
        (lambda: wp.generate_problems(5, seed=1.5), TypeError, r"seed must be an int, got float"),
        (lambda: wp.generate_problems(5, seed=True), TypeError, r"seed must be an int, got bool"),
        (lambda: wp.generate_problems(5, seed=-1), ValueError, r"seed must be >= 0, got -1"),
        (lambda: wp.generate_problems(5, seed=0, ops=(4,)), ValueError, r"ops must be .* got \(4,\)"),
        (lambda: wp.generate_problems(5, seed=0, ops=()), ValueError, r"ops must be"),
        (lambda: wp.make_splits(0, 5, seed=0), ValueError, r"n_train must be >= 1"),
        (lambda: wp.make_splits(5, 5, seed=None), TypeError, r"seed must be an int, got NoneType"),
        (lambda: wp.split([], heldout_fraction=1.0), ValueError, r"heldout_fraction must be in \(0, 1\)"),
        (
            lambda: wp.load_split("test"),
            ValueError,
            r"split must be one of \['heldout', 'train'\], got 'test'",
        ),
        (lambda: wp.load_problems("missing.jsonl"), ValueError, r"'missing.jsonl': no such file"),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_load_problems_names_a_bad_record(tmp_path, sample):
    f = tmp_path / "w.jsonl"
    f.write_text(wp.to_jsonl(sample[:2]) + json.dumps(dict(sample[2], final=sample[2]["final"] + 1)) + "\n")
    with pytest.raises(ValueError, match=r"line 3: the answer's '#### N' is not final="):
        wp.load_problems(f)
    f.write_text(json.dumps({"question": "q", "answer": "#### 1", "final": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'final' must be an int, got '1'"):
        wp.load_problems(f)
    f.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: missing field\(s\) \['answer', 'final'\]"):
        wp.load_problems(f)
