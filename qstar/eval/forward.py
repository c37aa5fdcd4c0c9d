"""What every task shares: the eval-mode forward on right-padded rows, the tokenizer check and
the progress bar."""

from __future__ import annotations

import torch

from ..model import QuietStarForCausalLM


def require_tokenizer(model: QuietStarForCausalLM):
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer (model.tokenizer is None); pass --tokenizer")
    return model.tokenizer


def eval_forward(
    model: QuietStarForCausalLM, rows: list[list[int]], generator, *, think: bool = True, **kwargs
):
    """One eval-mode forward on right-padded ``rows``; the outputs' row ``b`` is example ``b``.

    ``think=False`` runs the base pass alone (``forward(..., think=False)``) and fills the "with
    thoughts" fields with the plain ones (``talk_logprobs``, ``mixed_hidden``; ``mixing_weights``
    0): for a model whose mixing head is untrained (exactly 0), the same numbers as thinking, at
    a fraction of the cost.

    The eval forward runs ``eval_n_rationales`` copies of each sequence (rows ``b * P .. b * P +
    P - 1``); the first copy of each is kept (the authors evaluate with one rationale, ``P = 1``).
    Rows are padded to at least ``eval_n_talk_tokens + 2`` (the forward's shortest text).
    """
    cfg = model.config
    ids, mask = right_pad(rows, model.pad_token_id, min_length=max(3, cfg.eval_n_talk_tokens + 2))
    device = model.lm_head_weight.device
    if not think:
        out = model(ids.to(device), mask.to(device), think=False, **kwargs)
        out.talk_logprobs = out.base_logprobs.unsqueeze(0)  # (1, B, L)
        out.mixing_weights = torch.zeros_like(out.talk_logprobs)
        out.mixed_hidden = out.base_hidden
        return out
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


def right_pad(rows: list[list[int]], pad: int, min_length: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(min_length, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), L), dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[b, : len(r)] = 1
    return ids, mask


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled)
