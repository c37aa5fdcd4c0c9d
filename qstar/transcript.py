"""The text side of generation: the prompt in, each row's text out.

:func:`prepare_prompt` turns text or padded ids into left-aligned ids and a mask; :class:`Transcript`
keeps each row's new tokens and text, cuts at stop strings and records why a row finished;
:class:`Streamer` adapts the kinds of ``streamer=`` that :func:`qstar.generate` accepts. The decode
loop itself is :mod:`qstar.generation`.
"""

from __future__ import annotations

import torch

__all__ = ["Streamer", "Transcript", "prepare_prompt"]


def prepare_prompt(model, input_ids, attention_mask, tokenizer):
    """(ids, keep) on the model's device, left-aligned: every row's real tokens end at column P-1."""
    device = model.lm_head_weight.device
    if isinstance(input_ids, str) or (
        isinstance(input_ids, list | tuple) and input_ids and all(isinstance(s, str) for s in input_ids)
    ):
        if tokenizer is None:
            raise ValueError(
                "input_ids is text, but the model has no tokenizer: pass token ids, or a tokenizer="
            )
        if attention_mask is not None:
            raise ValueError("attention_mask must be None when input_ids is text (the tokenizer makes it)")
        texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
        encoded = [tokenizer.encode(t) for t in texts]
        if any(len(e) == 0 for e in encoded):
            raise ValueError("every prompt must encode to at least one token; got an empty prompt")
        P = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), P), model.pad_token_id, dtype=torch.int64)
        keep = torch.zeros(len(encoded), P, dtype=torch.bool)
        for i, e in enumerate(encoded):
            ids[i, P - len(e) :] = torch.tensor(e, dtype=torch.int64)
            keep[i, P - len(e) :] = True
        return ids.to(device), keep.to(device)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            "input_ids must be a (B, P) int64 tensor, a string or a list of strings, "
            f"got {type(input_ids).__name__}"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be (B, P) with B, P >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device {device}, got {input_ids.device}")
    V = model.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
        raise ValueError(
            f"input_ids must be ids in [0, {V}), "
            f"got values in [{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    B, P = input_ids.shape
    if attention_mask is None:
        keep = torch.ones(B, P, dtype=torch.bool, device=device)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, P):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, P)}, got {got}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask must be on {device}, got {attention_mask.device}")
        keep = attention_mask.to(torch.bool)
    counts = keep.sum(1)
    if bool((counts == 0).any()):
        raise ValueError(
            f"attention_mask: rows {(counts == 0).nonzero().flatten().tolist()} have no real token"
        )
    # Real tokens must be one contiguous run per row (left or right padding); move them to the right.
    first = keep.int().argmax(1)
    span = torch.arange(P, device=device).unsqueeze(0)
    contiguous = (keep == ((span >= first[:, None]) & (span < (first + counts)[:, None]))).all()
    if not bool(contiguous):
        raise ValueError(
            "attention_mask: each row's real tokens must be contiguous (left or right padding only)"
        )
    ids = torch.full((B, P), model.pad_token_id, dtype=torch.int64, device=device)
    aligned = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b in range(B):
        n = int(counts[b])
        f = int(first[b])
        ids[b, P - n :] = input_ids[b, f : f + n].to(torch.int64)
        aligned[b, P - n :] = True
    return ids, aligned


class Transcript:
    """Each row's generated tokens and text, and why it finished (EOS, a stop string, the length)."""

    def __init__(self, ids, keep, tokenizer, sp, pad_token_id: int, decode_steps: bool):
        B = ids.shape[0]
        self.tokenizer, self.sp, self.pad = tokenizer, sp, pad_token_id
        self.decode_steps = decode_steps and tokenizer is not None
        self.prompt_rows = [ids[b][keep[b]].tolist() for b in range(B)] if tokenizer is not None else []
        self.prompt_texts = [self.decode(r) for r in self.prompt_rows]
        self.generated: list[list[int]] = [[] for _ in range(B)]
        self.texts = [""] * B
        self.finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        self.reasons: list[str | None] = [None] * B

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def decode_new(self, b: int) -> str:
        """The text of row b's new tokens as they read after the prompt: decoded together with the
        prompt (SentencePiece drops a leading space of a sequence's first token)."""
        full = self.decode(self.prompt_rows[b] + self.generated[b])
        if full.startswith(self.prompt_texts[b]):
            return full[len(self.prompt_texts[b]) :]
        return self.decode(self.generated[b])

    def record(self, x: torch.Tensor, last: bool) -> tuple[torch.Tensor, list[str] | None]:
        """Add the new tokens ``x`` (B,); finished rows get the pad id. Returns ``(x, new texts)``."""
        x = torch.where(self.finished, torch.full_like(x, self.pad), x)
        newly = torch.zeros_like(self.finished)
        new_texts: list[str] | None = [""] * len(self.generated) if self.decode_steps else None
        for b in range(len(self.generated)):
            if bool(self.finished[b]):
                continue
            tok = int(x[b])
            self.generated[b].append(tok)
            if self.decode_steps:
                new_texts[b] = self._decode_step(b)
            if self.reasons[b] is None and tok in self.sp.eos_token_id:
                self.reasons[b] = "eos"
            newly[b] = self.reasons[b] is not None
        self.finished = self.finished | newly
        if last:
            self.reasons = [r or "length" for r in self.reasons]
            self.finished = torch.ones_like(self.finished)
        return x, new_texts

    def _decode_step(self, b: int) -> str:
        """Row b's text after its newest token, cut after a stop string that token completed."""
        full = self.decode_new(b)
        hit = None
        for s in self.sp.stop_strings:
            # Only a match that the new token completed (earlier text was checked before).
            pos = full.find(s, max(0, len(self.texts[b]) - len(s) + 1))
            if pos >= 0 and (hit is None or pos < hit[0]):
                hit = (pos, s)
        if hit is not None:
            full = full[: hit[0] + len(hit[1])]
            self.reasons[b] = "stop"
        new = full[len(self.texts[b]) :] if full.startswith(self.texts[b]) else full
        self.texts[b] = full
        return new

    def close(self) -> None:
        if self.tokenizer is not None and not self.decode_steps:
            self.texts = [self.decode_new(b) for b in range(len(self.generated))]


class Streamer:
    """Adapts the three kinds of ``streamer=``: a callable, an HF streamer (``put``/``end``), None."""

    def __init__(self, streamer, batch: int):
        self.callback = None
        self.hf = None
        if streamer is None:
            return
        if hasattr(streamer, "put") and hasattr(streamer, "end"):
            if batch != 1:
                raise ValueError(
                    f"an HF streamer (put/end) streams one sequence; got {batch} prompts. Pass a "
                    "callable streamer, or iterate qstar.stream(...)"
                )
            self.hf = streamer
        elif callable(streamer):
            self.callback = streamer
        else:
            raise TypeError(
                "streamer must be a callable taking a GenerationStep, or an object with put() and end() "
                f"(transformers' TextStreamer), got {type(streamer).__name__}"
            )
