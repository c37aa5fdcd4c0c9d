"""The evaluation data: GSM8K and CommonsenseQA records, text documents, the prompts.

Records come from a local ``.jsonl`` file in the dataset's own format or a ``datasets`` name
(offline: the local cache only); every bad record is an error naming the flag, the record and the
field. The prompts are the authors' (``docs/evaluation.md``, "Tasks").
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..data import NAMED_CORPORA, read_jsonl_records, read_text_documents, text_field_value

#: the answer marker of the zero-shot direct prompts; the last one in a prompt is the answer's.
ANSWER_MARKER = "\nA:"
#: the zero-shot CoT prompt's suffix and the text appended before the final answer (the authors').
COT_SUFFIX = "\nA: Let's think step by step."
FINAL_ANSWER_TEXT = "\nTherefore, the answer (arabic numerals) is"


def _named_or_path(source: str) -> Path:
    """A local file of that name wins; else a shipped corpus by name; else the path as given."""
    path = Path(source).expanduser()
    if not path.is_file() and source in NAMED_CORPORA:
        return NAMED_CORPORA[source]
    return path


def _read_jsonl(path: Path, arg: str) -> list[dict]:
    return [record for _, record in read_jsonl_records(path, arg)]


def _load_dataset_rows(name: str, config: str | None, split: str, arg: str) -> list[dict]:
    """Rows of ``datasets.load_dataset(name, config, split=split)``; offline only the local cache."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"{arg} {name!r} is not a local file, and the `datasets` package that would load it by "
            "name is not installed (pip install 'qstar-kernels[eval]')"
        ) from err
    args = (name,) if config is None else (name, config)
    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = getattr(datasets.config, "HF_HUB_OFFLINE", False) or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (offline mode is on, and it is not in the local cache)" if offline else ""
        shown = ", ".join(repr(a) for a in args)
        raise ValueError(
            f"{arg} {name!r}: not a local file, and datasets.load_dataset({shown}, split={split!r}) could "
            f"not load it{hint}. Offline, only datasets already in the local Hugging Face cache can be "
            f"loaded by name. Cause: {type(err).__name__}: {err}"
        ) from err
    return [dict(row) for row in ds]


def _load_records(source: str, config: str | None, split: str, arg: str) -> list[tuple[str, dict]]:
    """(where, record) pairs from a local .jsonl file, a shipped corpus by name (``word-problems``,
    ``word-problems-heldout``) or a ``datasets`` name."""
    path = _named_or_path(source)
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise ValueError(f"{arg} {source!r}: expected a .jsonl file, got {path.suffix!r}")
        return [(f"{arg} {source!r} record {k + 1}", r) for k, r in enumerate(_read_jsonl(path, arg))]
    if path.suffix in (".jsonl", ".json", ".txt"):
        raise ValueError(f"{arg} {source!r}: no such file")
    rows = _load_dataset_rows(source, config, split, arg)
    return [(f"{arg} {source!r} row {k}", r) for k, r in enumerate(rows)]


def _need(where: str, record: dict, fields: Sequence[str]) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}, got {sorted(record)}")


def load_gsm8k(
    source: str, *, config: str | None = "main", split: str = "test", arg: str = "--gsm8k"
) -> list[dict]:
    """GSM8K records ``{"question", "answer"}`` (the answer ends in ``#### N``), from a .jsonl file
    in the dataset's own format or a ``datasets`` name (``config``/``split``; offline: cache only)."""
    out = []
    for where, r in _load_records(source, config, split, arg):
        _need(where, r, ("question", "answer"))
        if not isinstance(r["question"], str) or not isinstance(r["answer"], str):
            raise ValueError(f"{where}: 'question' and 'answer' must be strings")
        if "####" not in r["answer"]:
            raise ValueError(f"{where}: the 'answer' has no '#### <number>' final answer: {r['answer']!r}")
        out.append({"question": r["question"], "answer": r["answer"]})
    if not out:
        raise ValueError(f"{arg} {source!r}: no records")
    return out


def load_csqa(
    source: str, *, config: str | None = None, split: str = "validation", arg: str = "--csqa"
) -> list[dict]:
    """CommonsenseQA records ``{"question", "choices": {"label", "text"}, "answerKey"}`` (``id``,
    ``question_concept`` and a ``rationale``, which STaR's exemplar files carry, are kept when
    present), from a .jsonl file or a ``datasets`` name."""
    out = []
    for where, r in _load_records(source, config, split, arg):
        _need(where, r, ("question", "choices", "answerKey"))
        choices = r["choices"]
        if (
            not isinstance(choices, dict)
            or not isinstance(choices.get("label"), list)
            or not isinstance(choices.get("text"), list)
            or len(choices["label"]) != len(choices["text"])
            or not choices["label"]
        ):
            raise ValueError(
                f"{where}: 'choices' must be {{'label': [...], 'text': [...]}} of equal, non-zero length, "
                f"got {choices!r}"
            )
        if not r["answerKey"]:
            raise ValueError(
                f"{where}: empty 'answerKey' (CommonsenseQA's test split is unlabelled: use validation)"
            )
        if r["answerKey"] not in choices["label"]:
            raise ValueError(f"{where}: answerKey {r['answerKey']!r} is not one of {choices['label']}")
        rec = {"question": r["question"], "choices": choices, "answerKey": r["answerKey"]}
        rec.update({k: r[k] for k in ("id", "question_concept", "rationale") if k in r})
        out.append(rec)
    if not out:
        raise ValueError(f"{arg} {source!r}: no records")
    return out


def load_texts(source: str, *, text_field: str = "text", arg: str = "--text") -> list[str]:
    """Documents of a ``.txt`` file (separated by blank lines), a ``.jsonl`` file (``text_field``) or
    a shipped corpus by name (``word-problems``, ``word-problems-heldout``)."""

    path = _named_or_path(source)
    if not path.is_file():
        raise ValueError(f"{arg} {source!r}: no such file")
    if path.suffix == ".txt":
        docs = read_text_documents(path, arg)
    elif path.suffix == ".jsonl":
        docs = []
        for lineno, r in read_jsonl_records(path, arg):
            where = f"{arg} {source!r} line {lineno}"
            _need(where, r, (text_field,))
            text = text_field_value(r, text_field, where)
            if text.strip():
                docs.append(text)
    else:
        raise ValueError(f"{arg} {source!r}: expected a .txt or .jsonl file, got {path.suffix!r}")
    if not docs:
        raise ValueError(f"{arg} {source!r}: no non-empty document")
    return docs


def shuffled_indices(n: int, seed: int | None) -> list[int]:
    """The order of ``datasets.Dataset.shuffle(seed=seed)``: ``numpy.random.default_rng(seed)
    .permutation(n)`` (None: the original order)."""
    if seed is None:
        return list(range(n))
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def gsm8k_direct_prompt(question: str, answer: str) -> str:
    """``"Q: {question}\\nA:{text after ####}\\n"``: the number keeps its leading space."""
    return "Q: " + question + ANSWER_MARKER + answer.split("####")[-1] + "\n"


def csqa_direct_prompt(question: str, choices: dict, answer_key: str) -> str:
    """``"Q: {question}\\n(A) ...\\n(E) ...\\nA: {answer_key}\\n"``."""
    options = "\n".join(f"({label}) {text}" for label, text in zip(choices["label"], choices["text"]))
    return f"Q: {question}\n" + options + ANSWER_MARKER + " " + answer_key + "\n"


def cot_prompt(question: str) -> str:
    """``"Q: {question}\\nA: Let's think step by step."``."""
    return "Q: " + question + COT_SUFFIX


def extract_first_integer(text: str) -> int | None:
    """The first run of digits in ``text`` with commas removed (no sign, no decimals), or None."""
    match = re.search(r"\d+", text.replace(",", ""))
    return int(match.group()) if match else None


def gsm8k_gold(answer: str) -> int | None:
    """The gold number of a GSM8K answer for the CoT task: the first integer after ``"#### "``."""
    return extract_first_integer(answer.split("#### ")[-1])
