"""``QuietStarForCausalLM``: a Hugging Face causal LM that thinks before every token.

The wrapper adds what Quiet-STaR needs around an unchanged HF model (``docs/algorithm.md``, "Meta
tokens" and "The mixing head"): the ``<|startthought|>`` / ``<|endthought|>`` tokens, their learned
embeddings, and the mixing head (:mod:`qstar.heads`). Its forward is the parallel rollout
(``docs/algorithm.md``, "The parallel rollout") in three stages that read like the paper:

====================  ============================  ==============================================
step ``a``            input at text position ``j``  output used for
====================  ============================  ==============================================
0                     the text ``x_j``              base hidden ``h0``, base NLL
1                     ``<start>``                   **think**: sample thought token ``t_1``
2 .. n                ``t_{a-1}``                   **think**: sample ``t_a`` (``n = n_thought_tokens``)
n + 1                 ``t_n``                       nothing (``<end>`` comes next)
n + 2 + s, s < K      ``<end>``, then ``x_{j+s}``   **talk** step ``s``: mixed prediction of ``x_{j+s+1}``
====================  ============================  ==============================================

then **policy**: the reward of each thought (how much it helped the talk steps), its advantage, and
the REINFORCE term.

Every step feeds one new token per text position through the base transformer, inside
:func:`qstar_kernels.hf.thought_step`, so the attention is :func:`qstar_kernels.thought_attention`
over the cache: no mask tensor, no ``repeat_kv``. Log-probabilities and samples come from the fused
LM-head ops (:func:`qstar_kernels.mixed_token_logprobs`, :func:`qstar_kernels.sample_thought_tokens`):
no vocabulary-sized tensor is ever built.

Saving and loading come from :class:`qstar.pretrained.PretrainedIO`; generation is
:func:`qstar.generation.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qstar_kernels import mixed_token_logprobs, sample_thought_tokens
from qstar_kernels.hf import apply_qstar_kernels, cache_keyword, thought_step

from .cache import RolloutCache
from .config import QuietStarConfig
from .forward_inputs import IGNORE, check_forward_inputs
from .generation import generate as _generate
from .heads import build_mixing_head, init_mixing_head, mix_hidden, mixed_logits
from .pretrained import PretrainedIO

__all__ = ["IGNORE", "QuietStarForCausalLM", "QuietStarOutput"]


@dataclass
class QuietStarOutput:
    """What one Quiet-STaR forward returns. ``R = B * n_rationales`` rows, ``K = n_talk_tokens``.

    Attributes:
        loss: the training loss, ``base_loss_weight * base_nll + talk_loss_weight * mean(talk_nll)
            + policy_loss_weight * policy_loss``.
        base_nll: the plain next-token NLL of the base pass (step 0).
        talk_nll: ``(K,)`` the NLL of each talk step ``s`` (the mixed prediction of ``x_{j+1+s}``).
        policy_loss: the REINFORCE term before its weight.
        rewards: ``(R, L-K-1)`` ``r_j = sum_s log p_talk,s - log p_base`` (detached).
        advantages: ``(R, L-K-1)`` the detached REINFORCE weights: rewards minus the baseline,
            clipped at 0 when ``clip_negative_advantages``.
        mixing_weights: ``(K, R, L)`` the mixing head's ``w`` at each talk step (detached).
        thought_tokens: ``(n_thought_tokens, R, L)`` int64, the sampled (or injected) thoughts.
        thought_logprobs: ``(n_thought_tokens, R, L)`` ``log_softmax(z / reinforce_temperature)[t]``,
            the meta tokens excluded (detached; the policy loss recomputes the ones it needs).
        base_logprobs: ``(R, L)`` ``log p_base(x_{j+1})`` of the step-0 pass, 0 where the target is
            ignored (padding, a -100 label) or past the end (detached). Per-token, for perplexity
            and the gain from thinking.
        talk_logprobs: ``(K, R, L)`` ``log p_mix,s(x_{j+1+s})`` of each talk step (detached, 0 where
            ignored). In eval mode (``K = 1``) ``talk_logprobs[0] - base_logprobs`` is the per-token
            gain from thinking.
        logits: ``(R, L, V)`` float32 (float64 for a float64 model) mixed next-token logits of talk
            step 0 (each position's own thought), only with ``forward(..., output_logits=True)``;
            else None. This is what the authors' eval-mode forward returns as ``logits``.
        base_hidden: ``(R, L, H)`` the step-0 final hidden states, only with
            ``output_hidden_states=True``; else None.
        mixed_hidden: ``(R, L, H)`` ``(1 - w) h_base + w h_thought`` of talk step 0 in float32
            (float64 for a float64 model), only with ``output_hidden_states=True``; else None.
            ``mixed_logits(mixed_hidden, W)`` gives ``logits``, and a few columns of ``W`` give the
            logits of a few tokens.
    """

    loss: torch.Tensor
    base_nll: torch.Tensor
    talk_nll: torch.Tensor
    policy_loss: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    mixing_weights: torch.Tensor
    thought_tokens: torch.Tensor
    thought_logprobs: torch.Tensor
    base_logprobs: torch.Tensor
    talk_logprobs: torch.Tensor
    logits: torch.Tensor | None = None
    base_hidden: torch.Tensor | None = None
    mixed_hidden: torch.Tensor | None = None


@dataclass
class _Rollout:
    """One forward's text and cache, shared by its stages. ``R = B * n_rationales`` rows of ``L``."""

    x: torch.Tensor  # (R, L) int64 text
    keep: torch.Tensor  # (R, L) bool, True for real tokens
    labels: torch.Tensor  # (R, L) int64 label of each position, IGNORE where no loss is taken
    positions: torch.Tensor  # (1, L) position ids of the text; step a uses j + a
    cache: RolloutCache
    n_rationales: int
    n_talk: int

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def n_reward(self) -> int:
        """Positions with a full talk window: ``L - K - 1``; only they get a reward."""
        return self.length - self.n_talk - 1

    def targets(self, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, L) the label of position j+shift (IGNORE past the end), and where it is not IGNORE.
        Every loss and reward takes its targets here: base (shift 1) and talk step s (shift 1+s)."""
        L = self.length
        tgt = torch.full_like(self.labels, IGNORE)
        if shift < L:
            tgt[:, : L - shift] = self.labels[:, shift:]
        return tgt, tgt != IGNORE


class _Base(NamedTuple):
    """Step 0, the text pass."""

    hidden: torch.Tensor  # (R, L, H) h0
    ce: torch.Tensor  # (R, L) -log p_base(x_{j+1}), 0 where ignored
    nll: torch.Tensor  # () the base NLL


class _Thoughts(NamedTuple):
    """The think stage: one entry per thought token ``t_1 .. t_n``."""

    tokens: list[torch.Tensor]  # n x (R, L) int64
    logprobs: list[torch.Tensor]  # n x (R, L) log_softmax(z / T_r)[t], detached
    states: list[torch.Tensor]  # n x (R, L, H) the hidden state each token was drawn from


class _Talk(NamedTuple):
    """The talk stage: one entry per talk step ``s < K``."""

    nll: torch.Tensor  # (K,) NLL of each talk step
    logprobs: torch.Tensor  # (K, R, L) log p_mix,s(x_{j+1+s}), detached
    gains: torch.Tensor  # (K, R, L-K-1) log p_mix,s - log p_base of the same token, detached
    weights: torch.Tensor  # (K, R, L) the mixing weight w, detached
    mixed0: torch.Tensor | None  # (R, L, H) talk step 0's mixed state, when asked for


class QuietStarForCausalLM(PretrainedIO, nn.Module):
    """Quiet-STaR around a Hugging Face causal LM (Mistral, Llama, Qwen2 or any model whose attention
    goes through transformers' ``AttentionInterface``).

    Build it with :meth:`from_base` (a base model and its tokenizer), :meth:`from_pretrained`
    (a directory written by :meth:`save_pretrained`) or :meth:`from_authors_checkpoint` (the
    authors' released layout). ``forward(input_ids, attention_mask)`` runs the whole rollout and
    returns a :class:`QuietStarOutput`.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: QuietStarConfig,
        *,
        start_id: int,
        end_id: int,
        pad_token_id: int,
        tokenizer=None,
    ):
        super().__init__()
        config.validate()
        self.config = config
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.start_id, self.end_id, self.pad_token_id = int(start_id), int(end_id), int(pad_token_id)
        hidden = self.hidden_size
        vocab = self.vocab_size
        if {self.start_id, self.end_id} != {vocab - 2, vocab - 1}:
            raise ValueError(
                f"the meta tokens must be the last two vocabulary rows ({vocab - 2}, {vocab - 1}) of the LM "
                f"head; got start_id={self.start_id}, end_id={self.end_id}. from_base arranges this."
            )
        if not 0 <= self.pad_token_id < vocab:
            raise ValueError(f"pad_token_id must be in [0, {vocab}), got {self.pad_token_id}")
        dtype = self.lm_head_weight.dtype
        device = self.lm_head_weight.device
        # Row 0 is the mean (the input, times meta_embedding_scale); row 1 the authors' unused log-std.
        self.start_embedding = nn.Parameter(torch.zeros(2, hidden, dtype=dtype, device=device))
        self.end_embedding = nn.Parameter(torch.zeros(2, hidden, dtype=dtype, device=device))
        self.mixing_head = build_mixing_head(hidden, config).to(device=device, dtype=dtype)
        std = float(getattr(base_model.config, "initializer_range", 0.02))
        init_mixing_head(self.mixing_head, std, config.mixing_head_zero_init)
        apply_qstar_kernels(base_model)
        ckpt_attr = (
            "is_activation_checkpointing"
            if hasattr(base_model, "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        if getattr(base_model, ckpt_attr, False):
            raise ValueError(
                "base_model has transformers' gradient checkpointing enabled, which drops the KV cache the "
                "rollout needs; disable it and set QuietStarConfig.gradient_checkpointing=True instead"
            )

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_base(cls, base_model: nn.Module, tokenizer, config: QuietStarConfig | None = None):
        """Add the meta tokens to ``tokenizer`` and to the model's vocabulary, build the heads, and
        initialise both meta embeddings from the first token of ``config.meta_init_string``.

        ``tokenizer`` is changed in place (two special tokens added); the model's input and output
        embeddings grow by two rows (``resize_token_embeddings``), as in the authors' code.
        """
        config = config or QuietStarConfig()
        if tokenizer is None:
            raise ValueError("from_base needs the tokenizer, to add the meta tokens and find the init string")
        if not hasattr(base_model, "resize_token_embeddings"):
            raise TypeError(
                f"base_model must be a transformers PreTrainedModel, got {type(base_model).__name__}"
            )
        vocab_before = base_model.get_input_embeddings().weight.shape[0]
        ids = tokenizer.convert_tokens_to_ids([config.start_token, config.end_token])
        unk = getattr(tokenizer, "unk_token_id", None)
        known = [i is not None and i != unk and i < vocab_before for i in ids]
        if not all(known):
            tokenizer.add_special_tokens(
                {"additional_special_tokens": [config.start_token, config.end_token]}
            )
            ids = tokenizer.convert_tokens_to_ids([config.start_token, config.end_token])
            # New rows drawn as the authors' transformers 4.37 did: N(0, initializer_range), no mean resizing.
            base_model.resize_token_embeddings(max(len(tokenizer), max(ids) + 1), mean_resizing=False)
        start_id, end_id = ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id to pad with")
        model = cls(
            base_model, config, start_id=start_id, end_id=end_id, pad_token_id=pad, tokenizer=tokenizer
        )
        init_ids = tokenizer.encode(config.meta_init_string, add_special_tokens=False)
        if not init_ids:
            raise ValueError(f"meta_init_string {config.meta_init_string!r} encodes to no tokens")
        model.init_meta_embeddings(init_ids[0])
        return model

    def init_meta_embeddings(self, token_id: int) -> None:
        """``start_embedding[0] = end_embedding[0] = E[token_id] / meta_embedding_scale``
        (``docs/algorithm.md``, "Meta tokens")."""
        E = self.base_model.get_input_embeddings().weight
        with torch.no_grad():
            vec = E[token_id].to(self.start_embedding.dtype) / self.config.meta_embedding_scale
            self.start_embedding[0].copy_(vec)
            self.end_embedding[0].copy_(vec)

    # ----------------------------------------------------------------------------- properties

    @property
    def hidden_size(self) -> int:
        return self.base_model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.lm_head_weight.shape[0]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The base model's LM-head weight ``(V, H)`` (the input embeddings when the model ties them)."""
        return self.base_model.get_output_embeddings().weight  # (V, H)

    @property
    def decoder(self) -> nn.Module:
        """The base model's decoder stack (``base_model.model`` for HF causal LMs): embeddings in, final
        hidden states out, no LM head."""
        decoder = getattr(self.base_model, "model", None)
        if decoder is None:
            decoder = self.base_model.get_decoder()
        return decoder

    # ----------------------------------------------------------------------------- one step

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Step inputs ``(R, L, H)`` for token ids ``(R, L)``: a gather, or the authors' one-hot matmul."""
        E = self.base_model.get_input_embeddings().weight  # (V, H)
        if self.config.embedding_lookup == "one_hot":
            one_hot = F.one_hot(ids, E.shape[0]).to(E.dtype)  # (R, L, V)
            return one_hot @ E
        return F.embedding(ids, E)

    def meta_input(self, param: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """The step input ``(rows, length, H)`` of a meta token: row 0 of its embedding, times the scale."""
        vec = param[0] * self.config.meta_embedding_scale  # (H,)
        return vec.expand(rows, length, -1)

    def _run_step(self, embeds: torch.Tensor, roll: _Rollout, step: int) -> torch.Tensor:
        """One transformer pass of the rollout: ``L`` new tokens per row, ``(R, L, H)`` final hidden."""
        decoder = self.decoder
        cache = roll.cache
        cache_kw = {cache_keyword(decoder): cache}

        def run(x):
            cache.step = step
            with thought_step(key_padding_mask=roll.keep, step=step):
                out = decoder(inputs_embeds=x, position_ids=roll.positions + step, use_cache=True, **cache_kw)
            return out.last_hidden_state

        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(run, embeds, use_reentrant=False)
        return run(embeds)

    def _nll(self, ce: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of a per-token CE: over non-zero entries (the authors) or over real targets."""
        if self.config.nll_normalization == "nonzero":
            count = (ce != 0).sum()
        else:
            count = valid.sum()
        return ce.sum() / count.clamp_min(1)

    # ----------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        thought_tokens: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_logits: bool = False,
        output_hidden_states: bool = False,
        think: bool = True,
    ) -> QuietStarOutput:
        """The Quiet-STaR training forward (``docs/algorithm.md``, "The objective").

        Args:
            input_ids: ``(B, L)`` int64 text, right-padded; the targets are the next tokens.
            attention_mask: ``(B, L)``, 1/True = real token (None: all real).
            labels: ``(B, L)`` integer targets, the HF convention: position ``j`` predicts
                ``labels[:, j + 1]`` (shifted inside, like the text) and ``-100`` is ignored. They
                are targets only: the teacher-forced talk inputs are always ``input_ids``. None:
                ``input_ids``. Either way a label is ignored where ``attention_mask`` is 0 and, with
                ``config.ignore_pad_labels`` (the ``paper`` preset), where it equals the pad id.
                The base NLL, every talk NLL, the rewards and so the policy term all use them.
            thought_tokens: ``(n_thought_tokens, B * n_rationales, L)`` injected thoughts instead of
                sampled ones (rows are ``repeat_interleave``-d copies: row ``b * P + p``).
            generator: the ``torch.Generator`` for sampling (None: the default one of the device).
            output_logits: also return ``logits``, the ``(R, L, V)`` mixed next-token logits of talk
                step 0. Vocabulary-sized: for evaluation, not training.
            output_hidden_states: also return ``base_hidden`` and ``mixed_hidden`` (talk step 0).
            think: False runs only the base pass (no thoughts, no talk, no policy, one row per
                text): ``loss = base_nll``, the plain fine-tuning loss of the base model through the
                fused log-prob op; ``base_logprobs`` (and ``base_hidden``) are set, the thought, talk
                and policy fields are None. For a fine-tune without thoughts (``NextTokenObjective``).

        In eval mode the authors' overrides apply: ``eval_n_talk_tokens``, ``eval_n_rationales``
        and ``eval_thought_temperature`` (0 = greedy thoughts).
        """
        cfg = self.config
        if self.training:
            n_talk, n_rat, temperature = cfg.n_talk_tokens, cfg.n_rationales, cfg.thought_temperature
        else:
            n_talk, n_rat = cfg.eval_n_talk_tokens, cfg.eval_n_rationales
            temperature = cfg.eval_thought_temperature
        check_forward_inputs(
            input_ids, attention_mask, labels, thought_tokens, n_talk=n_talk, n_rationales=n_rat,
            n_thought_tokens=self.config.n_thought_tokens, vocab_size=self.vocab_size,
            meta_ids=(self.start_id, self.end_id), device=self.lm_head_weight.device,
        )  # fmt: skip
        if not think:
            if thought_tokens is not None or output_logits:
                raise ValueError(
                    "thought_tokens and output_logits need thoughts: give neither with think=False"
                )
            return self._read_only(input_ids, attention_mask, labels, output_hidden_states)
        roll = self._start_rollout(input_ids, attention_mask, labels, n_rat, n_talk)
        base = self.read_text(roll)
        thoughts = self.think(roll, thought_tokens, temperature, generator)
        talk = self.talk(roll, base, keep_mixed=output_logits or output_hidden_states)
        rewards, advantages, policy_loss = self.policy(roll, thoughts, talk)

        loss = cfg.base_loss_weight * base.nll + cfg.talk_loss_weight * talk.nll.mean()
        loss = loss + cfg.policy_loss_weight * policy_loss
        W = self.lm_head_weight
        return QuietStarOutput(
            loss=loss,
            base_nll=base.nll,
            talk_nll=talk.nll,
            policy_loss=policy_loss,
            rewards=rewards.detach(),
            advantages=advantages,
            mixing_weights=talk.weights,
            thought_tokens=torch.stack(thoughts.tokens),
            thought_logprobs=torch.stack(thoughts.logprobs),
            base_logprobs=-base.ce.detach(),
            talk_logprobs=talk.logprobs,
            logits=mixed_logits(talk.mixed0, W.detach()) if output_logits else None,
            base_hidden=base.hidden.detach() if output_hidden_states else None,
            mixed_hidden=talk.mixed0 if output_hidden_states else None,
        )

    def _read_only(self, input_ids, attention_mask, labels, output_hidden_states: bool) -> QuietStarOutput:
        """``forward(..., think=False)``: the base pass alone, one row per text."""
        roll = self._start_rollout(input_ids, attention_mask, labels, 1, 0)
        base = self.read_text(roll)
        return QuietStarOutput(
            loss=base.nll, base_nll=base.nll, talk_nll=None, policy_loss=None, rewards=None,
            advantages=None, mixing_weights=None, thought_tokens=None, thought_logprobs=None,
            base_logprobs=-base.ce.detach(), talk_logprobs=None, logits=None,
            base_hidden=base.hidden.detach() if output_hidden_states else None, mixed_hidden=None,
        )  # fmt: skip

    def _start_rollout(self, input_ids, attention_mask, labels, n_rat: int, n_talk: int) -> _Rollout:
        """Each text row repeated ``n_rationales`` times (row ``b * P + p``), its labels (IGNORE at
        padding, and at the pad id with ``ignore_pad_labels``), and an empty cache."""
        device = input_ids.device
        x = input_ids.to(torch.int64).repeat_interleave(n_rat, dim=0)  # (R, L)
        R, L = x.shape
        if attention_mask is None:
            keep = torch.ones(R, L, dtype=torch.bool, device=device)
        else:
            keep = attention_mask.to(torch.bool).repeat_interleave(n_rat, dim=0)  # (R, L)
        y = x if labels is None else labels.to(torch.int64).repeat_interleave(n_rat, dim=0)  # (R, L)
        ignored = ~keep
        if self.config.ignore_pad_labels:  # the authors' quirk 14: their pad id is also their EOS
            ignored = ignored | (y == self.pad_token_id)
        y = y.masked_fill(ignored, IGNORE)
        positions = torch.arange(L, device=device).unsqueeze(0)  # (1, L)
        return _Rollout(x, keep, y, positions, RolloutCache(self.decoder.config), n_rat, n_talk)

    def read_text(self, roll: _Rollout) -> _Base:
        """Step 0, the text: ``h0`` feeds the base NLL, every talk step's mix, and (through the cache)
        every later step."""
        W = self.lm_head_weight  # (V, H)
        H = W.shape[1]
        text_embeds = self.base_model.get_input_embeddings()(roll.x)  # (R, L, H)
        h0 = self._run_step(text_embeds, roll, 0)  # (R, L, H)
        tgt1, valid1 = roll.targets(1)
        ce = -mixed_token_logprobs(h0.reshape(-1, H), None, None, W, tgt1.reshape(-1))
        ce = ce.view(roll.rows, roll.length)  # (R, L)
        return _Base(h0, ce, self._nll(ce, valid1))

    def think(self, roll: _Rollout, thought_tokens, temperature: float, generator) -> _Thoughts:
        """Steps 1 .. n+1: ``<start>``, then ``t_1 .. t_n``; ``t_a`` is drawn from step ``a``'s output.

        The policy term needs log-probabilities with a gradient only where the advantage is non-zero
        (with clipping, at most about half the positions), and the advantages are known only after
        the talk steps: the tokens are drawn here without a graph, and :meth:`policy` recomputes the
        log-probs that carry the gradient for those positions only.
        """
        cfg = self.config
        n_think = cfg.n_thought_tokens
        R, L = roll.rows, roll.length
        W = self.lm_head_weight  # (V, H)
        H = W.shape[1]
        W_think = W[: W.shape[0] - 2]  # the meta ids are the last two rows: never drawn, no mass
        banned = [self.start_id, self.end_id]
        out = _Thoughts([], [], [])
        step_input = self.meta_input(self.start_embedding, R, L)
        for a in range(1, n_think + 2):
            h = self._run_step(step_input, roll, a)  # (R, L, H)
            if a > n_think:
                break  # step n+1 reads t_n; its output is unused (<end> is forced next)
            with torch.no_grad():
                hf = h.detach().reshape(-1, H)
                if thought_tokens is None:
                    t, lp = sample_thought_tokens(
                        hf,
                        W.detach(),
                        banned_ids=banned,
                        temperature=temperature,
                        logprob_temperature=cfg.reinforce_temperature,
                        generator=generator,
                    )
                else:
                    t = thought_tokens[a - 1].to(torch.int64).reshape(-1)
                    lp = mixed_token_logprobs(hf / cfg.reinforce_temperature, None, None, W_think.detach(), t)
            t = t.view(R, L)
            out.tokens.append(t)
            out.logprobs.append(lp.view(R, L))
            out.states.append(h)
            step_input = self.embed(t)
        return out

    def talk(self, roll: _Rollout, base: _Base, *, keep_mixed: bool) -> _Talk:
        """Talk steps ``s = 0 .. K-1``: ``<end>``, then the true tokens ``x_{j+1} .. x_{j+K-1}``;
        step ``s`` mixes its state with the base state and predicts ``x_{j+1+s}``."""
        R, L, K = roll.rows, roll.length, roll.n_talk
        W = self.lm_head_weight  # (V, H)
        H = W.shape[1]
        n_reward = roll.n_reward
        h0, ce_base = base.hidden, base.ce
        nll, logprobs, gains, weights = [], [], [], []
        mixed0 = None
        step_input = self.meta_input(self.end_embedding, R, L)
        first_talk = self.config.n_thought_tokens + 2
        for s in range(K):
            h = self._run_step(step_input, roll, first_talk + s)  # (R, L, H)
            # The base state at j + s predicts the same token as this stream (roll left by s; the
            # last s rows wrap around and fall outside every target).
            hb = torch.roll(h0, shifts=-s, dims=1) if s else h0
            w = self.mixing_head(torch.cat([hb, h], dim=-1))  # (R, L, 1)
            tgt, valid = roll.targets(1 + s)
            ce = -mixed_token_logprobs(hb.reshape(-1, H), h.reshape(-1, H), w.reshape(-1), W, tgt.reshape(-1))
            ce = ce.view(R, L)
            if s == 0 and keep_mixed:
                mixed0 = mix_hidden(hb.detach(), h.detach(), w.detach())  # (R, L, H) float32
            logprobs.append(-ce.detach())
            nll.append(self._nll(ce, valid))
            gains.append(ce_base.detach()[:, s : s + n_reward] - ce.detach()[:, :n_reward])
            weights.append(w.detach().view(R, L))
            if s + 1 < K:
                nxt = torch.full_like(roll.x, self.pad_token_id)
                nxt[:, : L - s - 1] = roll.x[:, s + 1 :]
                step_input = self.embed(nxt)
        return _Talk(
            torch.stack(nll), torch.stack(logprobs), torch.stack(gains), torch.stack(weights), mixed0
        )

    def policy(self, roll: _Rollout, thoughts: _Thoughts, talk: _Talk):
        """REINFORCE: ``r_j = sum_s (log p_talk,s - log p_base)``, the baseline the mean over the
        rationales of the same text, and ``policy = mean_k mean_{rows, j < L-K-1} (-A log p(t_k))``
        with ``log p = log_softmax(z_k / T_r)``. Returns ``(rewards, advantages, policy_loss)``."""
        cfg = self.config
        R, n_rat, n_reward = roll.rows, roll.n_rationales, roll.n_reward
        n_think = cfg.n_thought_tokens
        rewards = talk.gains.sum(0)  # (R, L-K-1)
        adv = rewards
        if cfg.baseline == "mean_rationales" and n_rat > 1:  # the authors: trice_mode needs P > 1
            grouped = rewards.view(R // n_rat, n_rat, n_reward)
            adv = (grouped - grouped.mean(dim=1, keepdim=True)).view(R, n_reward)
        if cfg.clip_negative_advantages:
            adv = adv.clamp_min(0)
        adv = adv.detach()
        live = adv != 0  # (R, L-K-1): the positions whose log-probs get a gradient
        if torch.is_grad_enabled() and bool(live.any()):
            W = self.lm_head_weight
            W_think = W[: W.shape[0] - 2]
            rows, cols = live.nonzero(as_tuple=True)
            h_live = torch.cat([h[rows, cols] for h in thoughts.states])  # (n * M, H)
            t_live = torch.cat([t[rows, cols] for t in thoughts.tokens])  # (n * M,)
            lp_live = mixed_token_logprobs(h_live / cfg.reinforce_temperature, None, None, W_think, t_live)
            weighted = adv[rows, cols].repeat(n_think) * lp_live
            policy_loss = -weighted.sum() / (n_think * R * n_reward)
        else:
            logprobs = torch.stack(thoughts.logprobs)  # (n, R, L), detached
            policy_loss = (-(adv.unsqueeze(0) * logprobs[:, :, :n_reward])).mean(dim=(1, 2)).mean()
        return rewards, adv, policy_loss

    def generate(self, input_ids, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate with a thought before every token: :func:`qstar.generate` with this model."""
        return _generate(self, input_ids, attention_mask, **kwargs)
