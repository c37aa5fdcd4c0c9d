"""Perplexity without and with thoughts, and the gain from thinking by difficulty.

Perplexity: each document is tokenised with BOS and cut into consecutive windows of
``--max-length`` tokens (the first token of each window is context only); a ``.txt`` file's
documents are separated by blank lines (as for training, :mod:`qstar.data`), a ``.jsonl`` file has
one per line (``--text-field``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import QuietStarForCausalLM
from .forward import eval_forward, progress_bar, require_tokenizer


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
    think: bool = True,
) -> PerplexityResult:
    """Perplexity without and with thoughts, and the gain from thinking by difficulty bucket, from
    the eval forward's per-token ``base_logprobs`` and ``talk_logprobs``. ``think=False``: the base
    pass only, "with" equals "without" (:func:`~qstar.eval.forward.eval_forward`)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    tok = require_tokenizer(model)
    windows = text_windows(documents, tok, max_length)
    if not windows:
        raise ValueError("the text has no window of at least 2 tokens")
    was_training = model.training
    model.eval()
    lp_without, lp_with, weights, details = [], [], [], []
    t0 = time.perf_counter()
    starts = list(range(0, len(windows), batch_size))
    bar = progress_bar(len(starts), "perplexity", progress)
    try:
        for s in starts:
            chunk = windows[s : s + batch_size]
            out = eval_forward(model, [w[2] for w in chunk], generator, think=think)
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
