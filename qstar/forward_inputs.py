"""The input checks of ``QuietStarForCausalLM.forward``: one clear error for the first bad argument,
naming it, what was expected and what was given."""

from __future__ import annotations

import torch

__all__ = ["IGNORE", "check_forward_inputs", "check_labels"]

#: The label that no loss term counts (the HF convention).
IGNORE = -100


def check_forward_inputs(
    input_ids, attention_mask, labels, thought_tokens, *, n_talk: int, n_rationales: int,
    n_thought_tokens: int, vocab_size: int, meta_ids: tuple[int, int], device: torch.device,
) -> None:  # fmt: skip
    """Raise one clear error for the first bad argument of ``QuietStarForCausalLM.forward``."""
    n_rat = n_rationales
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (B, L) tensor, got {got}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device {device}, got {input_ids.device}")
    B, L = input_ids.shape
    if B == 0:
        raise ValueError(f"input_ids must hold at least one sequence (B >= 1), got shape {(B, L)}")
    if L < n_talk + 2:
        raise ValueError(
            f"input_ids must have at least n_talk_tokens + 2 = {n_talk + 2} positions (a reward needs a "
            f"full talk window), got L={L}"
        )
    V = vocab_size
    if B * L and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
        raise ValueError(
            f"input_ids must be ids in [0, {V}), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {(B, L)}, got {tuple(attention_mask.shape)}"
            )
        if attention_mask.device != device:
            raise ValueError(f"attention_mask must be on {device}, got {attention_mask.device}")
    if labels is not None:
        check_labels(labels, (B, L), V, device)
    if thought_tokens is not None:
        want = (n_thought_tokens, B * n_rat, L)
        if not isinstance(thought_tokens, torch.Tensor) or tuple(thought_tokens.shape) != want:
            got = tuple(thought_tokens.shape) if isinstance(thought_tokens, torch.Tensor) else thought_tokens
            raise ValueError(
                f"thought_tokens must have shape (n_thought_tokens, B * n_rationales, L) = {want}, got {got}"
            )
        if thought_tokens.dtype not in (torch.int64, torch.int32) or thought_tokens.device != device:
            raise ValueError(
                f"thought_tokens must be int64 on {device}, "
                f"got {thought_tokens.dtype} on {thought_tokens.device}"
            )
        if int(thought_tokens.min()) < 0 or int(thought_tokens.max()) >= V:
            raise ValueError(f"thought_tokens must be ids in [0, {V})")
        meta = (thought_tokens == meta_ids[0]) | (thought_tokens == meta_ids[1])
        if bool(meta.any()):
            raise ValueError(
                f"thought_tokens must not contain the meta tokens {meta_ids[0]} / {meta_ids[1]} "
                "(they are never sampled)"
            )


def check_labels(labels, shape: tuple[int, int], vocab_size: int, device) -> None:
    """``labels``: (B, L) integers on the model's device, each in [0, V) or IGNORE (-100)."""
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor with the shape of input_ids {shape}, got {got}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64, as in HF), got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels must be on the model's device {device}, got {labels.device}")
    V = vocab_size
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be ids in [0, {V}) or {IGNORE} (ignored), got {int(labels[bad][0])} "
            f"at {tuple(int(i) for i in bad.nonzero()[0])}"
        )
