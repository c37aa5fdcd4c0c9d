"""Generation with thoughts: a KV cache for the text, a private branch for each thought.

The authors generate by re-running the whole training forward over the entire sequence for every
new token (``docs/generation.md``, "How it differs from the authors' loop"). But the prediction at
position ``j`` depends only on the text up to ``j`` and on the thought at ``j``, so only the newest
position needs a thought. A plain decode loop, after a :class:`SamplingParams`:

1. **prefill** (and, per later token, **append**): feed ``[x_j, <start>]`` in one decoder call: the
   text token enters the cache (its output is the base state ``h_j``) and ``<start>`` opens the
   thought at position ``j`` (position ids ``p_j`` and ``p_j + 1``, as in the rollout's ``j + a``);
2. **think**: sample ``t_1 .. t_n`` one decoder call each (``t_a`` from the output of the ``a``-th
   input), the meta tokens banned, at the thought temperature; then feed ``[t_n, <end>]`` in one
   call (the ``<end>`` output is the thought state) and drop the thought from the cache;
3. **mix and sample**: ``w = head([h_j ; h_end])``, ``logits = ((1 - w) h_j + w h_end) W^T``,
   sample ``x_{j+1}`` (meta tokens never).

That is ``n + 1`` decoder calls per token for ``n`` thought tokens, where the thought alone has
``n + 2`` tokens: the text token shares a call with ``<start>``, and ``t_n`` with ``<end>``. Each
thought token attends to the text up to ``j`` and to its own thought, exactly as in the parallel
rollout (causal over the text plus one diagonal per step), so the logits equal those of the eval-mode
training forward for the same text and the same thought (``tests/test_generate.py``).

Public entry points: :func:`generate` (``qstar.generate``, also ``QuietStarForCausalLM.generate``)
and :func:`stream` (``qstar.stream``, an iterator of :class:`GenerationStep`). Both take the fields of
:class:`SamplingParams` as keywords (or ``params=SamplingParams(...)``). The model is duck-typed: this
module imports :mod:`qstar.heads` and :mod:`qstar.cache`, never :mod:`qstar.model`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qstar_kernels import sample_thought_tokens
from qstar_kernels.hf import cache_keyword

from .cache import ThoughtBranchCache
from .heads import mix_hidden, mixed_logits
from .transcript import Streamer, Transcript, prepare_prompt

__all__ = ["GenerationOutput", "GenerationStep", "SamplingParams", "generate", "stream"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the keywords that :func:`generate` and :func:`stream` share.

    Attributes:
        max_new_tokens: the most tokens to generate per row.
        n_thought_tokens: thought tokens between ``<start>`` and ``<end>`` (None: the config's).
        think: False generates from the base model alone (no thought, no mixing): the baseline.
        temperature: text sampling temperature; 0 is greedy.
        top_k, top_p: text filtering (0 / 1.0 switch them off).
        thought_temperature: thought sampling temperature (None: the config's
            ``eval_thought_temperature``; 0 is greedy).
        eos_token_id: id(s) that end a row; -1 (the default): the tokenizer's (or the base config's)
            EOS; None: never.
        stop_strings: a row ends when its generated text contains one (needs a tokenizer).

    :meth:`resolve` checks every field and fills the defaults from the model.
    """

    max_new_tokens: int
    n_thought_tokens: int | None = None
    think: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    thought_temperature: float | None = None
    eos_token_id: int | Sequence[int] | None = -1
    stop_strings: str | Sequence[str] | None = None

    def resolve(self, model, tokenizer) -> SamplingParams:
        """A copy with every default filled from ``model`` / ``tokenizer`` and every value checked:
        ``n_thought_tokens`` and ``thought_temperature`` numbers, ``eos_token_id`` a tuple of ids,
        ``stop_strings`` a tuple of strings. Raises naming the bad field."""
        cfg = model.config
        _check_number("max_new_tokens", self.max_new_tokens, low=1, integer=True)
        n = cfg.n_thought_tokens if self.n_thought_tokens is None else self.n_thought_tokens
        if self.think:
            _check_number("n_thought_tokens", n, low=1, integer=True)
        _check_number("temperature", self.temperature, low=0)
        _check_number("top_k", self.top_k, low=0, integer=True)
        _check_number("top_p", self.top_p, low=0, high=1)
        if self.top_p == 0:
            raise ValueError("top_p must be > 0 (1.0 disables nucleus filtering), got 0")
        t_think = (
            cfg.eval_thought_temperature if self.thought_temperature is None else self.thought_temperature
        )
        _check_number("thought_temperature", t_think, low=0)
        stops = [self.stop_strings] if isinstance(self.stop_strings, str) else list(self.stop_strings or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")
        if stops and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (the model has none): pass tokenizer=")
        eos = self.eos_token_id
        if eos == -1:  # the default: the tokenizer's / base config's EOS
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                eos = getattr(model.base_model.config, "eos_token_id", None)
        eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        return dataclasses.replace(
            self,
            n_thought_tokens=n,
            thought_temperature=t_think,
            eos_token_id=eos_ids,
            stop_strings=tuple(stops),
        )


_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _sampling_params(caller: str, params: SamplingParams | None, keywords: dict) -> SamplingParams:
    """``params`` with ``keywords`` on top (or built from ``keywords`` alone)."""
    unknown = sorted(set(keywords) - set(_SAMPLING_FIELDS))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {unknown}; the sampling keywords are "
            f"{list(_SAMPLING_FIELDS)}"
        )
    if params is None:
        if "max_new_tokens" not in keywords:
            raise TypeError(f"{caller}() needs max_new_tokens= (or params=SamplingParams(...))")
        return SamplingParams(**keywords)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams or None, got {type(params).__name__}")
    return dataclasses.replace(params, **keywords)


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


def _check_model(model) -> None:
    needed = ("config", "base_model", "decoder", "lm_head_weight", "mixing_head", "start_embedding")
    if not all(hasattr(model, name) for name in needed):
        raise TypeError(
            "model must be a QuietStarForCausalLM (a decoder, lm_head_weight, mixing_head and meta "
            f"embeddings), got {type(model).__name__}"
        )


def _refuse_meta_tokens(model, ids: torch.Tensor, keep: torch.Tensor) -> None:
    """A prompt may not hold the meta tokens: ``<start>``/``<end>`` mark the model's own thoughts (they
    enter as the trained meta embeddings, never as text), so in a prompt they would be the untrained
    vocabulary rows of those ids. A text prompt that spells their text (``<|startthought|>``) encodes
    to them with the model's tokenizer, and is refused too."""
    meta = ((ids == model.start_id) | (ids == model.end_id)) & keep
    if bool(meta.any()):
        row = int(meta.any(1).nonzero()[0, 0])
        cfg = model.config
        raise ValueError(
            f"prompt {row} contains a meta token ({cfg.start_token!r} id {model.start_id} / "
            f"{cfg.end_token!r} id {model.end_id}): meta tokens mark the model's own thoughts and cannot "
            "be part of a prompt; remove that text from the prompt"
        )


class _Decoder:
    """The decode state of one batch: the cache with its text mask, and what each stage needs of the
    model. ``B`` rows; the text of every row ends at the same column (left padding)."""

    def __init__(self, model, keep: torch.Tensor, sp: SamplingParams):
        self.model, self.sp = model, sp
        self.decoder = model.decoder
        dec_cfg = getattr(self.decoder, "config", model.base_model.config)
        B, P = keep.shape
        branch = sp.n_thought_tokens + 2 if sp.think else 0
        window = getattr(dec_cfg, "sliding_window", None)
        if window and P + sp.max_new_tokens + branch > window:
            raise ValueError(
                f"prompt ({P}) + max_new_tokens ({sp.max_new_tokens}) + thought ({branch}) tokens exceed "
                f"the model's sliding_window {window}: generation measures the window over the text and "
                "thought alike, training over the text only, so they would differ. Shorten the prompt or "
                "max_new_tokens"
            )
        max_pos = getattr(dec_cfg, "max_position_embeddings", None)
        if max_pos and P + sp.max_new_tokens + branch > max_pos:
            room = max_pos - P - branch
            fix = f"at most {room}" if room >= 1 else "a shorter prompt: the prompt alone fills them"
            raise ValueError(
                f"max_new_tokens ({sp.max_new_tokens}) + prompt ({P}) + thought ({branch}) tokens exceed the "
                f"model's {max_pos} positions (max_position_embeddings): give max_new_tokens {fix}"
            )
        self.capacity = P + sp.max_new_tokens + branch
        self.dec_cfg = dec_cfg
        self.keep = keep
        self.W = model.lm_head_weight  # (V, H)
        self.embed = model.base_model.get_input_embeddings()  # text tokens, as the rollout's step 0
        scale = model.config.meta_embedding_scale
        dtype = self.embed.weight.dtype
        self.start_vec = (model.start_embedding[0] * scale).view(1, 1, -1).expand(B, 1, -1).to(dtype)
        self.end_vec = (model.end_embedding[0] * scale).view(1, 1, -1).expand(B, 1, -1).to(dtype)
        self.banned = [model.start_id, model.end_id]

    def run(self, embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decoder call on ``embeds`` (B, k, H) at position ids ``pos`` (B, k): (B, k, H) hidden."""
        B, k = embeds.shape[:2]
        # text_keep covers the committed text and the text tokens of this call; every other key
        # (the thought in the cache, the thought tokens of this call) is real.
        n_keys = self.cache.get_seq_length() + k
        extra = n_keys - self.text_keep.shape[1]
        ones = torch.ones(B, extra, dtype=torch.bool, device=embeds.device)
        mask = torch.cat([self.text_keep, ones], dim=1)  # (B, n_keys)
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            position_ids=pos,
            use_cache=True,
            **{cache_keyword(self.decoder): self.cache},
        )
        return out.last_hidden_state

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt ``(B, P)``, and ``<start>`` after it when thinking: ``(h_base, h_think)``, each
        ``(B, H)`` (``h_think`` None without thinking)."""
        self.cache = ThoughtBranchCache(self.dec_cfg, capacity=self.capacity)
        self.text_keep = self.keep  # (B, text length): grows by one column per token
        positions = (self.keep.long().cumsum(1) - 1).clamp_min(0)  # (B, P)
        self.last_pos = positions[:, -1:]  # (B, 1) position id of the newest text token
        return self._feed_text(self.embed(ids), positions)

    def append(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new text token ``x`` (B,) enters the cache; with thinking, ``<start>`` opens its
        thought in the same call. Returns ``(h_base, h_think)`` as :meth:`prefill` does."""
        B = x.shape[0]
        self.text_keep = torch.cat([self.text_keep, torch.ones(B, 1, dtype=torch.bool, device=x.device)], 1)
        self.last_pos = self.last_pos + 1
        return self._feed_text(self.embed(x[:, None]), self.last_pos)

    def _feed_text(self, text_embeds: torch.Tensor, pos: torch.Tensor):
        k = text_embeds.shape[1]
        if self.sp.think:
            h = self.run(torch.cat([text_embeds, self.start_vec], 1), torch.cat([pos, self.last_pos + 1], 1))
            h_base, h_think = h[:, k - 1], h[:, k]
        else:
            h_base, h_think = self.run(text_embeds, pos)[:, k - 1], None
        self.cache.commit_text(k)
        return h_base, h_think

    def think(self, h_think: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the thought ``t_1 .. t_n`` from ``h_think`` (B, H), the state after ``<start>``; feed
        ``[t_n, <end>]``; drop the thought from the cache. Returns ``(thought (B, n), h_end (B, H))``."""
        n, E = self.sp.n_thought_tokens, self.embed.weight
        # Thought-token inputs are the rollout's E[t] (a gather: the one-hot product of the ``paper``
        # preset gives the same values, at V times the cost).
        toks = []
        for a in range(1, n + 1):
            t, _ = sample_thought_tokens(
                h_think,
                self.W,
                banned_ids=self.banned,
                temperature=self.sp.thought_temperature,
                generator=generator,
            )
            toks.append(t)
            if a < n:
                h_think = self.run(F.embedding(t[:, None], E), self.last_pos + a + 1)[:, 0]
        pos = torch.cat([self.last_pos + n + 1, self.last_pos + n + 2], 1)
        h_end = self.run(torch.cat([F.embedding(toks[-1][:, None], E), self.end_vec], 1), pos)[:, 1]
        self.cache.drop_branch()
        return torch.stack(toks, 1), h_end

    def mix_and_sample(self, h_base: torch.Tensor, h_end: torch.Tensor | None, generator):
        """``w = head([h_base ; h_end])``, the mixed logits ``(B, V)``, and the next text token ``(B,)``
        (the base model's own logits without a thought). Returns ``(x, logits, w)``."""
        sp, w = self.sp, None
        if h_end is None:
            logits = mixed_logits(h_base, self.W)
        else:
            w = self.model.mixing_head(torch.cat([h_base, h_end], dim=-1))  # (B, 1)
            logits = mixed_logits(mix_hidden(h_base, h_end, w), self.W)  # (B, V)
        x = _sample_text(logits, self.banned, sp.temperature, sp.top_k, sp.top_p, generator)
        return x, logits, w


@torch.no_grad()  # on a generator function: grad mode is switched around each step only
def _decode_loop(dec: _Decoder, ids, transcript: Transcript, generator) -> Iterator[GenerationStep]:
    sp = dec.sp
    B = ids.shape[0]
    h_base, h_think = dec.prefill(ids)
    for index in range(sp.max_new_tokens):
        thought = h_end = None
        if sp.think:
            thought, h_end = dec.think(h_think, generator)
        x, logits, w = dec.mix_and_sample(h_base, h_end, generator)
        x, new_texts = transcript.record(x, last=index + 1 == sp.max_new_tokens)
        thought_texts = None
        if thought is not None and transcript.decode_steps:
            thought_texts = [transcript.decode(thought[b].tolist()) for b in range(B)]
        yield GenerationStep(
            index=index,
            tokens=x,
            texts=new_texts,
            thoughts=thought,
            thought_texts=thought_texts,
            mixing_weights=None if w is None else w.view(B).float(),
            logits=logits,
            finished=transcript.finished.clone(),
            finish_reasons=list(transcript.reasons),
        )
        if bool(transcript.finished.all()):
            break
        h_base, h_think = dec.append(x)
    transcript.close()


def _start(model, input_ids, attention_mask, sp, generator, tokenizer, decode_steps: bool):
    """Check everything, then build the loop: ``(prompt ids, transcript, steps)``."""
    _check_model(model)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    sp = sp.resolve(model, tokenizer)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    ids, keep = prepare_prompt(model, input_ids, attention_mask, tokenizer)
    _refuse_meta_tokens(model, ids, keep)
    dec = _Decoder(model, keep, sp)
    transcript = Transcript(ids, keep, tokenizer, sp, model.pad_token_id, decode_steps)
    return ids, transcript, _decode_loop(dec, ids, transcript, generator)


def stream(
    model,
    input_ids,
    attention_mask: torch.Tensor | None = None,
    *,
    params: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    tokenizer=None,
    **sampling,
) -> Iterator[GenerationStep]:
    """Generate with a thought before every token, yielding one :class:`GenerationStep` per token.

    Same arguments as :func:`generate` (without the output options); every argument and the prompt
    are checked now, before the first step. Stops when every row has finished or after
    ``max_new_tokens``.
    """
    sp = _sampling_params("stream", params, sampling)
    return _start(model, input_ids, attention_mask, sp, generator, tokenizer, decode_steps=True)[2]


def generate(
    model,
    input_ids,
    attention_mask: torch.Tensor | None = None,
    *,
    params: SamplingParams | None = None,
    streamer: Callable[[GenerationStep], None] | object | None = None,
    return_thoughts: bool = False,
    output_logits: bool = False,
    generator: torch.Generator | None = None,
    tokenizer=None,
    progress: bool = False,
    **sampling,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens, thinking before each one.

    Args:
        model: a :class:`~qstar.model.QuietStarForCausalLM` (eval or train mode: generation never trains).
        input_ids: ``(B, P)`` token ids (left or right padded, with ``attention_mask``), or a string,
            or a list of strings (tokenised with the model's tokenizer, left padded).
        attention_mask: ``(B, P)`` 1/True for real tokens; None: all real.
        params: a :class:`SamplingParams`; keywords given too override its fields.
        **sampling: the fields of :class:`SamplingParams` (``max_new_tokens``, ``n_thought_tokens``,
            ``think``, ``temperature``, ``top_k``, ``top_p``, ``thought_temperature``,
            ``eos_token_id``, ``stop_strings``); ``max_new_tokens`` is required without ``params``.
        streamer: called with each :class:`GenerationStep`, or a transformers streamer (``put``/``end``,
            one prompt), e.g. ``TextStreamer(tokenizer, skip_prompt=True)``.
        return_thoughts: also return the thought behind every generated token.
        output_logits: also return the ``(B, T, V)`` mixed logits of each step.
        generator: a ``torch.Generator`` for reproducible text and thought samples.
        tokenizer: overrides ``model.tokenizer`` for text prompts, stop strings and decoding.
        progress: show a tqdm bar over the new tokens.

    The meta tokens are never sampled, neither in a thought nor as text, and a prompt that holds
    one (as an id, or as text such as ``"<|startthought|>"`` that the tokenizer encodes to it) is
    refused with a ``ValueError``. ``max_new_tokens`` plus the prompt and one thought must fit in
    the model's ``max_position_embeddings``.
    """
    sp = _sampling_params("generate", params, sampling)
    # Per-step decoding only where someone reads it (a callback) or stop strings need it.
    decode_steps = bool(sp.stop_strings) or (callable(streamer) and not hasattr(streamer, "put"))
    prompt, transcript, steps = _start(
        model, input_ids, attention_mask, sp, generator, tokenizer, decode_steps
    )
    sink = Streamer(streamer, prompt.shape[0])
    if sink.hf is not None:
        sink.hf.put(prompt.cpu())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sp.max_new_tokens, desc="generate", unit="tok")
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
    thought_tensor = torch.stack(thoughts, 1) if thoughts else None  # (B, T, n)
    thought_texts = None
    if thought_tensor is not None and transcript.tokenizer is not None:
        thought_texts = [
            [transcript.decode(thought_tensor[b, i].tolist()) for i in range(len(g))]
            for b, g in enumerate(transcript.generated)
        ]
    return GenerationOutput(
        sequences=torch.cat([prompt, new], 1),
        new_tokens=new,
        lengths=[len(g) for g in transcript.generated],
        texts=transcript.texts if transcript.tokenizer is not None else None,
        finish_reasons=[r or "length" for r in transcript.reasons],
        thoughts=thought_tensor,
        thought_texts=thought_texts,
        mixing_weights=torch.stack(weights, 1) if weights else None,
        logits=torch.stack(logits_all, 1) if output_logits else None,
    )
