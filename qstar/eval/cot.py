"""Zero-shot chain of thought with a majority vote (the authors' ``zero-shotcot-eval.py``).

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
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..generation import stream
from ..model import QuietStarForCausalLM
from .data import FINAL_ANSWER_TEXT, cot_prompt, extract_first_integer
from .forward import progress_bar, require_tokenizer

#: a sample stops when its text holds one of these more than once (checked in this order).
COT_END_STRINGS = ("Q:", "\n\n\n")


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
    require_tokenizer(model)
    rows = [(q, v) for q in range(len(questions)) for v in range(votes)]
    texts: list[str] = []
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    starts = list(range(0, len(rows), batch_size))
    bar = progress_bar(len(starts), f"cot ({'with' if think else 'without'} thoughts)", progress)
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
