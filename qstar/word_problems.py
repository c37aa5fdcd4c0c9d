"""Worked math word problems: a seeded generator, the train / held-out split, the shipped files, and
an answer extractor and checker.

Each problem is one of :data:`TEMPLATES` (shopping, travel, sharing, ages, work rates, recipes,
savings, ...) filled with names, objects and numbers drawn from a ``random.Random(seed)``. It takes
one to three operations (``+ - * /``, every intermediate and final result an exact non-negative
integer), and its worked solution is one sentence per operation, each holding its equation
(``"She spends 4 * 6 = 24 dollars."``). A problem is a dict (the JSONL record):

* ``id``: ``"wp-"`` and 12 hex digits of the SHA-256 of the normalised question (stable, unique);
* ``template``, ``n_ops``; ``question``;
* ``solution``: the worked solution, one line per operation;
* ``answer``: GSM8K's format, the solution lines then ``"#### N"`` (``qstar.eval --gsm8k`` reads it);
* ``final``: the answer, an ``int``;
* ``text``: the plain-text rendering for language-model training (:func:`render_text`:
  ``"Q: ...\\nA: <solution>\\nThe answer is N."``), so ``--data file.jsonl`` trains on it.

The split (:func:`is_heldout`) is a pure function of the problem's *skeleton* (its template and the
numbers in its question, :func:`problem_key`): a problem is held out when the SHA-256 of its skeleton
falls in the first ``heldout_fraction`` of the hash range. So two problems that differ only in names
or objects land on the same side, and problems generated later from any seed (for example more
training problems) are on the train side only if they are not held out. Within a list, problems
are deduplicated by normalised question text (:func:`normalise`) and by skeleton: no two problems
of a list are the same problem with other names.

The shipped files (``qstar/demo_data/word_problems_{train,heldout}.jsonl``) are written by
``scripts/make_word_problems.py`` with a fixed seed (``docs/training.md``, "The word-problem corpus").
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from .word_problem_templates import TEMPLATES, Work, pick

__all__ = [
    "HELDOUT_FRACTION",
    "HELDOUT_PATH",
    "TEMPLATES",
    "TRAIN_PATH",
    "check_answer",
    "extract_answer",
    "generate_problems",
    "is_heldout",
    "load_problems",
    "load_split",
    "make_splits",
    "normalise",
    "problem_key",
    "render_text",
    "split",
    "to_jsonl",
]

_DATA = Path(__file__).resolve().parent / "demo_data"
#: the shipped splits (``scripts/make_word_problems.py`` writes them).
TRAIN_PATH = _DATA / "word_problems_train.jsonl"
HELDOUT_PATH = _DATA / "word_problems_heldout.jsonl"
#: the share of the skeleton-hash range that is held out.
HELDOUT_FRACTION = 0.1
#: the fields of a record, in the order they are written.
FIELDS = ("id", "template", "n_ops", "question", "solution", "answer", "final", "text")


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------


def normalise(question: str) -> str:
    """The question's text for comparisons: lower case, runs of whitespace as one space, stripped."""
    return " ".join(question.lower().split())


_INT = re.compile(r"\d+")


def problem_key(problem: dict) -> str:
    """The problem's skeleton: its template and the numbers in its question, in order (names and
    objects left out). The split is decided by it (:func:`is_heldout`)."""
    return problem["template"] + ":" + ",".join(_INT.findall(problem["question"]))


def is_heldout(problem: dict, heldout_fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether ``problem`` belongs to the held-out split: the first 8 bytes of the SHA-256 of its
    skeleton (:func:`problem_key`), as a fraction of 2**64, are below ``heldout_fraction``."""
    digest = hashlib.sha256(problem_key(problem).encode()).digest()
    return int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64


def render_text(problem: dict) -> str:
    """The plain-text rendering for language-model training: ``"Q: {question}\\nA: {solution}\\n
    The answer is {final}."``."""
    return f"Q: {problem['question']}\nA: {problem['solution']}\nThe answer is {problem['final']}."


def _record(template: str, n_ops: int, question: str, lines: list[str], final: int) -> dict:
    solution = "\n".join(lines)
    rec = {
        "id": "wp-" + hashlib.sha256(normalise(question).encode()).hexdigest()[:12],
        "template": template,
        "n_ops": n_ops,
        "question": question,
        "solution": solution,
        "answer": f"{solution}\n#### {final}",
        "final": final,
    }
    rec["text"] = render_text(rec)
    return rec


def _is_new(problem: dict, seen: set[str]) -> bool:
    """Whether neither the normalised question nor the skeleton of ``problem`` is in ``seen``
    (both are added)."""
    keys = ("q:" + normalise(problem["question"]), "k:" + problem_key(problem))
    new = not any(k in seen for k in keys)
    seen.update(keys)
    return new


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_ops(ops: Iterable[int]) -> tuple[int, ...]:
    ops = tuple(ops)
    if not ops or any(isinstance(k, bool) or k not in (1, 2, 3) for k in ops):
        raise ValueError(f"ops must be a non-empty selection of 1, 2 and 3 (operations), got {ops!r}")
    return tuple(sorted(set(ops)))


def _problem_stream(seed: int, ops: tuple[int, ...]):
    """An endless stream of problems from ``random.Random(seed)``: the number of operations
    uniform over ``ops``, then a template with that many uniformly, then its values."""
    rng = random.Random(seed)
    by_ops = {k: sorted(name for name, (n, _) in TEMPLATES.items() if n == k) for k in ops}
    while True:
        name = pick(rng, by_ops[pick(rng, ops)])
        n_ops, fn = TEMPLATES[name]
        work = Work()
        question = fn(rng, work)
        if len(work.lines) != n_ops:
            raise AssertionError(f"template {name!r} took {len(work.lines)} steps, declared {n_ops}")
        yield _record(name, n_ops, question, work.lines, work.results[-1])


def generate_problems(n: int, seed: int, *, ops: Iterable[int] = (1, 2, 3)) -> list[dict]:
    """``n`` distinct problems (no two with the same normalised question or skeleton) drawn from
    ``random.Random(seed)``: the same ``n``, ``seed`` and ``ops`` give the same list, and the
    first ``m`` problems of ``n > m`` are those of ``m``. ``ops``: the allowed numbers of
    operations (each drawn uniformly)."""
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    ops = _check_ops(ops)
    seen: set[str] = set()
    out: list[dict] = []
    for attempts, problem in enumerate(_problem_stream(seed, ops)):
        if attempts > 20 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems with ops={ops} (got {len(out)})")
        if _is_new(problem, seen):
            out.append(problem)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def split(
    problems: Iterable[dict], heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)``: ``problems`` deduplicated by normalised question and skeleton (the first one
    kept), each on the side :func:`is_heldout` gives. No question and no skeleton is on both."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    train: list[dict] = []
    heldout: list[dict] = []
    seen: set[str] = set()
    for p in problems:
        if not _is_new(p, seen):
            continue
        (heldout if is_heldout(p, heldout_fraction) else train).append(p)
    return train, heldout


def make_splits(
    n_train: int, n_heldout: int, seed: int, *, heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[dict], list[dict]]:
    """Exactly ``n_train`` train and ``n_heldout`` held-out problems: the stream of ``seed`` is
    drawn until both sides are full (:func:`split` routes each problem; a full side takes no more)."""
    _check_int("n_train", n_train, 1)
    _check_int("n_heldout", n_heldout, 1)
    _check_int("seed", seed, 0)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    train: list[dict] = []
    heldout: list[dict] = []
    seen: set[str] = set()
    limit = 50 * (n_train + n_heldout) + 1000
    for attempts, p in enumerate(_problem_stream(seed, (1, 2, 3))):
        if len(train) == n_train and len(heldout) == n_heldout:
            return train, heldout
        if attempts > limit:
            raise ValueError(f"could not draw {n_train} + {n_heldout} distinct problems (seed {seed})")
        if not _is_new(p, seen):
            continue
        side = heldout if is_heldout(p, heldout_fraction) else train
        if len(side) < (n_heldout if side is heldout else n_train):
            side.append(p)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def to_jsonl(problems: Iterable[dict]) -> str:
    """One JSON object per line (fields in :data:`FIELDS` order, ASCII), ending in a newline."""
    return "".join(json.dumps({k: p[k] for k in FIELDS}) + "\n" for p in problems)


def load_problems(path: str | Path) -> list[dict]:
    """The problems of a JSONL file written by :func:`to_jsonl`; a missing field, a ``final``
    that is not an int, or an ``answer`` whose ``#### N`` is not ``final`` is an error naming the
    file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"word problems {str(path)!r}: no such file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        where = f"word problems {str(path)!r} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [f for f in ("question", "answer", "final") if f not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}, got {sorted(rec)}")
        if isinstance(rec["final"], bool) or not isinstance(rec["final"], int):
            raise ValueError(f"{where}: 'final' must be an int, got {rec['final']!r}")
        if extract_answer(rec["answer"]) != rec["final"]:
            raise ValueError(f"{where}: the answer's '#### N' is not final={rec['final']}: {rec['answer']!r}")
        out.append(rec)
    if not out:
        raise ValueError(f"word problems {str(path)!r}: no records")
    return out


def load_split(name: str) -> list[dict]:
    """The shipped split ``"train"`` or ``"heldout"``."""
    paths = {"train": TRAIN_PATH, "heldout": HELDOUT_PATH}
    if name not in paths:
        raise ValueError(f"split must be one of {sorted(paths)}, got {name!r}")
    return load_problems(paths[name])


# --------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------

# A number: digits with thousands commas or plain digits, an optional sign and decimals.
_NUMBER = re.compile(r"(?<![\w.])([-+]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d])")
_ANSWER_WORD = re.compile(r"answer\b", re.IGNORECASE)


def _number(match: re.Match) -> int | None:
    sign, digits, decimals = match.groups()
    if decimals and decimals.strip(".0"):
        return None  # not an integer
    value = int(digits.replace(",", ""))
    return -value if sign == "-" else value


def extract_answer(text: str) -> int | None:
    """The integer answer in ``text``, or None when there is none.

    Where it is looked for: after the last ``"####"`` if there is one (GSM8K), else after the
    last word ``"answer"`` (``"The answer is 42."``, ``"Therefore, the answer (arabic numerals)
    is 42"``, ``"Answer: 42"``), taking the first number there; else the last number of the text.
    Thousands commas (``1,234``), a sign, ``$``, a trailing period and ``42.0`` are understood;
    a number with a fraction (``4.5``) is not an integer answer (None)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.search(tail)
    else:
        words = list(_ANSWER_WORD.finditer(text))
        if words and _NUMBER.search(text, words[-1].end()):
            found = _NUMBER.search(text, words[-1].end())
        else:
            numbers = list(_NUMBER.finditer(text))
            found = numbers[-1] if numbers else None
    return _number(found) if found else None


def check_answer(text: str, gold: int) -> bool:
    """Whether the answer extracted from ``text`` (:func:`extract_answer`) equals ``gold``."""
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise TypeError(f"gold must be an int, got {type(gold).__name__} {gold!r}")
    return extract_answer(text) == gold
