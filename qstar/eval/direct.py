"""The authors' zero-shot direct metric (GSM8K and CommonsenseQA), without and with thoughts.

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
  (``docs/evaluation.md``, "The authors' quirks"): pass ``--thought-temperature 1`` to match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..heads import mixed_logits
from ..model import QuietStarForCausalLM
from .data import ANSWER_MARKER
from .forward import eval_forward, progress_bar, require_tokenizer

#: the authors' hard-coded allowed ids for Mistral-7B (``eval_helpers.py``), for reference and tests.
MISTRAL_DIGIT_IDS = [28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774, 28734, 13]
MISTRAL_LETTER_IDS = [330, 365, 334, 384, 413, 13]
DIGITS = "1234567890"  # the authors' order
LETTERS = "ABCDE"


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
    think: bool = True,
) -> DirectResult:
    """The authors' zero-shot direct metric of ``prompts`` (each holding its gold answer after the
    last ``"\\nA:"``), without and with thoughts, from one eval forward per batch.

    The logits at the allowed ids are ``mixed_logits(hidden, W[allowed])`` of ``base_hidden``
    (without) and ``mixed_hidden`` (with): no vocabulary-sized tensor. ``think=False``: the base
    pass only, "with" equals "without" (:func:`~qstar.eval.forward.eval_forward`).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_length < 3:
        raise ValueError(f"--max-length must be >= 3, got {max_length}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    tok = require_tokenizer(model)
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
    bar = progress_bar(len(starts), desc, progress)
    try:
        for s in starts:
            rows = encoded[s : s + batch_size]
            out = eval_forward(model, rows, generator, output_hidden_states=True, think=think)
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
