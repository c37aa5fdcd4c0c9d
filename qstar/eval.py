"""Evaluate a Quiet-STaR model with and without thoughts: ``python -m qstar.eval`` (or ``qstar-eval``).

    python -m qstar.eval --model tiny --tasks gsm8k,csqa --gsm8k tests/fixtures/gsm8k_test.jsonl \\
        --csqa tests/fixtures/csqa_validation.jsonl                       # try it, CPU, seconds
    python -m qstar.eval --model runs/x --tasks gsm8k,csqa,gsm8k-cot,perplexity --text notes.txt

Four tasks, each reported with and without thoughts (``quietstar.md`` sections 10 and 11):

``gsm8k``, ``csqa``: the authors' "zero-shot direct" metric (``eval_helpers.compute_metrics``).
    The prompt holds the gold answer (GSM8K ``"Q: {question}\\nA: {number}\\n"``, CommonsenseQA
    ``"Q: {question}\\n(A) ..\\n(E) ..\\nA: {letter}\\n"``); one teacher-forced eval forward gives, at
    every position, the next-token distribution of the base model (``base_hidden``) and of the
    model with its thought mixed in (``mixed_hidden``). The score of an example is the product,
    over the answer tokens, of the probability of the gold token renormalised over a small allowed
    set (the 10 digits and newline, or the letters A-E and newline); the metric is its mean: an
    expected accuracy, not an exact match of generated text.
``gsm8k-cot``: the authors' zero-shot chain of thought with a majority vote
    (``zero-shotcot-eval.py``): sample a rationale after ``"Q: {q}\\nA: Let's think step by step."``,
    append ``"\\nTherefore, the answer (arabic numerals) is"``, sample a few more tokens, take the
    first integer; the majority of ``k`` samples must equal the gold number.
``perplexity``: on a text file, per-token NLL without and with thoughts, both perplexities, and the
    gain ``log p_with - log p_without`` per token, averaged in buckets of difficulty (equal-count
    quantiles of the no-thought NLL): the paper reports that thoughts help most on hard tokens.

The zero-shot direct metric, step by step (:func:`locate_answer`, :func:`score_answer`):

1. decode the prompt's ids; ``numeric`` iff the character after the space that follows the LAST
   ``"\\nA:"`` is a digit (``text.split("\\nA:")[-1][1].isdigit()``);
2. ``i`` = the largest prefix length whose decoded prefix holds fewer ``"\\nA:"`` than the whole
   prompt, found by decoding ever shorter prefixes from the end: ``ids[i]`` completes the marker;
3. for every position ``j >= i + offset`` (``offset`` 1 when numeric: the token right after the
   marker, the lone space, is never scored; 0 for letters) whose target ``ids[j + 1]`` is in the
   allowed set: multiply in ``softmax(logits[j, allowed])[target]`` (their softmax over the whole
   vocabulary, zeroed outside the set and renormalised, is the same number); targets outside the
   set are skipped;
4. average the products over the examples.

Quirks of the authors' evaluation reproduced here, on purpose:

* a negative GSM8K answer (``#### -3``) is not "numeric" (the character after the space is ``-``),
  so it is scored with the LETTER set: its digits are skipped and only the final newline counts,
  its score is ``p(newline)`` renormalised over letters + newline;
* tokens outside the allowed set are skipped, not failed: the comma of ``1,000``, the sign;
* an example with no scored token scores 1 (the empty product);
* only the last ``"\\nA:"`` counts (a question may hold the marker);
* the allowed ids are what the tokenizer makes of the answers (digits 1-9, 0, then newline;
  letters A-E, then newline, in the authors' order); for Mistral-7B they equal the authors'
  hard-coded lists (tested with the real tokenizer). ``--digit-ids`` / ``--letter-ids`` override.

Where this harness departs from the authors' code, and why:

* truncation: a prompt longer than ``--max-length`` (256) keeps its LAST tokens; the authors take a
  random 256-token window, which can cut off the answer being scored. Truncated examples are
  flagged in the report;
* each batch is right-padded to its own longest prompt, not to 256: under causal attention (text
  and thoughts alike) the scores are the same; sampled thoughts draw different random numbers;
* prompts are decoded with ``skip_special_tokens=True`` to find the marker (the authors' decode
  keeps ``<s>``/``</s>``; no ``"\\nA:"`` can span a special token in these prompts, and
  ``mistral_common``'s tokenizer returns raw pieces such as ``<0x0A>`` when special tokens are
  kept). A prompt with fewer than two characters after its marker is not numeric (theirs would
  index past the end of a string);
* the renormalised softmax is taken over the allowed logits directly, in float32: the same value,
  without the NaN of ``0 / 0`` when every allowed probability underflows in the full softmax;
* thoughts are sampled at the model config's ``eval_thought_temperature`` (0 = greedy in the
  ``default`` preset); the authors' eval draws them at temperature 1 whatever they set
  (``quietstar.md`` section 13, quirk 1): pass ``--thought-temperature 1`` to match.

Zero-shot CoT, reproduced: temperature 0.9 multinomial over the mixed logits (no top-k/top-p, the
meta tokens banned); a sample ends when it draws EOS, BOS or the pad token, or when the decoded text
(prompt included, special tokens skipped) holds ``"Q:"`` or ``"\\n\\n\\n"`` MORE THAN ONCE, and is
then cut before the last occurrence (so a first ``"\\n\\n\\n"`` does not stop it); the second prompt
is that text, ``rstrip()``-ed, plus the final-answer text, re-tokenised with BOS, under the same
stop rules; the answer is the first run of digits after the last final-answer text, commas removed
(the sign and decimals are lost: ``-3`` reads 3, ``2.5`` reads 2), the gold number is read the same
way from the text after ``"#### "``; the vote is ``Counter.most_common``: a tie goes to the answer
sampled first, and "no integer" (None) is a vote like any other. The questions are the first 128
after the ``datasets`` shuffle with seed 42 (``numpy.random.default_rng(42).permutation``).
Departures: the token budgets are exactly ``--cot-max-new-tokens`` and ``--cot-answer-tokens``
(their loop bounds allow 385 and 13); their cut at a stop string hands a Python list of pieces to
``tokenizer.encode`` (what comes back depends on the tokenizer class; it is not the cut text), here
the text before the last occurrence is kept; a None majority is never correct; generation uses
:func:`qstar.generate` (a KV cache, a thought at the newest position only: the same distribution as
re-running the eval forward per token, other random numbers) and batches the samples.

Perplexity: each document is tokenised with BOS and cut into consecutive windows of
``--max-length`` tokens (the first token of each window is context only); a ``.txt`` file's
documents are separated by blank lines (as for training, :mod:`qstar.data`), a ``.jsonl`` file has
one per line (``--text-field``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import read_jsonl_records, read_text_documents
from .generation import stream
from .model import CONFIG_NAME, QuietStarForCausalLM, mixed_logits

log = logging.getLogger("qstar.eval")

__all__ = [
    "ANSWER_MARKER",
    "AnswerLocation",
    "AnswerScore",
    "AnswerTokens",
    "CotResult",
    "DifficultyBucket",
    "DirectResult",
    "PerplexityResult",
    "answer_token_ids",
    "cot_prompt",
    "csqa_direct_prompt",
    "cut_at_end_string",
    "difficulty_buckets",
    "evaluate_cot",
    "evaluate_direct",
    "evaluate_perplexity",
    "extract_first_integer",
    "gsm8k_direct_prompt",
    "gsm8k_gold",
    "load_csqa",
    "load_gsm8k",
    "load_model",
    "load_texts",
    "locate_answer",
    "majority_vote",
    "plot_report",
    "score_answer",
    "shuffled_indices",
]

#: the answer marker of the zero-shot direct prompts; the last one in a prompt is the answer's.
ANSWER_MARKER = "\nA:"
#: the zero-shot CoT prompt's suffix and the text appended before the final answer (the authors').
COT_SUFFIX = "\nA: Let's think step by step."
FINAL_ANSWER_TEXT = "\nTherefore, the answer (arabic numerals) is"
#: a sample stops when its text holds one of these more than once (checked in this order).
COT_END_STRINGS = ("Q:", "\n\n\n")
#: the authors' hard-coded allowed ids for Mistral-7B (``eval_helpers.py``), for reference and tests.
MISTRAL_DIGIT_IDS = [28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774, 28734, 13]
MISTRAL_LETTER_IDS = [330, 365, 334, 384, 413, 13]
DIGITS = "1234567890"  # the authors' order
LETTERS = "ABCDE"
TASKS = ("gsm8k", "csqa", "gsm8k-cot", "perplexity")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


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
    """(where, record) pairs from a local .jsonl file or a ``datasets`` name."""
    path = Path(source).expanduser()
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
    """CommonsenseQA records ``{"question", "choices": {"label", "text"}, "answerKey"}`` (``id`` and
    ``question_concept`` are kept when present), from a .jsonl file or a ``datasets`` name."""
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
        rec.update({k: r[k] for k in ("id", "question_concept") if k in r})
        out.append(rec)
    if not out:
        raise ValueError(f"{arg} {source!r}: no records")
    return out


def load_texts(source: str, *, text_field: str = "text", arg: str = "--text") -> list[str]:
    """Documents of a ``.txt`` file (separated by blank lines) or a ``.jsonl`` file (``text_field``)."""

    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"{arg} {source!r}: no such file")
    if path.suffix == ".txt":
        docs = read_text_documents(path)
    elif path.suffix == ".jsonl":
        docs = []
        for k, r in enumerate(_read_jsonl(path, arg)):
            _need(f"{arg} {source!r} record {k + 1}", r, (text_field,))
            if str(r[text_field]).strip():
                docs.append(str(r[text_field]))
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


# --------------------------------------------------------------------------------------------------
# The allowed answer tokens
# --------------------------------------------------------------------------------------------------


@dataclass
class AnswerTokens:
    """The allowed ids of the zero-shot direct metric: ``numeric`` (digits + newline) for numbers,
    ``letters`` (A-E + newline) otherwise."""

    numeric: list[int]
    letters: list[int]

    def validate(self, vocab_size: int, banned: Sequence[int] = ()) -> None:
        for name, ids in (("numeric (--digit-ids)", self.numeric), ("letters (--letter-ids)", self.letters)):
            if not ids:
                raise ValueError(f"the {name} allowed set is empty")
            if len(set(ids)) != len(ids):
                raise ValueError(f"the {name} allowed set has repeated ids: {ids}")
            bad = [i for i in ids if not 0 <= i < vocab_size or i in banned]
            if bad:
                raise ValueError(
                    f"the {name} allowed set has ids outside [0, {vocab_size}) or meta tokens: {bad}"
                )


def _answer_piece_id(tokenizer, context: str, piece: str) -> int:
    """The one token ``piece`` becomes after ``context``; a leading whitespace-only token (the lone
    space the metric never scores) is dropped first."""
    before = tokenizer.encode(context)
    after = tokenizer.encode(context + piece)
    new = list(after[len(before) :])
    if list(after[: len(before)]) != list(before):
        new = None
    while new and len(new) > 1 and not tokenizer.decode([new[0]], skip_special_tokens=True).strip():
        new = new[1:]
    if not new or len(new) != 1 or tokenizer.decode(new, skip_special_tokens=True).strip() != piece.strip():
        raise ValueError(
            f"the tokenizer does not make {piece!r} after {context!r} a single token (got "
            f"{None if new is None else [tokenizer.decode([t]) for t in new]!r}): the zero-shot direct "
            "metric needs one token per digit / letter; pass the ids with --digit-ids / --letter-ids"
        )
    return int(new[0])


def answer_token_ids(tokenizer) -> AnswerTokens:
    """The allowed ids as the tokenizer writes the answers: the digits 1-9, 0 (inside a number:
    after ``"A: "`` and after another digit, which must agree), then the newline after a number;
    the letters A-E after ``"A: "``, then the newline after a letter (the authors' order).

    Raises ValueError when a digit, letter or newline is not one token (e.g. tokenizers that merge
    digits); pass the ids explicitly then."""
    context = "Q: 1" + ANSWER_MARKER
    digits = []
    for d in DIGITS:
        first = _answer_piece_id(tokenizer, context, " " + d)
        inner = _answer_piece_id(tokenizer, context + " 1", d)
        if first != inner:
            raise ValueError(
                f"the digit {d!r} is token {first} at the start of a number and {inner} inside one: "
                "pass the ids with --digit-ids"
            )
        digits.append(first)
    digits.append(_answer_piece_id(tokenizer, context + " 1", "\n"))
    letters = [_answer_piece_id(tokenizer, context, " " + c) for c in LETTERS]
    letters.append(_answer_piece_id(tokenizer, context + " B", "\n"))
    return AnswerTokens(numeric=digits, letters=letters)


# --------------------------------------------------------------------------------------------------
# The zero-shot direct metric: locating and scoring (no model)
# --------------------------------------------------------------------------------------------------


@dataclass
class AnswerLocation:
    """Where a prompt's answer is (:func:`locate_answer`).

    Attributes:
        marker_index: ``i``: ``ids[:i]`` decodes to one marker fewer than the prompt; ``ids[i]``
            completes the last marker.
        numeric: the answer is scored with the digit set (else the letter set).
        first_target: the first position ``j`` whose target ``ids[j + 1]`` may be scored:
            ``i + 1`` when numeric (the space token after the marker is skipped), else ``i``.
    """

    marker_index: int
    numeric: bool
    first_target: int


def locate_answer(
    ids: Sequence[int], decode: Callable[[list[int]], str], marker: str = ANSWER_MARKER
) -> AnswerLocation:
    """Find the last ``marker`` in a prompt's token ids the authors' way (module docstring)."""
    ids = [int(t) for t in ids]
    text = decode(ids)
    count = text.count(marker)
    if count == 0:
        raise ValueError(f"the prompt has no answer marker {marker!r}: {text[-80:]!r}")
    tail = text.split(marker)[-1]
    numeric = len(tail) > 1 and tail[1].isdigit()
    i = 1
    for k in range(len(ids) - 1, 0, -1):
        if decode(ids[:k]).count(marker) < count:
            i = k
            break
    return AnswerLocation(marker_index=i, numeric=numeric, first_target=i + (1 if numeric else 0))


@dataclass
class ScoredToken:
    """One scored answer token: position ``j``, its target ``ids[j + 1]``, its renormalised probability."""

    position: int
    token_id: int
    probability: float


@dataclass
class AnswerScore:
    """The product of the scored tokens' probabilities (1 when none is scored), and the tokens."""

    probability: float
    tokens: list[ScoredToken]


def score_answer(
    ids: Sequence[int], allowed_logits: torch.Tensor, allowed_ids: Sequence[int], first_target: int
) -> AnswerScore:
    """The zero-shot direct score of one prompt, from the logits at the allowed ids only.

    Args:
        ids: the prompt's real tokens (no padding), length ``n``.
        allowed_logits: ``(>= n - 1, A)`` the logits of ``allowed_ids`` at every position;
            position ``j`` predicts ``ids[j + 1]``.
        allowed_ids: the ``A`` allowed token ids (digits + newline, or letters + newline).
        first_target: from :func:`locate_answer`.

    Every ``j`` in ``[first_target, n - 1)`` whose target is allowed contributes
    ``softmax(allowed_logits[j])[column of the target]``; other targets are skipped.
    """
    ids = [int(t) for t in ids]
    allowed = [int(t) for t in allowed_ids]
    if allowed_logits.dim() != 2 or allowed_logits.shape[1] != len(allowed):
        raise ValueError(
            f"allowed_logits must be (positions, {len(allowed)}), got {tuple(allowed_logits.shape)}"
        )
    if allowed_logits.shape[0] < len(ids) - 1:
        raise ValueError(
            f"allowed_logits has {allowed_logits.shape[0]} positions, fewer than the {len(ids) - 1} needed"
        )
    column = {t: c for c, t in enumerate(allowed)}
    probs = torch.softmax(allowed_logits.float(), dim=-1)
    product, tokens = 1.0, []
    for j in range(max(first_target, 0), len(ids) - 1):
        target = ids[j + 1]
        if target not in column:
            continue
        p = float(probs[j, column[target]])
        product *= p
        tokens.append(ScoredToken(position=j, token_id=target, probability=p))
    return AnswerScore(probability=product, tokens=tokens)


# --------------------------------------------------------------------------------------------------
# The zero-shot direct metric on a model
# --------------------------------------------------------------------------------------------------


@dataclass
class DirectExample:
    """One prompt's scores. ``answer``: the text after its last marker; ``tokens``: per scored
    token, its position, id, text and both probabilities."""

    index: int
    answer: str
    n_tokens: int
    truncated: bool
    numeric: bool
    first_target: int
    p_without: float
    p_with: float
    tokens: list[dict]


@dataclass
class DirectResult:
    """The zero-shot direct metric without and with thoughts (means of the examples' products)."""

    without_thoughts: float
    with_thoughts: float
    examples: list[DirectExample]
    answer_tokens: AnswerTokens
    n_truncated: int
    seconds: float


def _require_tokenizer(model: QuietStarForCausalLM):
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer (model.tokenizer is None); pass --tokenizer")
    return model.tokenizer


def _eval_forward(model: QuietStarForCausalLM, rows: list[list[int]], generator, **kwargs):
    """One eval-mode forward on right-padded ``rows``; the outputs' row ``b`` is example ``b``.

    The eval forward runs ``eval_n_rationales`` copies of each sequence (rows ``b * P .. b * P +
    P - 1``); the first copy of each is kept (the authors evaluate with one rationale, ``P = 1``).
    Rows are padded to at least ``eval_n_talk_tokens + 2`` (the forward's shortest text).
    """
    cfg = model.config
    ids, mask = _right_pad(rows, model.pad_token_id, min_length=max(3, cfg.eval_n_talk_tokens + 2))
    device = model.lm_head_weight.device
    out = model(ids.to(device), mask.to(device), generator=generator, **kwargs)
    P = cfg.eval_n_rationales
    if P == 1:
        return out
    first = torch.arange(len(rows), device=device) * P
    for name in ("base_hidden", "mixed_hidden", "base_logprobs"):
        if getattr(out, name) is not None:
            setattr(out, name, getattr(out, name)[first])
    out.talk_logprobs = out.talk_logprobs[:, first]
    out.mixing_weights = out.mixing_weights[:, first]
    return out


def _right_pad(rows: list[list[int]], pad: int, min_length: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(min_length, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), L), dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[b, : len(r)] = 1
    return ids, mask


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled)


@torch.no_grad()
def evaluate_direct(
    model: QuietStarForCausalLM,
    prompts: Sequence[str],
    *,
    answer_tokens: AnswerTokens | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "direct",
) -> DirectResult:
    """The authors' zero-shot direct metric of ``prompts`` (each holding its gold answer after the
    last ``"\\nA:"``), without and with thoughts, from one eval forward per batch.

    The logits at the allowed ids are ``mixed_logits(hidden, W[allowed])`` of ``base_hidden``
    (without) and ``mixed_hidden`` (with): no vocabulary-sized tensor.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_length < 3:
        raise ValueError(f"--max-length must be >= 3, got {max_length}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    tok = _require_tokenizer(model)
    answer_tokens = answer_tokens or answer_token_ids(tok)
    answer_tokens.validate(model.vocab_size, (model.start_id, model.end_id))
    union = list(dict.fromkeys(answer_tokens.numeric + answer_tokens.letters))
    col = {t: c for c, t in enumerate(union)}
    cols = {
        True: torch.tensor([col[t] for t in answer_tokens.numeric]),
        False: torch.tensor([col[t] for t in answer_tokens.letters]),
    }

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    encoded, truncated, where = [], [], []
    for k, p in enumerate(prompts):
        ids = list(tok.encode(p))
        truncated.append(len(ids) > max_length)
        ids = ids[-max_length:]
        encoded.append(ids)
        try:
            where.append(locate_answer(ids, decode))
        except ValueError as err:
            raise ValueError(f"prompt {k}: {err} (is --max-length {max_length} too short?)") from err

    was_training = model.training
    model.eval()
    W_allowed = model.lm_head_weight[torch.tensor(union, device=model.lm_head_weight.device)]  # (U, H)
    examples: list[DirectExample] = []
    t0 = time.perf_counter()
    starts = list(range(0, len(encoded), batch_size))
    bar = _bar(len(starts), desc, progress)
    try:
        for s in starts:
            rows = encoded[s : s + batch_size]
            out = _eval_forward(model, rows, generator, output_hidden_states=True)
            without = mixed_logits(out.base_hidden, W_allowed).cpu()  # (B, L, U)
            with_ = mixed_logits(out.mixed_hidden, W_allowed).cpu()
            for b, row in enumerate(rows):
                k = s + b
                loc = where[k]
                allowed = answer_tokens.numeric if loc.numeric else answer_tokens.letters
                c = cols[loc.numeric]
                sw = score_answer(row, without[b][:, c], allowed, loc.first_target)
                st = score_answer(row, with_[b][:, c], allowed, loc.first_target)
                examples.append(
                    DirectExample(
                        index=k,
                        answer=decode(row[loc.marker_index + 1 :]),
                        n_tokens=len(row),
                        truncated=truncated[k],
                        numeric=loc.numeric,
                        first_target=loc.first_target,
                        p_without=sw.probability,
                        p_with=st.probability,
                        tokens=[
                            {
                                "position": a.position,
                                "id": a.token_id,
                                "text": tok.decode([a.token_id]),
                                "p_without": a.probability,
                                "p_with": b_.probability,
                            }
                            for a, b_ in zip(sw.tokens, st.tokens)
                        ],
                    )
                )
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    n = len(examples)
    return DirectResult(
        without_thoughts=sum(e.p_without for e in examples) / n,
        with_thoughts=sum(e.p_with for e in examples) / n,
        examples=examples,
        answer_tokens=answer_tokens,
        n_truncated=sum(truncated),
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------------
# Zero-shot chain of thought with a majority vote
# --------------------------------------------------------------------------------------------------


def cut_at_end_string(text: str, end_strings: Sequence[str] = COT_END_STRINGS) -> str | None:
    """If ``text`` holds one of ``end_strings`` more than once (the first such, in order), the text
    before its last occurrence; else None (the sample goes on)."""
    for s in end_strings:
        if text.count(s) > 1:
            return text[: text.rfind(s)]
    return None


def majority_vote(answers: Sequence[int | None]) -> int | None:
    """The most frequent answer; a tie goes to the one that appears first in ``answers``
    (``Counter.most_common``). None ("no integer found") counts as an answer."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    return Counter(answers).most_common(1)[0][0]


def _sample_texts(
    model: QuietStarForCausalLM,
    prompts: list[str],
    *,
    max_new_tokens: int,
    think: bool,
    temperature: float,
    generator: torch.Generator | None,
) -> list[str]:
    """Sample a continuation of each prompt under the authors' stop rules; return the whole decoded
    texts (prompt included, special tokens skipped, cut before the last stop string)."""
    tok = model.tokenizer
    stop_ids = sorted({t for t in (tok.eos_token_id, tok.bos_token_id, model.pad_token_id) if t is not None})
    prompt_ids = [list(tok.encode(p)) for p in prompts]
    B = len(prompts)
    generated: list[list[int]] = [[] for _ in range(B)]
    texts: list[str | None] = [None] * B
    done = [False] * B
    steps = stream(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        think=think,
        temperature=temperature,
        eos_token_id=stop_ids,
        generator=generator,
        tokenizer=tok,
    )
    try:
        for step in steps:
            for b in range(B):
                if done[b]:
                    continue
                t = int(step.tokens[b])
                generated[b].append(t)
                if t in stop_ids:
                    done[b] = True
                    continue
                cut = cut_at_end_string(tok.decode(prompt_ids[b] + generated[b], skip_special_tokens=True))
                if cut is not None:
                    texts[b], done[b] = cut, True
            if all(done):
                break
    finally:
        steps.close()
    return [
        t if t is not None else tok.decode(prompt_ids[b] + generated[b], skip_special_tokens=True)
        for b, t in enumerate(texts)
    ]


@dataclass
class CotResult:
    """Zero-shot CoT maj@k accuracy of one mode (with or without thoughts), and per question the
    votes, the majority, the gold number and every sample's final text."""

    think: bool
    accuracy: float
    examples: list[dict]
    seconds: float


def evaluate_cot(
    model: QuietStarForCausalLM,
    questions: Sequence[str],
    golds: Sequence[int | None],
    *,
    think: bool,
    votes: int = 8,
    max_new_tokens: int = 384,
    answer_tokens: int = 12,
    temperature: float = 0.9,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> CotResult:
    """The authors' zero-shot CoT with a majority vote over ``votes`` samples per question.

    Each sample: up to ``max_new_tokens`` of rationale after :func:`cot_prompt`, then the text
    ``rstrip()``-ed plus ``FINAL_ANSWER_TEXT``, up to ``answer_tokens`` more, and the first integer
    after the last ``FINAL_ANSWER_TEXT``. ``batch_size`` samples are generated together.
    """
    if len(questions) != len(golds):
        raise ValueError(f"{len(questions)} questions but {len(golds)} gold answers")
    for name, v in (("--cot-votes", votes), ("--cot-max-new-tokens", max_new_tokens)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if answer_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"--cot-answer-tokens and --batch-size must be >= 1, got {answer_tokens}, {batch_size}"
        )
    _require_tokenizer(model)
    rows = [(q, v) for q in range(len(questions)) for v in range(votes)]
    texts: list[str] = []
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    starts = list(range(0, len(rows), batch_size))
    bar = _bar(len(starts), f"cot ({'with' if think else 'without'} thoughts)", progress)
    try:
        for s in starts:
            chunk = rows[s : s + batch_size]
            kw = dict(think=think, temperature=temperature, generator=generator)
            reasoning = _sample_texts(
                model, [cot_prompt(questions[q]) for q, _ in chunk], max_new_tokens=max_new_tokens, **kw
            )
            final = [t.rstrip() + FINAL_ANSWER_TEXT for t in reasoning]
            texts += _sample_texts(model, final, max_new_tokens=answer_tokens, **kw)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    examples, correct = [], 0
    for q in range(len(questions)):
        mine = texts[q * votes : (q + 1) * votes]
        answers = [extract_first_integer(t.split(FINAL_ANSWER_TEXT)[-1]) for t in mine]
        majority = majority_vote(answers)
        ok = majority is not None and majority == golds[q]
        correct += ok
        examples.append(
            {
                "index": q,
                "gold": golds[q],
                "votes": answers,
                "majority": majority,
                "correct": ok,
                "texts": mine,
            }
        )
    return CotResult(
        think=think, accuracy=correct / len(questions), examples=examples, seconds=time.perf_counter() - t0
    )


# --------------------------------------------------------------------------------------------------
# Perplexity and the gain from thinking by difficulty
# --------------------------------------------------------------------------------------------------


@dataclass
class DifficultyBucket:
    """Tokens whose no-thought NLL falls in ``[nll_low, nll_high]`` (an equal-count quantile bucket)."""

    index: int
    count: int
    nll_low: float
    nll_high: float
    mean_nll_without: float
    mean_nll_with: float
    mean_gain: float


def difficulty_buckets(
    nll_without: torch.Tensor, nll_with: torch.Tensor, n_buckets: int = 5
) -> tuple[list[DifficultyBucket], torch.Tensor]:
    """Split the tokens into ``n_buckets`` equal-count quantile buckets of ``nll_without``
    (sizes differ by at most one; ties are split by position), easiest first.

    Returns the buckets and the ``(N,)`` bucket index of every token. The gain of a token is
    ``nll_without - nll_with`` (= ``log p_with - log p_without``).
    """
    if n_buckets < 1:
        raise ValueError(f"--buckets must be >= 1, got {n_buckets}")
    if nll_without.shape != nll_with.shape or nll_without.dim() != 1:
        raise ValueError("nll_without and nll_with must be (N,) tensors of the same shape")
    N = nll_without.numel()
    assignment = torch.empty(N, dtype=torch.int64)
    buckets: list[DifficultyBucket] = []
    if N == 0:
        return buckets, assignment
    order = torch.sort(nll_without.double(), stable=True).indices
    for k, group in enumerate(torch.tensor_split(order, min(n_buckets, N))):
        assignment[group] = k
        base, think = nll_without[group].double(), nll_with[group].double()
        buckets.append(
            DifficultyBucket(
                index=k,
                count=int(group.numel()),
                nll_low=float(base.min()),
                nll_high=float(base.max()),
                mean_nll_without=float(base.mean()),
                mean_nll_with=float(think.mean()),
                mean_gain=float((base - think).mean()),
            )
        )
    return buckets, assignment


@dataclass
class PerplexityResult:
    """Per-token NLL of a text without and with thoughts.

    ``nll_without`` / ``nll_with`` are ``(N,)`` float64, every scored token in window order;
    perplexities are ``exp(mean NLL)``; ``mean_gain = mean(nll_without - nll_with)``."""

    n_documents: int
    n_windows: int
    n_tokens: int
    perplexity_without: float
    perplexity_with: float
    mean_gain: float
    fraction_improved: float
    mean_mixing_weight: float
    buckets: list[DifficultyBucket]
    nll_without: torch.Tensor
    nll_with: torch.Tensor
    windows: list[dict]
    seconds: float


def text_windows(documents: Sequence[str], tokenizer, max_length: int) -> list[tuple[int, int, list[int]]]:
    """``(document, start, ids)``: each document tokenised with the tokenizer's special tokens (BOS)
    and cut into consecutive windows of ``max_length`` tokens; a last window of 1 token is dropped."""
    if max_length < 3:
        raise ValueError(f"--max-length must be >= 3, got {max_length}")
    out = []
    for d, doc in enumerate(documents):
        ids = list(tokenizer.encode(doc))
        for s in range(0, len(ids), max_length):
            chunk = ids[s : s + max_length]
            if len(chunk) >= 2:
                out.append((d, s, chunk))
    return out


@torch.no_grad()
def evaluate_perplexity(
    model: QuietStarForCausalLM,
    documents: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    n_buckets: int = 5,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity without and with thoughts, and the gain from thinking by difficulty bucket, from
    the eval forward's per-token ``base_logprobs`` and ``talk_logprobs``."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    tok = _require_tokenizer(model)
    windows = text_windows(documents, tok, max_length)
    if not windows:
        raise ValueError("the text has no window of at least 2 tokens")
    was_training = model.training
    model.eval()
    lp_without, lp_with, weights, details = [], [], [], []
    t0 = time.perf_counter()
    starts = list(range(0, len(windows), batch_size))
    bar = _bar(len(starts), "perplexity", progress)
    try:
        for s in starts:
            chunk = windows[s : s + batch_size]
            out = _eval_forward(model, [w[2] for w in chunk], generator)
            base = out.base_logprobs.double().cpu()  # (B, L): log p(x_{j+1}), 0 past the end
            talk = out.talk_logprobs[0].double().cpu()
            w = out.mixing_weights[0].float().cpu()  # (B, L)
            for b, (d, start, row) in enumerate(chunk):
                n = len(row) - 1  # targets 1 .. len - 1
                lp_without.append(base[b, :n])
                lp_with.append(talk[b, :n])
                weights.append(w[b, :n])
                details.append(
                    {
                        "document": d,
                        "start": start,
                        "n_targets": n,
                        "nll_without": float(-base[b, :n].mean()),
                        "nll_with": float(-talk[b, :n].mean()),
                    }
                )
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    nll_without = -torch.cat(lp_without)
    nll_with = -torch.cat(lp_with)
    buckets, _ = difficulty_buckets(nll_without, nll_with, n_buckets)
    gain = nll_without - nll_with
    return PerplexityResult(
        n_documents=len(documents),
        n_windows=len(windows),
        n_tokens=int(nll_without.numel()),
        perplexity_without=math.exp(float(nll_without.mean())),
        perplexity_with=math.exp(float(nll_with.mean())),
        mean_gain=float(gain.mean()),
        fraction_improved=float((gain > 0).double().mean()),
        mean_mixing_weight=float(torch.cat(weights).double().mean()),
        buckets=buckets,
        nll_without=nll_without,
        nll_with=nll_with,
        windows=details,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _tensor_names(directory: Path) -> set[str] | None:
    """The tensor names of a checkpoint directory without loading it (None: cannot tell)."""
    names: set[str] = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            names |= set(json.loads((directory / index).read_text()).get("weight_map", {}))
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as st:
                names |= set(st.keys())
    return names or None


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
) -> QuietStarForCausalLM:
    """A model to evaluate, from ``spec``:

    * ``"tiny"``: the random tiny Mistral of :mod:`qstar.tiny` with the ``tiny-demo`` method (its
      mixing head is zero, so with and without thoughts agree: for trying the harness out);
    * a directory of ``QuietStarForCausalLM.save_pretrained`` (or a trainer checkpoint or output
      directory: its ``model/``, via ``latest``);
    * a directory in the authors' layout (``from_authors_checkpoint``, e.g. ``quietstar-8-ahead``);
    * any other HF causal LM path or name: wrapped with the ``default`` method and a zero mixing
      head, i.e. the untrained baseline (with = without).

    ``tokenizer``: a tokenizer path or name that replaces the model's.
    """
    from .config import get_preset
    from .train import RunConfig, build_model

    path = Path(spec).expanduser()
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    if spec == "tiny":
        model = build_model(RunConfig(model="tiny"), get_preset("tiny-demo").method, seed)
    else:
        if (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()
        if (path / "model" / CONFIG_NAME).is_file():
            path = path / "model"
        if (path / CONFIG_NAME).is_file():
            model = QuietStarForCausalLM.from_pretrained(path)
        elif (
            path.is_dir()
            and (names := _tensor_names(path)) is not None
            and ("start_embedding" in names or any(n.startswith("talk_head.") for n in names))
        ):
            model = QuietStarForCausalLM.from_authors_checkpoint(path, tokenizer=tok, dtype=dtype)
        else:
            log.warning(
                "--model %r has no Quiet-STaR heads: evaluating it with a zero mixing head (with thoughts "
                "= without)",
                spec,
            )
            try:
                model = build_model(RunConfig(model=spec), get_preset("default").method, seed)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"--model {spec!r}: not 'tiny', not a Quiet-STaR or authors' checkpoint directory, and "
                    f"loading it as a Hugging Face causal LM failed ({type(err).__name__}: {err})"
                ) from err
    if tok is not None:
        model.tokenizer = tok
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Report and plot
# --------------------------------------------------------------------------------------------------


def plot_report(report: dict, png_path: Path) -> Path:
    """One panel per measure: bars without/with thoughts for the direct metrics, CoT and the
    perplexities; the mean gain from thinking per difficulty bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    pairs = []  # (title, [(label, without, with)])
    direct = [
        (t, tasks[t]["without_thoughts"], tasks[t]["with_thoughts"]) for t in ("gsm8k", "csqa") if t in tasks
    ]
    if direct:
        pairs.append(("zero-shot direct (expected accuracy)", direct))
    if "gsm8k-cot" in tasks:
        cot = tasks["gsm8k-cot"]
        pairs.append(
            (f"zero-shot CoT maj@{cot['votes']}", [("gsm8k", cot["without_thoughts"], cot["with_thoughts"])])
        )
    ppl = tasks.get("perplexity")
    if ppl is not None:
        pairs.append(
            ("perplexity", [(Path(str(ppl["data"])).name, ppl["perplexity_without"], ppl["perplexity_with"])])
        )
    n_panels = len(pairs) + (ppl is not None)
    fig, axes = plt.subplots(1, max(1, n_panels), figsize=(5 * max(1, n_panels), 4), squeeze=False)
    axes = list(axes[0])
    for ax, (title, rows) in zip(axes, pairs):
        x = list(range(len(rows)))
        for k, (offset, label, color) in enumerate(
            ((-0.2, "without thoughts", "tab:gray"), (0.2, "with thoughts", "tab:blue"))
        ):
            bars = ax.bar(
                [i + offset for i in x], [r[1 + k] for r in rows], width=0.4, label=label, color=color
            )
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(x, [r[0] for r in rows])
        ax.set_xlim(-0.8, len(rows) - 0.2)
        top = max(max(r[1], r[2]) for r in rows)
        ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)
        ax.set_title(title)
        ax.legend(fontsize=8)
    if ppl is not None:
        ax = axes[-1]
        buckets = ppl["buckets"]
        gains = [b["mean_gain"] for b in buckets]
        ax.bar(range(len(gains)), gains, color=["tab:green" if g >= 0 else "tab:red" for g in gains])
        ax.set_xticks(
            range(len(gains)),
            [f"{b['nll_low']:.2f}-{b['nll_high']:.2f}" for b in buckets],
            rotation=30,
            fontsize=8,
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title("gain from thinking by difficulty")
        ax.set_xlabel("no-thought NLL bucket (nats; equal-count quantiles)")
        ax.set_ylabel("mean log p_with - log p_without")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Quiet-STaR evaluation: {report['model']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"{flag} must be comma-separated token ids, got {text!r}") from err


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="qstar-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a save_pretrained / checkpoint / output directory, the "
                   "authors' checkpoint directory, an HF model (zero mixing head), or 'tiny'")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="a tokenizer path or name replacing the model's")
    p.add_argument("--tasks", default="gsm8k,csqa", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--gsm8k", default="gsm8k", help="GSM8K .jsonl file or datasets name (default gsm8k)")
    p.add_argument("--gsm8k-config", default="main", help="the datasets config of --gsm8k (default main)")
    p.add_argument("--gsm8k-split", default="test")
    p.add_argument("--csqa", default="tau/commonsense_qa", help="CommonsenseQA .jsonl file or datasets name")
    p.add_argument("--csqa-config", default=None)
    p.add_argument("--csqa-split", default="validation")
    p.add_argument("--text", default=None, help="perplexity: a .txt (blank-line separated) or .jsonl file")
    p.add_argument("--text-field", default="text", help="the text field of --text .jsonl records")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N examples (documents) per task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward / generate call")
    p.add_argument("--max-length", type=int, default=256, help="tokens per prompt (last kept) / text window")
    p.add_argument("--digit-ids", default=None, help="override the numeric allowed ids (comma-separated)")
    p.add_argument("--letter-ids", default=None, help="override the letter allowed ids (comma-separated)")
    p.add_argument("--thought-temperature", type=float, default=None,
                   help="eval thought temperature (default: the model config's; authors: 1)")  # fmt: skip
    p.add_argument("--cot-votes", type=int, default=8, help="samples per question for the majority vote")
    p.add_argument("--cot-max-new-tokens", type=int, default=384, help="rationale tokens per sample")
    p.add_argument("--cot-answer-tokens", type=int, default=12, help="tokens after the final-answer text")
    p.add_argument("--cot-temperature", type=float, default=0.9)
    p.add_argument("--cot-limit", type=int, default=128, help="CoT questions (the authors' 128)")
    p.add_argument("--cot-shuffle-seed", type=int, default=42, help="datasets-shuffle seed; -1: no shuffle")
    p.add_argument("--buckets", type=int, default=5, help="perplexity: difficulty buckets (quantiles)")
    p.add_argument("--seed", type=int, default=0, help="thought and sample randomness")
    p.add_argument("--output-dir", default="runs/eval")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads on the CPU")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _check_args(args) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown task(s) {unknown or tasks!r}; choose from {', '.join(TASKS)}")
    if "perplexity" in tasks and not args.text:
        raise ValueError("--tasks perplexity needs --text (a .txt or .jsonl file)")
    for flag in ("limit", "cot_limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    for flag in ("batch_size", "cot_votes", "cot_max_new_tokens", "cot_answer_tokens", "buckets"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_length < 3:
        raise ValueError(f"--max-length must be >= 3, got {args.max_length}")
    if args.cot_temperature < 0:
        raise ValueError(f"--cot-temperature must be >= 0, got {args.cot_temperature}")
    if args.thought_temperature is not None and args.thought_temperature < 0:
        raise ValueError(f"--thought-temperature must be >= 0, got {args.thought_temperature}")
    return list(dict.fromkeys(tasks))


def _direct_report(res: DirectResult, source: str) -> dict:
    return {
        "metric": "zero-shot direct: mean over examples of the product of the gold answer tokens' "
        "probabilities renormalised over the allowed set (the authors' eval_helpers.compute_metrics)",
        "data": source,
        "n": len(res.examples),
        "without_thoughts": res.without_thoughts,
        "with_thoughts": res.with_thoughts,
        "allowed_ids": asdict(res.answer_tokens),
        "n_truncated": res.n_truncated,
        "seconds": res.seconds,
        "examples": [asdict(e) for e in res.examples],
    }


def _cot_report(args, order: list[int], without: CotResult, with_: CotResult) -> dict:
    examples = []
    for i, a, b in zip(order, without.examples, with_.examples):
        row = {"dataset_index": i, "gold": a["gold"]}
        for suffix, ex in (("without", a), ("with", b)):
            row.update({f"{k}_{suffix}": ex[k] for k in ("majority", "correct", "votes", "texts")})
        examples.append(row)
    return {
        "metric": f"zero-shot CoT: the majority of {args.cot_votes} samples equals the gold number "
        "(the authors' zero-shotcot-eval.py)",
        "data": args.gsm8k,
        "n": len(order),
        "votes": args.cot_votes,
        "without_thoughts": without.accuracy,
        "with_thoughts": with_.accuracy,
        "seconds": {"without": without.seconds, "with": with_.seconds},
        "examples": examples,
    }


def _perplexity_report(res: PerplexityResult, source: str) -> dict:
    return {
        "metric": "per-token NLL without and with thoughts; gain = log p_with - log p_without",
        "data": source,
        "n_documents": res.n_documents,
        "n_windows": res.n_windows,
        "n_tokens": res.n_tokens,
        "nll_without": float(res.nll_without.mean()),
        "nll_with": float(res.nll_with.mean()),
        "perplexity_without": res.perplexity_without,
        "perplexity_with": res.perplexity_with,
        "mean_gain": res.mean_gain,
        "fraction_improved": res.fraction_improved,
        "mean_mixing_weight": res.mean_mixing_weight,
        "bucketing": f"{len(res.buckets)} equal-count quantile buckets of the no-thought NLL, easiest "
        "first (ties split by position)",
        "buckets": [asdict(b) for b in res.buckets],
        "seconds": res.seconds,
        "windows": res.windows,
    }


def run(args) -> dict:
    """Run the tasks of parsed ``args``; write ``eval.json`` (and ``eval.png``) to ``--output-dir``."""
    tasks = _check_args(args)
    t_start = time.perf_counter()
    # Read the data first: a bad file fails before the model loads.
    data: dict = {}
    if "gsm8k" in tasks or "gsm8k-cot" in tasks:
        data["gsm8k"] = load_gsm8k(args.gsm8k, config=args.gsm8k_config, split=args.gsm8k_split)
    if "csqa" in tasks:
        data["csqa"] = load_csqa(args.csqa, config=args.csqa_config, split=args.csqa_split)
    if "perplexity" in tasks:
        data["text"] = load_texts(args.text, text_field=args.text_field)
    digit_ids = _int_list(args.digit_ids, "--digit-ids")
    letter_ids = _int_list(args.letter_ids, "--letter-ids")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, device=device, dtype=dtype, seed=args.seed, tokenizer=args.tokenizer)
    if args.thought_temperature is not None:
        model.config.eval_thought_temperature = float(args.thought_temperature)
    tok = _require_tokenizer(model)
    progress = not args.no_progress

    def gen(offset: int) -> torch.Generator:
        """One generator per task: each task's randomness does not depend on the others."""
        return torch.Generator(device=device).manual_seed(args.seed + offset)

    def limited(items: list) -> list:
        return items if args.limit is None else items[: args.limit]

    report: dict = {
        "model": args.model,
        "model_info": {
            "n_thought_tokens": model.config.n_thought_tokens,
            "eval_thought_temperature": model.config.eval_thought_temperature,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
        },
        "settings": {**vars(args), "tasks": tasks},
        "versions": {"torch": torch.__version__},
        "tasks": {},
    }
    direct = {
        "gsm8k": lambda r: gsm8k_direct_prompt(r["question"], r["answer"]),
        "csqa": lambda r: csqa_direct_prompt(r["question"], r["choices"], r["answerKey"]),
    }
    if "gsm8k" in tasks or "csqa" in tasks:
        derived = answer_token_ids(tok) if digit_ids is None or letter_ids is None else None
        allowed = AnswerTokens(
            numeric=digit_ids if digit_ids is not None else derived.numeric,
            letters=letter_ids if letter_ids is not None else derived.letters,
        )
    for offset, (name, prompt) in enumerate(direct.items()):
        if name not in tasks:
            continue
        res = evaluate_direct(
            model,
            [prompt(r) for r in limited(data[name])],
            answer_tokens=allowed,
            batch_size=args.batch_size,
            max_length=args.max_length,
            generator=gen(offset),
            progress=progress,
            desc=name,
        )
        report["tasks"][name] = _direct_report(res, getattr(args, name))
        log.info(
            "%s zero-shot direct: %.4f without, %.4f with thoughts",
            name,
            res.without_thoughts,
            res.with_thoughts,
        )
    if "gsm8k-cot" in tasks:
        recs = data["gsm8k"]
        order = shuffled_indices(len(recs), None if args.cot_shuffle_seed < 0 else args.cot_shuffle_seed)
        order = limited(order[: args.cot_limit])
        questions = [recs[i]["question"] for i in order]
        golds = [gsm8k_gold(recs[i]["answer"]) for i in order]
        kw = dict(
            votes=args.cot_votes,
            max_new_tokens=args.cot_max_new_tokens,
            answer_tokens=args.cot_answer_tokens,
            temperature=args.cot_temperature,
            batch_size=args.batch_size,
            progress=progress,
        )
        without = evaluate_cot(model, questions, golds, think=False, generator=gen(2), **kw)
        with_ = evaluate_cot(model, questions, golds, think=True, generator=gen(2), **kw)
        report["tasks"]["gsm8k-cot"] = _cot_report(args, order, without, with_)
        log.info(
            "gsm8k CoT maj@%d: %.4f without, %.4f with thoughts",
            args.cot_votes,
            without.accuracy,
            with_.accuracy,
        )
    if "perplexity" in tasks:
        res = evaluate_perplexity(
            model,
            limited(data["text"]),
            max_length=args.max_length,
            batch_size=args.batch_size,
            n_buckets=args.buckets,
            generator=gen(3),
            progress=progress,
        )
        report["tasks"]["perplexity"] = _perplexity_report(res, args.text)
        log.info(
            "perplexity: %.4f without, %.4f with thoughts; mean gain %+.4f nats/token",
            res.perplexity_without, res.perplexity_with, res.mean_gain,
        )  # fmt: skip
    report["seconds"] = time.perf_counter() - t_start
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not args.no_plot:
        plot_report(report, out / "eval.png")
    log.info("wrote %s", out / "eval.json")
    return report


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parse_args(argv))


def cli() -> int:
    """The ``qstar-eval`` console script: exit status 0 on success."""
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
