"""Generation with thoughts: a KV cache for the text, a private branch for each thought.

The authors generate by re-running the whole training forward over the entire sequence for every
new token (``quietstar.md`` section 11.1). But the prediction at position ``j`` depends only on the
text up to ``j`` and on the thought at ``j``, so only the newest position needs a thought. Per new
token this module:

1. feeds ``[x_j, <start>]`` in one decoder call: the text token enters the cache (its output is the
   base state ``h_j``) and ``<start>`` opens the thought at position ``j`` (position ids ``p_j`` and
   ``p_j + 1``, as in the rollout's ``j + a``);
2. samples ``t_1 .. t_n`` one decoder call each (``t_a`` from the output of the ``a``-th input),
   the meta tokens banned, at the thought temperature;
3. feeds ``[t_n, <end>]`` in one call; the ``<end>`` output is the thought state;
4. mixes ``w = head([h_j ; h_end])``, ``logits = ((1 - w) h_j + w h_end) W^T``, samples ``x_{j+1}``
   (meta tokens never), and drops the thought's keys and values from the cache.

That is ``n + 1`` decoder calls per token for ``n`` thought tokens, where the thought alone has
``n + 2`` tokens: the text token shares a call with ``<start>``, and ``t_n`` with ``<end>``. Each
thought token attends to the text up to ``j`` and to its own thought, exactly as in the parallel
rollout (causal over the text plus one diagonal per step), so the logits equal those of the eval-mode
training forward for the same text and the same thought (``tests/test_generate.py``).

Public entry points: :func:`generate` (``qstar.generate``, also ``QuietStarForCausalLM.generate``)
and :func:`stream` (``qstar.stream``, an iterator of :class:`GenerationStep`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qstar_kernels import sample_thought_tokens

from .cache import ThoughtBranchCache
from .model import QuietStarForCausalLM, mix_hidden, mixed_logits

__all__ = ["GenerationOutput", "GenerationStep", "generate", "stream"]


@dataclass
class GenerationStep:
    """One new token for every row, as :func:`stream` yields it.

    Attributes:
        index: 0 for the first new token, then 1, 2, ...
        tokens: ``(B,)`` int64 the new token of each row (the pad id for rows already finished).
        texts: the new text of each row (``""`` for finished rows), or None without a tokenizer.
        thoughts: ``(B, n)`` int64 the thought behind each new token (None with ``think=False``).
        thought_texts: the thoughts decoded, or None.
        mixing_weights: ``(B,)`` float32 the mixing head's ``w`` (None with ``think=False``).
        logits: ``(B, V)`` float32 the mixed logits the token was drawn from (before temperature,
            top-k/top-p and the ban of the meta tokens).
        finished: ``(B,)`` bool, rows that are done after this token.
        finish_reasons: per row ``None`` (still running), ``"eos"``, ``"stop"`` or ``"length"``.
    """

    index: int
    tokens: torch.Tensor
    texts: list[str] | None
    thoughts: torch.Tensor | None
    thought_texts: list[str] | None
    mixing_weights: torch.Tensor | None
    logits: torch.Tensor
    finished: torch.Tensor
    finish_reasons: list[str | None]


@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        sequences: ``(B, P + T)`` int64: the left-padded prompt, then the ``T`` new tokens (the pad id
            after a row finished).
        new_tokens: ``(B, T)`` int64, the generated part of ``sequences``.
        lengths: generated tokens per row, counting the EOS or the token that completed a stop string.
        texts: the generated text of each row (special tokens skipped; cut right after a stop
            string), or None without a tokenizer.
        finish_reasons: ``"eos"``, ``"stop"`` or ``"length"`` per row.
        thoughts: ``(B, T, n)`` int64 the thought behind each generated token, with
            ``return_thoughts=True``; else None.
        thought_texts: per row, the decoded thought of each generated token (``return_thoughts``
            and a tokenizer); else None.
        mixing_weights: ``(B, T)`` float32 ``w`` at each generated token (None with ``think=False``).
        logits: ``(B, T, V)`` float32 mixed logits of each step, with ``output_logits=True``.
    """

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    lengths: list[int]
    texts: list[str] | None
    finish_reasons: list[str]
    thoughts: torch.Tensor | None = None
    thought_texts: list[list[str]] | None = None
    mixing_weights: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        """``P``, the (left-padded) prompt's columns in ``sequences``."""
        return self.sequences.shape[1] - self.new_tokens.shape[1]


def _check_number(name: str, value, *, low: float, high: float | None = None, integer=False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        kind = "an int" if integer else "a finite number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value!r}")


def _prepare_prompt(model, input_ids, attention_mask, tokenizer):
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


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering of ``(B, V)`` logits: the rest set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sample_text(logits, banned, temperature, top_k, top_p, generator) -> torch.Tensor:
    z = logits.clone()
    z[:, banned] = float("-inf")
    if temperature == 0:
        return z.argmax(-1)
    z = _filter_logits(z / temperature, top_k, top_p)
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class _Streamer:
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


def stream(
    model: QuietStarForCausalLM,
    input_ids,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    n_thought_tokens: int | None = None,
    think: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    thought_temperature: float | None = None,
    eos_token_id: int | Sequence[int] | None = -1,
    stop_strings: str | Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    tokenizer=None,
) -> Iterator[GenerationStep]:
    """Generate with a thought before every token, yielding one :class:`GenerationStep` per token.

    Same arguments as :func:`generate` (without the output options). Stops when every row has
    finished or after ``max_new_tokens``.
    """
    steps = _steps(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        n_thought_tokens=n_thought_tokens,
        think=think,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        thought_temperature=thought_temperature,
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        generator=generator,
        tokenizer=tokenizer,
        state={},
    )
    return steps


def _steps(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens,
    n_thought_tokens,
    think,
    temperature,
    top_k,
    top_p,
    thought_temperature,
    eos_token_id,
    stop_strings,
    generator,
    tokenizer,
    state: dict,
    decode_steps: bool = True,
) -> Iterator[GenerationStep]:
    """Check every argument and the prompt now, then return the generator of steps."""
    if not isinstance(model, QuietStarForCausalLM):
        raise TypeError(f"model must be a QuietStarForCausalLM, got {type(model).__name__}")
    cfg = model.config
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    _check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
    n = cfg.n_thought_tokens if n_thought_tokens is None else n_thought_tokens
    if think:
        _check_number("n_thought_tokens", n, low=1, integer=True)
    _check_number("temperature", temperature, low=0)
    _check_number("top_k", top_k, low=0, integer=True)
    _check_number("top_p", top_p, low=0, high=1)
    if top_p == 0:
        raise ValueError("top_p must be > 0 (1.0 disables nucleus filtering), got 0")
    t_think = cfg.eval_thought_temperature if thought_temperature is None else thought_temperature
    _check_number("thought_temperature", t_think, low=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings or [])
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    decode_steps = decode_steps and tokenizer is not None
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (the model has none): pass tokenizer=")
    if eos_token_id == -1:  # the default: the tokenizer's / base config's EOS
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.base_model.config, "eos_token_id", None)
    eos_ids = (
        []
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    )

    ids, keep = _prepare_prompt(model, input_ids, attention_mask, tokenizer)
    B, P = ids.shape
    device = ids.device
    state["prompt"] = ids
    decoder = model.decoder
    dec_cfg = getattr(decoder, "config", model.base_model.config)
    branch = n + 2 if think else 0
    window = getattr(dec_cfg, "sliding_window", None)
    if window and P + max_new_tokens + branch > window:
        raise ValueError(
            f"prompt ({P}) + max_new_tokens ({max_new_tokens}) + thought ({branch}) tokens exceed the "
            f"model's sliding_window {window}: generation measures the window over the text and thought "
            "alike, training over the text only, so they would differ. Shorten the prompt or max_new_tokens"
        )

    @torch.no_grad()  # on a generator function: grad mode is switched around each step only
    def run_steps():
        cache = ThoughtBranchCache(dec_cfg, capacity=P + max_new_tokens + branch)
        W = model.lm_head_weight
        embed = model.base_model.get_input_embeddings()  # text tokens, as the rollout's step 0
        E = embed.weight

        def embed_thought(t: torch.Tensor) -> torch.Tensor:
            """Thought-token inputs: the rollout's ``E[t]`` (a gather: the one-hot product of the
            ``paper`` preset gives the same values, at V times the cost)."""
            return F.embedding(t[:, None], E)

        scale = cfg.meta_embedding_scale
        start_vec = (model.start_embedding[0] * scale).view(1, 1, -1)
        end_vec = (model.end_embedding[0] * scale).view(1, 1, -1)
        banned = [model.start_id, model.end_id]
        positions = (keep.long().cumsum(1) - 1).clamp_min(0)  # (B, P)
        text_keep = keep  # (B, text length) grows by one column per token

        def run(embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            """One decoder call on ``embeds`` (B, k, H) at position ids ``pos`` (B, k)."""
            k = embeds.shape[1]
            # text_keep covers the committed text and the text tokens of this call; every other key
            # (the thought in the cache, the thought tokens of this call) is real.
            n_keys = cache.get_seq_length() + k
            extra = n_keys - text_keep.shape[1]
            mask = torch.cat([text_keep, torch.ones(B, extra, dtype=torch.bool, device=device)], dim=1)
            assert mask.shape[1] == n_keys
            out = decoder(
                inputs_embeds=embeds,
                attention_mask=mask.long(),
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            return out.last_hidden_state

        def decode(tokens: list[int]) -> str:
            return tokenizer.decode(tokens, skip_special_tokens=True)

        prompt_rows = [ids[b][keep[b]].tolist() for b in range(B)] if tokenizer is not None else []
        prompt_texts = [decode(r) for r in prompt_rows]

        def decode_new(b: int, tokens: list[int]) -> str:
            """The text of row b's new tokens as they read after the prompt: decoded together with
            the prompt (SentencePiece drops a leading space of a sequence's first token)."""
            full = decode(prompt_rows[b] + tokens)
            if full.startswith(prompt_texts[b]):
                return full[len(prompt_texts[b]) :]
            return decode(tokens)

        generated: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        reasons: list[str | None] = [None] * B

        # Prefill: the prompt, and <start> at the last position when thinking.
        text_embeds = embed(ids)
        last_pos = positions[:, -1:]  # (B, 1) position id of the newest text token
        if think:
            h = run(
                torch.cat([text_embeds, start_vec.expand(B, 1, -1).to(text_embeds.dtype)], 1),
                torch.cat([positions, last_pos + 1], 1),
            )
            cache.commit_text(P)
            h_base, h_think = h[:, P - 1], h[:, P]
        else:
            h = run(text_embeds, positions)
            cache.commit_text(P)
            h_base, h_think = h[:, P - 1], None

        for index in range(max_new_tokens):
            thought = None
            w = None
            if think:
                toks = []
                for a in range(1, n + 1):
                    t, _ = sample_thought_tokens(
                        h_think, W, banned_ids=banned, temperature=t_think, generator=generator
                    )
                    toks.append(t)
                    if a < n:
                        h_think = run(embed_thought(t), last_pos + a + 1)[:, 0]
                thought = torch.stack(toks, 1)  # (B, n)
                h_end = run(
                    torch.cat([embed_thought(toks[-1]), end_vec.expand(B, 1, -1).to(text_embeds.dtype)], 1),
                    torch.cat([last_pos + n + 1, last_pos + n + 2], 1),
                )[:, 1]
                w = model.mixing_head(torch.cat([h_base, h_end], dim=-1))  # (B, 1)
                logits = mixed_logits(mix_hidden(h_base, h_end, w), W)  # (B, V)
                cache.drop_branch()
            else:
                logits = mixed_logits(h_base, W)  # the base model's own logits
            x = _sample_text(logits, banned, temperature, top_k, top_p, generator)
            x = torch.where(finished, torch.full_like(x, model.pad_token_id), x)
            newly = torch.zeros(B, dtype=torch.bool, device=device)
            new_texts: list[str] | None = [""] * B if decode_steps else None
            for b in range(B):
                if bool(finished[b]):
                    continue
                tok = int(x[b])
                generated[b].append(tok)
                if decode_steps:
                    full = decode_new(b, generated[b])
                    hit = None
                    for s in stop_strings:
                        # Only a match that the new token completed (earlier text was checked before).
                        pos_s = full.find(s, max(0, len(texts[b]) - len(s) + 1))
                        if pos_s >= 0 and (hit is None or pos_s < hit[0]):
                            hit = (pos_s, s)
                    if hit is not None:
                        full = full[: hit[0] + len(hit[1])]
                        reasons[b] = "stop"
                    new_texts[b] = full[len(texts[b]) :] if full.startswith(texts[b]) else full
                    texts[b] = full
                if reasons[b] is None and tok in eos_ids:
                    reasons[b] = "eos"
                if reasons[b] is not None:
                    newly[b] = True
            finished = finished | newly
            if index + 1 == max_new_tokens:
                for b in range(B):
                    if reasons[b] is None:
                        reasons[b] = "length"
                finished = torch.ones_like(finished)
            thought_texts = None
            if think and decode_steps:
                thought_texts = [decode(thought[b].tolist()) for b in range(B)]
            yield GenerationStep(
                index=index,
                tokens=x,
                texts=new_texts,
                thoughts=thought,
                thought_texts=thought_texts,
                mixing_weights=None if w is None else w.view(B).float(),
                logits=logits,
                finished=finished.clone(),
                finish_reasons=list(reasons),
            )
            if bool(finished.all()):
                break
            # The new text token enters the cache; with thinking, <start> opens its thought in the same call.
            text_keep = torch.cat([text_keep, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
            last_pos = last_pos + 1
            if think:
                h = run(
                    torch.cat([embed(x[:, None]), start_vec.expand(B, 1, -1).to(text_embeds.dtype)], 1),
                    torch.cat([last_pos, last_pos + 1], 1),
                )
                h_base, h_think = h[:, 0], h[:, 1]
            else:
                h_base = run(embed(x[:, None]), last_pos)[:, 0]
            cache.commit_text(1)
        if tokenizer is not None and not decode_steps:
            texts = [decode_new(b, g) for b, g in enumerate(generated)]
        state["texts"] = texts
        state["reasons"] = reasons
        state["generated"] = generated

    return run_steps()


def generate(
    model: QuietStarForCausalLM,
    input_ids,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    n_thought_tokens: int | None = None,
    think: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    thought_temperature: float | None = None,
    eos_token_id: int | Sequence[int] | None = -1,
    stop_strings: str | Sequence[str] | None = None,
    streamer: Callable[[GenerationStep], None] | object | None = None,
    return_thoughts: bool = False,
    output_logits: bool = False,
    generator: torch.Generator | None = None,
    tokenizer=None,
    progress: bool = False,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens, thinking before each one.

    Args:
        model: a :class:`QuietStarForCausalLM` (eval or train mode: generation never trains).
        input_ids: ``(B, P)`` token ids (left or right padded, with ``attention_mask``), or a string,
            or a list of strings (tokenised with the model's tokenizer, left padded).
        attention_mask: ``(B, P)`` 1/True for real tokens; None: all real.
        max_new_tokens: the most tokens to generate per row.
        n_thought_tokens: thought tokens between ``<start>`` and ``<end>`` (default: the config's).
        think: False generates from the base model alone (no thought, no mixing): the baseline.
        temperature: text sampling temperature; 0 is greedy.
        top_k, top_p: text filtering (0 / 1.0 switch them off).
        thought_temperature: thought sampling temperature (default the config's
            ``eval_thought_temperature``; 0 is greedy).
        eos_token_id: id(s) that end a row; default the tokenizer's (or the base config's) EOS; None: never.
        stop_strings: a row ends when its generated text contains one (needs a tokenizer).
        streamer: called with each :class:`GenerationStep`, or a transformers streamer (``put``/``end``,
            one prompt), e.g. ``TextStreamer(tokenizer, skip_prompt=True)``.
        return_thoughts: also return the thought behind every generated token.
        output_logits: also return the ``(B, T, V)`` mixed logits of each step.
        generator: a ``torch.Generator`` for reproducible text and thought samples.
        tokenizer: overrides ``model.tokenizer`` for text prompts, stop strings and decoding.
        progress: show a tqdm bar over the new tokens.

    The meta tokens are never sampled, neither in a thought nor as text.
    """
    if not isinstance(model, QuietStarForCausalLM):
        raise TypeError(f"model must be a QuietStarForCausalLM, got {type(model).__name__}")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    state: dict = {}
    steps = _steps(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        n_thought_tokens=n_thought_tokens,
        think=think,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        thought_temperature=thought_temperature,
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        generator=generator,
        tokenizer=tokenizer,
        state=state,
        # Per-step decoding only where someone reads it (a callback) or stop strings need it.
        decode_steps=bool(stop_strings) or (callable(streamer) and not hasattr(streamer, "put")),
    )
    sink = _Streamer(streamer, state["prompt"].shape[0])
    if sink.hf is not None:
        sink.hf.put(state["prompt"].cpu())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok")
    tokens, thoughts, weights, logits_all = [], [], [], []
    for step in steps:
        tokens.append(step.tokens)
        if return_thoughts and step.thoughts is not None:
            thoughts.append(step.thoughts)
        if step.mixing_weights is not None:
            weights.append(step.mixing_weights)
        if output_logits:
            logits_all.append(step.logits)
        if sink.callback is not None:
            sink.callback(step)
        elif sink.hf is not None:
            sink.hf.put(step.tokens.cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if sink.hf is not None:
        sink.hf.end()
    new = torch.stack(tokens, 1)  # (B, T)
    generated = state["generated"]
    texts = state["texts"] if tokenizer is not None else None
    thought_tensor = torch.stack(thoughts, 1) if thoughts else None  # (B, T, n)
    thought_texts = None
    if thought_tensor is not None and tokenizer is not None:
        thought_texts = [
            [
                tokenizer.decode(thought_tensor[b, i].tolist(), skip_special_tokens=True)
                for i in range(len(generated[b]))
            ]
            for b in range(new.shape[0])
        ]
    return GenerationOutput(
        sequences=torch.cat([state["prompt"], new], 1),
        new_tokens=new,
        lengths=[len(g) for g in generated],
        texts=texts,
        finish_reasons=[r or "length" for r in state["reasons"]],
        thoughts=thought_tensor,
        thought_texts=thought_texts,
        mixing_weights=torch.stack(weights, 1) if weights else None,
        logits=torch.stack(logits_all, 1) if output_logits else None,
    )
