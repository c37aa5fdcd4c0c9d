"""Evaluate a Quiet-STaR model with and without thoughts: ``python -m qstar.eval`` (``qstar-eval``).

    from qstar.eval import evaluate_direct, gsm8k_direct_prompt, load_model
    model = load_model("runs/x")
    res = evaluate_direct(model, [gsm8k_direct_prompt("2+2?", "#### 4")])
    res.without_thoughts, res.with_thoughts

One module per job:

* :mod:`~qstar.eval.data`: GSM8K / CommonsenseQA records and text documents, the prompts;
* :mod:`~qstar.eval.direct`: the authors' zero-shot direct metric (GSM8K, CommonsenseQA);
* :mod:`~qstar.eval.cot`: zero-shot chain of thought with a majority vote;
* :mod:`~qstar.eval.perplexity`: perplexity, and the gain from thinking by difficulty;
* :mod:`~qstar.eval.report`: ``eval.json``'s sections and ``eval.png``;
* :mod:`~qstar.eval.command`: the command line (tasks, flags, ``run``);
* :mod:`~qstar.eval.forward`: the eval-mode forward the tasks share.

The model comes from :func:`qstar.loading.load_model` (re-exported here).
"""

from ..loading import load_model
from .command import TASKS, cli, main, parse_args, run
from .cot import COT_END_STRINGS, CotResult, cut_at_end_string, evaluate_cot, majority_vote
from .data import (
    ANSWER_MARKER,
    COT_SUFFIX,
    FINAL_ANSWER_TEXT,
    cot_prompt,
    csqa_direct_prompt,
    extract_first_integer,
    gsm8k_direct_prompt,
    gsm8k_gold,
    load_csqa,
    load_gsm8k,
    load_texts,
    shuffled_indices,
)
from .direct import (
    DIGITS,
    LETTERS,
    MISTRAL_DIGIT_IDS,
    MISTRAL_LETTER_IDS,
    AnswerLocation,
    AnswerScore,
    AnswerTokens,
    DirectExample,
    DirectResult,
    ScoredToken,
    answer_token_ids,
    evaluate_direct,
    locate_answer,
    score_answer,
)
from .perplexity import (
    DifficultyBucket,
    PerplexityResult,
    difficulty_buckets,
    evaluate_perplexity,
    text_windows,
)
from .report import plot_report

__all__ = [
    "ANSWER_MARKER",
    "COT_END_STRINGS",
    "COT_SUFFIX",
    "DIGITS",
    "FINAL_ANSWER_TEXT",
    "LETTERS",
    "MISTRAL_DIGIT_IDS",
    "MISTRAL_LETTER_IDS",
    "TASKS",
    "AnswerLocation",
    "AnswerScore",
    "AnswerTokens",
    "CotResult",
    "DifficultyBucket",
    "DirectExample",
    "DirectResult",
    "PerplexityResult",
    "ScoredToken",
    "answer_token_ids",
    "cli",
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
    "main",
    "majority_vote",
    "parse_args",
    "plot_report",
    "run",
    "score_answer",
    "shuffled_indices",
    "text_windows",
]
