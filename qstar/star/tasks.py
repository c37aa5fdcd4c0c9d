"""STaR's tasks: the problems, the few-shot exemplars, the prompts, answer extraction and correctness.

A :class:`Task` holds a training set and a held-out set of :class:`Problem` s and the few-shot
exemplars (problems with a worked rationale), and knows how to

* write a prompt (:meth:`Task.prompt`): the exemplars (or none), then the question, then ``"A:"``;
  with ``hint=True`` the correct answer follows each question as a hint (rationalization,
  :data:`HINT`);
* read the answer of a completion (:meth:`Task.extract`) and judge it (:meth:`Task.is_correct`).

Every prompt has one shape (the word-problem corpus's own, ``qstar/word_problems.py``)::

    Q: <question>[ (Hint: the answer is <gold>.)]
    A: <rationale>
    The answer is <answer>.

    Q: <question>
    A:

and a completion ends at the blank line that would start the next question (:data:`STOP_STRINGS`).

Three tasks: :class:`WordProblemTask` (the shipped word-problem corpus, the default), GSM8K-format
JSONL (:func:`gsm8k_task`, a number after ``####``) and CommonsenseQA-format JSONL (:func:`csqa_task`,
a letter). :func:`make_task` builds one from the command line's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..eval.data import load_csqa, load_gsm8k
from ..word_problems import extract_answer, load_split

__all__ = [
    "HINT",
    "STOP_STRINGS",
    "TASKS",
    "Problem",
    "Task",
    "WordProblemTask",
    "csqa_task",
    "extract_letter",
    "extract_number",
    "gsm8k_task",
    "make_task",
]

#: the rationalization hint, after the question (the paper: the answer shown to the model).
HINT = " (Hint: the answer is {gold}.)"
#: the word that marks a hint; a rationalized completion that repeats it is not kept.
HINT_MARKER = "hint"
#: a completion ends at a blank line (the next exemplar's separator) or a new question.
STOP_STRINGS = ("\n\n", "\nQ:")
#: the final line of every rationale.
ANSWER_LINE = "The answer is {answer}."
TASKS = ("word-problems", "gsm8k", "csqa")


@dataclass(frozen=True)
class Problem:
    """One problem: ``question`` as shown to the model (CommonsenseQA: with its answer choices),
    ``gold`` the correct answer as :meth:`Task.extract` writes it (``"42"``, ``"B"``), and a worked
    ``rationale`` where the data has one (exemplars need it)."""

    id: str
    question: str
    gold: str
    rationale: str | None = None


# --------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------


def extract_number(text: str) -> str | None:
    """The integer answer of ``text`` as a string (``"1234"``, ``"-3"``), or None: after the last
    ``####`` or the last word "answer", else the last number; commas, ``$`` and a trailing period are
    understood (:func:`qstar.word_problems.extract_answer`)."""
    value = extract_answer(text)
    return None if value is None else str(value)


_ANSWER_WORD = re.compile(r"answer\b", re.IGNORECASE)
_LETTER = re.compile(r"\(([A-Za-z])\)|(?<![\w'])([A-Z])(?![\w'])")
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")


def extract_letter(text: str, labels: str = "ABCDE") -> str | None:
    """The answer letter of ``text`` (one of ``labels``), or None: the first ``(b)`` or bare capital
    ``B`` after the last word "answer" (``"The answer is (B)."``, ``"answer: b"`` is not read, a bare
    lower-case letter being a word), else the last ``(X)`` of the text."""
    words = list(_ANSWER_WORD.finditer(text))
    if words:
        for m in _LETTER.finditer(text, words[-1].end()):
            letter = (m.group(1) or m.group(2)).upper()
            if letter in labels:
                return letter
    for m in reversed(list(_PAREN_LETTER.finditer(text))):
        if m.group(1).upper() in labels:
            return m.group(1).upper()
    return None


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


class Task:
    """Problems, exemplars, prompts and answers (module docstring). ``kind`` is ``"number"`` or
    ``"letter"``."""

    def __init__(
        self, name: str, kind: str, train: list[Problem], heldout: list[Problem], exemplars: list[Problem]
    ):
        if kind not in ("number", "letter"):
            raise ValueError(f"kind must be 'number' or 'letter', got {kind!r}")
        self.name, self.kind = name, kind
        self.train, self.heldout, self.exemplars = list(train), list(heldout), list(exemplars)
        if not self.train:
            raise ValueError(f"task {name!r}: the training set is empty (no problems to learn from)")
        missing = [p.id for p in self.exemplars if not p.rationale]
        if missing:
            raise ValueError(f"task {name!r}: exemplar(s) {missing[:3]} have no rationale")
        for which, problems in (("training", self.train), ("held-out", self.heldout)):
            ids = [p.id for p in problems]
            if len(set(ids)) != len(ids):
                dup = sorted({i for i in ids if ids.count(i) > 1})
                raise ValueError(f"task {name!r}: the {which} set repeats the problem id(s) {dup[:3]}")
        labels = {p.gold for p in self.train + self.heldout + self.exemplars}
        #: the letters an answer may be (CommonsenseQA's A-E, more when the data has more).
        self.letters = ""
        if kind == "letter":
            bad = sorted(g for g in labels if not re.fullmatch(r"[A-Z]", g))
            if bad:
                raise ValueError(f"task {name!r}: answers must be capital letters, got {bad[:3]}")
            self.letters = "".join(sorted(labels | set("ABCDE")))

    def extract(self, text: str) -> str | None:
        """The answer of a completion, in the form of ``Problem.gold``, or None."""
        return extract_number(text) if self.kind == "number" else extract_letter(text, self.letters)

    def is_correct(self, text: str, gold: str) -> bool:
        return self.extract(text) == gold

    @staticmethod
    def question_line(problem: Problem, hint: bool) -> str:
        return "Q: " + problem.question + (HINT.format(gold=problem.gold) if hint else "")

    @staticmethod
    def worked(problem: Problem) -> str:
        """An exemplar's completion: ``" <rationale>\\nThe answer is <gold>."``."""
        return " " + problem.rationale.strip() + "\n" + ANSWER_LINE.format(answer=problem.gold)

    def prompt(self, problem: Problem, *, few_shot: bool, hint: bool = False) -> str:
        """The exemplars (``few_shot``), each with its hint when ``hint``, then ``problem``'s
        question (with its hint when ``hint``) and ``"\\nA:"``."""
        shots = self.exemplars if few_shot else []
        parts = [self.question_line(p, hint) + "\nA:" + self.worked(p) + "\n\n" for p in shots]
        return "".join(parts) + self.question_line(problem, hint) + "\nA:"

    def answer_only(self, problem: Problem) -> str:
        """The completion of direct fine-tuning (no rationale): ``" The answer is <gold>."``."""
        return " " + ANSWER_LINE.format(answer=problem.gold)


# --------------------------------------------------------------------------------------------------
# The three task families
# --------------------------------------------------------------------------------------------------


def _take(problems: list[Problem], n: int | None, what: str) -> list[Problem]:
    if n is None:
        return problems
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    if n > len(problems):
        raise ValueError(f"{what} {n}: only {len(problems)} problems are available")
    return problems[:n]


def _word_problem(rec: dict) -> Problem:
    return Problem(rec["id"], rec["question"], str(rec["final"]), rec["solution"])


class WordProblemTask(Task):
    """The shipped word problems (``qstar/demo_data/word_problems_{train,heldout}.jsonl``, or the
    records ``train`` / ``heldout`` of :func:`qstar.word_problems.generate_problems`), optionally only
    those with ``ops`` operations and of the ``templates`` named: the first ``n_exemplars`` training
    problems are the exemplars (their own worked solutions as rationales) and are left out of the
    training set."""

    def __init__(
        self,
        *,
        ops=(1, 2, 3),
        templates=None,
        n_train=None,
        n_heldout=None,
        n_exemplars: int = 4,
        train=None,
        heldout=None,
    ):
        from ..word_problems import TEMPLATES

        ops = tuple(ops)
        if not ops or any(k not in (1, 2, 3) for k in ops):
            raise ValueError(f"--ops must be some of 1, 2, 3 (operations per problem), got {ops!r}")
        unknown = sorted(set(templates or ()) - set(TEMPLATES))
        if unknown:
            raise ValueError(f"--templates: unknown {unknown}; known: {sorted(TEMPLATES)}")

        def wanted(r):
            return r["n_ops"] in ops and (not templates or r["template"] in templates)

        train_recs = [r for r in (train or load_split("train")) if wanted(r)]
        heldout_recs = [r for r in (heldout or load_split("heldout")) if wanted(r)]
        if n_exemplars < 0 or n_exemplars >= len(train_recs):
            raise ValueError(f"--exemplars {n_exemplars}: expected 0 .. {len(train_recs) - 1}")
        problems = [_word_problem(r) for r in train_recs]
        exemplars, rest = problems[:n_exemplars], problems[n_exemplars:]
        super().__init__(
            "word-problems",
            "number",
            _take(rest, n_train, "--train-size"),
            _take([_word_problem(r) for r in heldout_recs], n_heldout, "--heldout-size"),
            exemplars,
        )


_CALCULATOR = re.compile(r"<<[^>]*>>")


def _gsm8k_problems(source: str, arg: str) -> list[Problem]:
    out = []
    for k, r in enumerate(load_gsm8k(source, arg=arg)):
        gold = extract_number(r["answer"].rsplit("####", 1)[1])
        if gold is None:
            raise ValueError(f"{arg} {source!r} record {k + 1}: no integer after '####': {r['answer']!r}")
        rationale = _CALCULATOR.sub("", r["answer"].rsplit("####", 1)[0]).strip()
        out.append(Problem(f"{Path(source).stem}-{k}", r["question"].strip(), gold, rationale or None))
    return out


def gsm8k_task(
    train: str,
    heldout: str,
    *,
    exemplars: str | None = None,
    n_exemplars: int = 4,
    n_train=None,
    n_heldout=None,
) -> Task:
    """GSM8K-format JSONL (``{"question", "answer"}``, the answer's worked solution ending in
    ``#### N``; ``<<...>>`` calculator notes are dropped from rationales). The exemplars are the
    first ``n_exemplars`` records of ``exemplars`` (else of ``train``, then left out of it)."""
    problems = _gsm8k_problems(train, "--train")
    if exemplars is not None:
        pool = _gsm8k_problems(exemplars, "--exemplars-file")
        _check_exemplars(n_exemplars, len(pool), f"--exemplars-file {exemplars!r}")
        shots = pool[:n_exemplars]
    else:
        _check_exemplars(n_exemplars, len(problems) - 1, f"--train {train!r}")
        shots, problems = problems[:n_exemplars], problems[n_exemplars:]
        if not problems:
            raise ValueError(f"--train {train!r}: no problems left after the {n_exemplars} exemplars")
    held = _gsm8k_problems(heldout, "--heldout")
    return Task(
        "gsm8k",
        "number",
        _take(problems, n_train, "--train-size"),
        _take(held, n_heldout, "--heldout-size"),
        shots,
    )


#: CommonsenseQA-style exemplars with rationales, written for this package (``--exemplars-file``
#: replaces them): (question, choices A-E, answer, rationale).
CSQA_EXEMPLARS = (
    (
        "Where would you keep milk so that it stays cold?",
        ("oven", "cupboard", "refrigerator", "garden", "car"),
        "C",
        "Milk must stay cold, and a refrigerator is the place in a home that keeps food cold.",
    ),
    (
        "What do people usually use to cut paper?",
        ("spoon", "scissors", "pillow", "bucket", "ladder"),
        "B",
        "Cutting needs a sharp tool, and scissors are the sharp tool made for paper.",
    ),
    (
        "If you are very tired at night, what will you most likely do?",
        ("go to sleep", "run a race", "paint a wall", "buy a car", "climb a tree"),
        "A",
        "Being tired means needing rest, and at night people rest by sleeping.",
    ),
)


def _check_exemplars(n: int, available: int, source: str) -> None:
    """``--exemplars n`` must be an int in ``0 .. available`` (what ``source`` holds)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= available:
        raise ValueError(f"--exemplars must be an int in 0 .. {available} ({source}), got {n!r}")


def csqa_question(question: str, labels: list[str], texts: list[str]) -> str:
    """``"<question>\\nAnswer choices:\\n(A) ...\\n(B) ..."``."""
    options = "\n".join(f"({label}) {text}" for label, text in zip(labels, texts))
    return f"{question.strip()}\nAnswer choices:\n{options}"


def _csqa_problems(source: str, arg: str, *, need_rationale: bool = False) -> list[Problem]:
    out = []
    for k, r in enumerate(load_csqa(source, arg=arg)):
        rationale = r.get("rationale")
        if need_rationale and not (isinstance(rationale, str) and rationale.strip()):
            raise ValueError(f"{arg} {source!r} record {k + 1}: an exemplar needs a non-empty 'rationale'")
        text = csqa_question(r["question"], r["choices"]["label"], r["choices"]["text"])
        out.append(
            Problem(str(r.get("id", f"{Path(source).stem}-{k}")), text, r["answerKey"].upper(), rationale)
        )
    return out


def csqa_task(
    train: str,
    heldout: str,
    *,
    exemplars: str | None = None,
    n_exemplars: int = 3,
    n_train=None,
    n_heldout=None,
) -> Task:
    """CommonsenseQA-format JSONL (``{"question", "choices": {"label", "text"}, "answerKey"}``). The
    exemplars: the first ``n_exemplars`` of ``exemplars`` (same format plus a ``"rationale"``), else
    of :data:`CSQA_EXEMPLARS`."""
    if exemplars is not None:
        pool = _csqa_problems(exemplars, "--exemplars-file", need_rationale=True)
        _check_exemplars(n_exemplars, len(pool), f"--exemplars-file {exemplars!r}")
        shots = [replace(p, id=f"shot-{k}") for k, p in enumerate(pool[:n_exemplars])]
    else:
        _check_exemplars(n_exemplars, len(CSQA_EXEMPLARS), "the shipped CommonsenseQA exemplars")
        shots = [
            Problem(f"shot-{k}", csqa_question(q, list("ABCDE"), list(c)), a, why)
            for k, (q, c, a, why) in enumerate(CSQA_EXEMPLARS[:n_exemplars])
        ]
    return Task(
        "csqa",
        "letter",
        _take(_csqa_problems(train, "--train"), n_train, "--train-size"),
        _take(_csqa_problems(heldout, "--heldout"), n_heldout, "--heldout-size"),
        shots,
    )


def make_task(
    name: str,
    *,
    train: str | None = None,
    heldout: str | None = None,
    exemplars: str | None = None,
    n_exemplars: int | None = None,
    n_train: int | None = None,
    n_heldout: int | None = None,
    ops=(1, 2, 3),
    templates=None,
) -> Task:
    """The task ``name`` (one of :data:`TASKS`) over its files; the word problems need none."""
    if name not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {name!r}")
    if name == "word-problems":
        if train is not None or heldout is not None or exemplars is not None:
            raise ValueError(
                "--task word-problems uses the shipped corpus: --train, --heldout and "
                "--exemplars-file are for gsm8k and csqa"
            )
        return WordProblemTask(
            ops=ops,
            templates=templates,
            n_train=n_train,
            n_heldout=n_heldout,
            n_exemplars=4 if n_exemplars is None else n_exemplars,
        )
    if train is None or heldout is None:
        raise ValueError(f"--task {name} needs --train and --heldout (JSONL files)")
    build = gsm8k_task if name == "gsm8k" else csqa_task
    kw = {} if n_exemplars is None else {"n_exemplars": n_exemplars}
    return build(train, heldout, exemplars=exemplars, n_train=n_train, n_heldout=n_heldout, **kw)
