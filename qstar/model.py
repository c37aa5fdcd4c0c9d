"""``QuietStarForCausalLM``: a Hugging Face causal LM that thinks before every token.

The wrapper adds what Quiet-STaR needs around an unchanged HF model (``quietstar.md`` sections 5
and 6): the ``<|startthought|>`` / ``<|endthought|>`` tokens, their learned embeddings, and the
mixing head. Its forward is the parallel thought rollout of section 3, step by step:

====================  ============================  ==============================================
step ``a``            input at text position ``j``  output used for
====================  ============================  ==============================================
0                     the text ``x_j``              base hidden ``h0``, base NLL
1                     ``<start>``                   sample thought token ``t_1``
2 .. n                ``t_{a-1}``                   sample ``t_a`` (``n = n_thought_tokens``)
n + 1                 ``t_n``                       nothing (``<end>`` comes next)
n + 2 + s, s < K      ``<end>``, then ``x_{j+s}``   talk step ``s``: mixed prediction of ``x_{j+s+1}``
====================  ============================  ==============================================

Every step feeds one new token per text position through the base transformer, inside
:func:`qstar_kernels.hf.thought_step`, so the attention is :func:`qstar_kernels.thought_attention`
over the cache: no mask tensor, no ``repeat_kv``. Log-probabilities and samples come from the fused
LM-head ops (:func:`qstar_kernels.mixed_token_logprobs`, :func:`qstar_kernels.sample_thought_tokens`):
no vocabulary-sized tensor is ever built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qstar_kernels import mixed_token_logprobs, sample_thought_tokens
from qstar_kernels.hf import apply_qstar_kernels, thought_step

from .cache import RolloutCache
from .config import QuietStarConfig

CONFIG_NAME = "quietstar_config.json"
HEADS_NAME = "quietstar_heads.safetensors"
FORMAT_VERSION = 1
IGNORE = -100


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
            padding or past the end (detached). Per-token, for perplexity and the gain from thinking.
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


def mix_hidden(h_base: torch.Tensor, h_thought: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(1 - w) * h_base + w * h_thought`` in float32, float64 for float64 states (``w`` has one
    entry per row: ``(..., 1)``).

    The one definition of the mixed state shared by the forward's ``logits`` and generation, so the
    two agree to the last bit given the same inputs (``kernels.md`` section 2 mixes in float32 too).
    """
    dtype = torch.float64 if h_base.dtype == torch.float64 else torch.float32
    w = w.to(dtype)
    return (1 - w) * h_base.to(dtype) + w * h_thought.to(dtype)


def mixed_logits(mixed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``mixed @ weight.T`` of a mixed state, float32 (float64 for a float64 model). The
    matmul runs in the weight's dtype: no float32 copy of a bf16 LM head."""
    out = F.linear(mixed.to(weight.dtype), weight)
    return out if out.dtype == torch.float64 else out.float()


def build_mixing_head(hidden_size: int, config: QuietStarConfig) -> nn.Sequential:
    """The mixing head on ``[h_base ; h_thought]``: Linear(2H, W), ReLU, ..., Linear(W, 1, no bias).

    With the default 3 layers this is the authors' head (``talk_head[0]``): the state-dict keys
    ``0.weight, 0.bias, 2.weight, 2.bias, 4.weight`` match theirs.
    """
    width = config.mixing_head_hidden_size or hidden_size
    layers: list[nn.Module] = []
    fan_in = 2 * hidden_size
    for _ in range(config.mixing_head_layers - 1):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1, bias=False))
    return nn.Sequential(*layers)


def _init_mixing_head(head: nn.Sequential, std: float, zero_last: bool) -> None:
    """HF's ``_init_weights`` for the hidden layers (N(0, std), bias 0); the last layer zero."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin in linears:
            lin.weight.normal_(0.0, std)
            if lin.bias is not None:
                lin.bias.zero_()
        if zero_last:
            linears[-1].weight.zero_()


class QuietStarForCausalLM(nn.Module):
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
        _init_mixing_head(self.mixing_head, std, config.mixing_head_zero_init)
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
        """``start_embedding[0] = end_embedding[0] = E[token_id] / meta_embedding_scale`` (section 5)."""
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

    # ----------------------------------------------------------------------------- forward

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Step inputs for token ids ``(R, L)``: a gather, or the authors' one-hot matmul."""
        E = self.base_model.get_input_embeddings().weight  # (V, H)
        if self.config.embedding_lookup == "one_hot":
            one_hot = F.one_hot(ids, E.shape[0]).to(E.dtype)  # (R, L, V)
            return one_hot @ E
        return F.embedding(ids, E)

    def _meta_input(self, param: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        vec = param[0] * self.config.meta_embedding_scale  # (H,)
        return vec.expand(rows, length, -1)

    def _run_step(self, embeds, positions, keep, cache: RolloutCache, step: int) -> torch.Tensor:
        """One transformer pass of the rollout: ``L`` new tokens per row, ``(R, L, H)`` final hidden."""
        decoder = self.decoder

        def run(x):
            cache.step = step
            with thought_step(key_padding_mask=keep, step=step):
                out = decoder(
                    inputs_embeds=x, position_ids=positions + step, past_key_values=cache, use_cache=True
                )
            return out.last_hidden_state

        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(run, embeds, use_reentrant=False)
        return run(embeds)

    def _check_inputs(self, input_ids, attention_mask, thought_tokens, n_talk, n_rat):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, L) tensor, got {got}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        device = self.lm_head_weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids must be on the model's device {device}, got {input_ids.device}")
        B, L = input_ids.shape
        if L < n_talk + 2:
            raise ValueError(
                f"input_ids must have at least n_talk_tokens + 2 = {n_talk + 2} positions (a reward needs a "
                f"full talk window), got L={L}"
            )
        V = self.vocab_size
        if B * L and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(
                f"input_ids must be ids in [0, {V}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {(B, L)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            if attention_mask.device != device:
                raise ValueError(f"attention_mask must be on {device}, got {attention_mask.device}")
        if thought_tokens is not None:
            want = (self.config.n_thought_tokens, B * n_rat, L)
            if not isinstance(thought_tokens, torch.Tensor) or tuple(thought_tokens.shape) != want:
                got = (
                    tuple(thought_tokens.shape)
                    if isinstance(thought_tokens, torch.Tensor)
                    else thought_tokens
                )
                raise ValueError(
                    "thought_tokens must have shape (n_thought_tokens, B * n_rationales, L) = "
                    f"{want}, got {got}"
                )
            if thought_tokens.dtype not in (torch.int64, torch.int32) or thought_tokens.device != device:
                raise ValueError(
                    f"thought_tokens must be int64 on {device}, "
                    f"got {thought_tokens.dtype} on {thought_tokens.device}"
                )
            if int(thought_tokens.min()) < 0 or int(thought_tokens.max()) >= V:
                raise ValueError(f"thought_tokens must be ids in [0, {V})")
            meta = (thought_tokens == self.start_id) | (thought_tokens == self.end_id)
            if bool(meta.any()):
                raise ValueError(
                    f"thought_tokens must not contain the meta tokens {self.start_id} / {self.end_id} "
                    "(they are never sampled)"
                )

    def _nll(self, ce: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of a per-token CE: over non-zero entries (the authors) or over real targets."""
        if self.config.nll_normalization == "nonzero":
            count = (ce != 0).sum()
        else:
            count = valid.sum()
        return ce.sum() / count.clamp_min(1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        thought_tokens: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_logits: bool = False,
        output_hidden_states: bool = False,
    ) -> QuietStarOutput:
        """The Quiet-STaR training forward (``quietstar.md`` section 14).

        Args:
            input_ids: ``(B, L)`` int64 text, right-padded; the targets are the next tokens.
            attention_mask: ``(B, L)``, 1/True = real token (None: all real).
            thought_tokens: ``(n_thought_tokens, B * n_rationales, L)`` injected thoughts instead of
                sampled ones (rows are ``repeat_interleave``-d copies: row ``b * P + p``).
            generator: the ``torch.Generator`` for sampling (None: the default one of the device).
            output_logits: also return ``logits``, the ``(R, L, V)`` mixed next-token logits of talk
                step 0. Vocabulary-sized: for evaluation, not training.
            output_hidden_states: also return ``base_hidden`` and ``mixed_hidden`` (talk step 0).

        In eval mode the authors' overrides apply: ``eval_n_talk_tokens``, ``eval_n_rationales``
        and ``eval_thought_temperature`` (0 = greedy thoughts).
        """
        cfg = self.config
        if self.training:
            n_talk, n_rat, temperature = cfg.n_talk_tokens, cfg.n_rationales, cfg.thought_temperature
        else:
            n_talk, n_rat, temperature = (
                cfg.eval_n_talk_tokens,
                cfg.eval_n_rationales,
                cfg.eval_thought_temperature,
            )
        self._check_inputs(input_ids, attention_mask, thought_tokens, n_talk, n_rat)
        n_think = cfg.n_thought_tokens
        device = input_ids.device
        B, L = input_ids.shape
        R = B * n_rat
        x = input_ids.to(torch.int64).repeat_interleave(n_rat, dim=0)  # (R, L)
        if attention_mask is None:
            keep = torch.ones(R, L, dtype=torch.bool, device=device)
        else:
            keep = attention_mask.to(torch.bool).repeat_interleave(n_rat, dim=0)  # (R, L)
        W = self.lm_head_weight  # (V, H)
        H = W.shape[1]
        positions = torch.arange(L, device=device).unsqueeze(0)  # (1, L); step a uses j + a
        cache = RolloutCache(self.decoder.config)

        def targets(shift: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(R, L) ids of x_{j+shift} where it is a real token, else IGNORE; and validity."""
            tgt = torch.full_like(x, IGNORE)
            valid = torch.zeros_like(keep)
            if shift < L:
                valid[:, : L - shift] = keep[:, shift:]
                tgt[:, : L - shift] = torch.where(keep[:, shift:], x[:, shift:], IGNORE)
            return tgt, valid

        # Step 0: the text. h0 feeds the base NLL, every talk step's mix, and (through the cache) all steps.
        text_embeds = self.base_model.get_input_embeddings()(x)  # (R, L, H)
        h0 = self._run_step(text_embeds, positions, keep, cache, 0)  # (R, L, H)
        tgt1, valid1 = targets(1)
        ce_base = -mixed_token_logprobs(h0.reshape(-1, H), None, None, W, tgt1.reshape(-1)).view(
            R, L
        )  # (R, L)
        base_nll = self._nll(ce_base, valid1)

        # Thought steps 1 .. n+1: <start>, t_1 .. t_n; sample t_a from step a's output for a <= n.
        # The policy term needs log-probabilities with a gradient only where the advantage is
        # non-zero (with clipping, at most about half the positions), and the advantages are known
        # only after the talk steps: the tokens are drawn now without a graph, and the log-probs
        # that carry the gradient are recomputed at the end for those positions only.
        tokens, logps, states = [], [], []
        banned = [self.start_id, self.end_id]
        W_think = W[: W.shape[0] - 2]  # the meta ids are the last two rows: never drawn, no mass
        step_input = self._meta_input(self.start_embedding, R, L)
        for a in range(1, n_think + 2):
            h = self._run_step(step_input, positions, keep, cache, a)  # (R, L, H)
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
            tokens.append(t)
            logps.append(lp.view(R, L))
            states.append(h)
            step_input = self._embed(t)

        # Talk steps: <end>, then the true tokens x_{j+1} .. x_{j+K-1}; step s predicts x_{j+1+s}.
        step_input = self._meta_input(self.end_embedding, R, L)
        first_talk = n_think + 2
        talk_nll, deltas, weights, talk_lp = [], [], [], []
        mixed0 = None
        n_reward = L - n_talk - 1
        for s in range(n_talk):
            h = self._run_step(step_input, positions, keep, cache, first_talk + s)  # (R, L, H)
            # The base state at j + s predicts the same token as this stream (roll left by s; the
            # last s rows wrap around and fall outside every target).
            hb = torch.roll(h0, shifts=-s, dims=1) if s else h0
            w = self.mixing_head(torch.cat([hb, h], dim=-1))  # (R, L, 1)
            tgt, valid = targets(1 + s)
            ce = -mixed_token_logprobs(hb.reshape(-1, H), h.reshape(-1, H), w.reshape(-1), W, tgt.reshape(-1))
            ce = ce.view(R, L)
            if s == 0 and (output_logits or output_hidden_states):
                mixed0 = mix_hidden(hb.detach(), h.detach(), w.detach())  # (R, L, H) float32
            talk_lp.append(-ce.detach())
            talk_nll.append(self._nll(ce, valid))
            deltas.append(ce_base.detach()[:, s : s + n_reward] - ce.detach()[:, :n_reward])
            weights.append(w.detach().view(R, L))
            if s + 1 < n_talk:
                nxt = torch.full_like(x, self.pad_token_id)
                nxt[:, : L - s - 1] = x[:, s + 1 :]
                step_input = self._embed(nxt)

        # REINFORCE: r_j = sum_s (log p_talk - log p_base); baseline = mean over the rationales.
        rewards = torch.stack(deltas).sum(0)  # (R, L-K-1)
        adv = rewards
        if cfg.baseline == "mean_rationales" and n_rat > 1:  # the authors: trice_mode needs P > 1
            grouped = rewards.view(B, n_rat, n_reward)
            adv = (grouped - grouped.mean(dim=1, keepdim=True)).view(R, n_reward)
        if cfg.clip_negative_advantages:
            adv = adv.clamp_min(0)
        adv = adv.detach()
        thought_logprobs = torch.stack(logps)  # (n, R, L), detached
        # policy = mean_k mean_{rows, j < L-K-1} (-A * log_softmax(z_k / T_r)[t_k])
        live = adv != 0  # (R, L-K-1): the positions whose log-probs get a gradient
        if torch.is_grad_enabled() and bool(live.any()):
            rows, cols = live.nonzero(as_tuple=True)
            h_live = torch.cat([h[rows, cols] for h in states])  # (n * M, H)
            t_live = torch.cat([t[rows, cols] for t in tokens])  # (n * M,)
            lp_live = mixed_token_logprobs(h_live / cfg.reinforce_temperature, None, None, W_think, t_live)
            weighted = adv[rows, cols].repeat(n_think) * lp_live
            policy_loss = -weighted.sum() / (n_think * R * n_reward)
        else:
            policy_loss = (-(adv.unsqueeze(0) * thought_logprobs[:, :, :n_reward])).mean(dim=(1, 2)).mean()

        talk = torch.stack(talk_nll)  # (K,)
        loss = cfg.base_loss_weight * base_nll + cfg.talk_loss_weight * talk.mean()
        loss = loss + cfg.policy_loss_weight * policy_loss
        return QuietStarOutput(
            loss=loss,
            base_nll=base_nll,
            talk_nll=talk,
            policy_loss=policy_loss,
            rewards=rewards.detach(),
            advantages=adv,
            mixing_weights=torch.stack(weights),
            thought_tokens=torch.stack(tokens),
            thought_logprobs=thought_logprobs,
            base_logprobs=-ce_base.detach(),
            talk_logprobs=torch.stack(talk_lp),
            logits=mixed_logits(mixed0, W.detach()) if output_logits else None,
            base_hidden=h0.detach() if output_hidden_states else None,
            mixed_hidden=mixed0 if output_hidden_states else None,
        )

    def generate(self, input_ids, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate with a thought before every token: :func:`qstar.generate` with this model."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ----------------------------------------------------------------------------- save / load

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that are not the base model's: the meta embeddings and the mixing head."""
        sd = {"start_embedding": self.start_embedding, "end_embedding": self.end_embedding}
        sd.update({f"mixing_head.{k}": v for k, v in self.mixing_head.state_dict().items()})
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def load_heads_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        want = set(self.heads_state_dict())
        if set(sd) != want:
            raise ValueError(
                f"head weights: expected keys {sorted(want)}, missing {sorted(want - set(sd))}, "
                f"unexpected {sorted(set(sd) - want)}"
            )
        with torch.no_grad():
            self.start_embedding.copy_(sd["start_embedding"])
            self.end_embedding.copy_(sd["end_embedding"])
            self.mixing_head.load_state_dict(
                {k.removeprefix("mixing_head."): v for k, v in sd.items() if k.startswith("mixing_head.")}
            )

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the base model (HF format), the tokenizer (if any), the heads and the config."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.base_model.save_pretrained(out, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        save_file({k: v.cpu() for k, v in self.heads_state_dict().items()}, str(out / HEADS_NAME))
        meta = {
            "format_version": FORMAT_VERSION,
            "quietstar": self.config.to_dict(),
            "start_id": self.start_id,
            "end_id": self.end_id,
            "pad_token_id": self.pad_token_id,
        }
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, config: QuietStarConfig | None = None, **model_kwargs):
        """Load what :meth:`save_pretrained` wrote. ``config`` overrides the saved method config
        (the head shape must match); ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained``."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{meta_path} not found: not a QuietStarForCausalLM directory (for the authors' "
                "checkpoints use QuietStarForCausalLM.from_authors_checkpoint)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        config = config or QuietStarConfig.from_dict(meta["quietstar"])
        model_kwargs.setdefault("attn_implementation", "sdpa")
        base = AutoModelForCausalLM.from_pretrained(directory, **model_kwargs)
        tokenizer = _load_tokenizer(directory)
        model = cls(
            base,
            config,
            start_id=meta["start_id"],
            end_id=meta["end_id"],
            pad_token_id=meta["pad_token_id"],
            tokenizer=tokenizer,
        )
        model.load_heads_state_dict(load_file(str(directory / HEADS_NAME)))
        return model

    @classmethod
    def from_authors_checkpoint(
        cls, directory: str | Path, *, config: QuietStarConfig | None = None, tokenizer=None, dtype=None
    ):
        """Load the authors' released layout (e.g. ``ezelikman/quietstar-8-ahead``, downloaded).

        Their checkpoint is a Mistral state dict with extra keys: ``start_embedding``,
        ``end_embedding`` (each ``(2, H)``, stored divided by the embedding scale) and the mixing head
        ``talk_head.0.{0,2,4}.*``. Their own loader then overwrites the meta embeddings on the first
        forward (``quietstar.md`` section 5); this converter keeps the trained values.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        state = _read_state_dict(directory)
        extras = {
            k: state.pop(k)
            for k in list(state)
            if k in ("start_embedding", "end_embedding") or k.startswith("talk_head.")
        }
        missing = [k for k in ("start_embedding", "end_embedding") if k not in extras]
        if missing or not any(k.startswith("talk_head.0.") for k in extras):
            raise ValueError(
                f"{directory}: not the authors' Quiet-STaR layout (missing {missing or 'talk_head.0.*'}); "
                "expected start_embedding, end_embedding and talk_head.0.* next to the Mistral weights"
            )
        hf_config = AutoConfig.from_pretrained(directory)
        hf_config._attn_implementation = "sdpa"
        base = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        if dtype is not None:
            base = base.to(dtype)
        result = base.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        missing_base = [k for k in result.missing_keys if k not in getattr(base, "_tied_weights_keys", {})]
        if unexpected or missing_base:
            raise ValueError(
                f"{directory}: base weights do not fit: missing {missing_base}, unexpected {unexpected}"
            )
        head_keys = sorted({int(k.split(".")[2]) for k in extras if k.startswith("talk_head.0.")})
        n_linear = len(head_keys)
        inferred = (
            QuietStarConfig(n_thought_tokens=max(1, int(getattr(hf_config, "n_ahead", 8)) - 3))
            if config is None
            else config
        )
        if inferred.mixing_head_layers != n_linear:
            raise ValueError(
                f"{directory}: the checkpoint's mixing head has {n_linear} linear layers, the config "
                f"{inferred.mixing_head_layers}"
            )
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(directory)
        vocab = base.get_output_embeddings().weight.shape[0]
        start_id, end_id = vocab - 2, vocab - 1
        if tokenizer is not None:
            ids = tokenizer.convert_tokens_to_ids([inferred.start_token, inferred.end_token])
            unk = getattr(tokenizer, "unk_token_id", None)
            if any(i is None or i == unk for i in ids) and len(tokenizer) == vocab - 2:
                # A base tokenizer without the meta tokens (e.g. Mistral's own): add them; they
                # become the last two ids, which is where the checkpoint keeps them.
                tokenizer.add_special_tokens(
                    {"additional_special_tokens": [inferred.start_token, inferred.end_token]}
                )
                ids = tokenizer.convert_tokens_to_ids([inferred.start_token, inferred.end_token])
            if any(i is None or i == unk for i in ids):
                raise ValueError(
                    f"{directory}: the tokenizer has no {inferred.start_token!r} / {inferred.end_token!r} "
                    f"tokens and {len(tokenizer)} tokens for a vocabulary of {vocab}: pass the tokenizer "
                    "the checkpoint was trained with"
                )
            start_id, end_id = ids
        pad = getattr(hf_config, "pad_token_id", None)
        if tokenizer is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            pad = getattr(hf_config, "eos_token_id", 2)
        model = cls(
            base, inferred, start_id=start_id, end_id=end_id, pad_token_id=int(pad), tokenizer=tokenizer
        )
        heads = {"start_embedding": extras["start_embedding"], "end_embedding": extras["end_embedding"]}
        heads.update(
            {
                f"mixing_head.{k.removeprefix('talk_head.0.')}": v
                for k, v in extras.items()
                if k.startswith("talk_head.0.")
            }
        )
        model.load_heads_state_dict(heads)
        return model


def _load_tokenizer(directory: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((directory / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) or pytorch_model*.bin."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    files = [f for f in files if f.name != HEADS_NAME]
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
