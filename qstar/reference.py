"""A plain, literal implementation of the Quiet-STaR training forward, the authors' way.

This is the test oracle for the optimised implementation, and "the authors' way" in the training-step
and generation benchmarks; users can import it to check their own numbers. It follows the algorithm
as ``docs/algorithm.md`` describes it: the authors' reference code (github.com/ezelikman/quiet-star,
``modeling_mistral.py``, ``MistralForCausalLM.forward``). It is written for readability, not speed:
dense additive float masks grown by one diagonal block per step, a DynamicCache, one-hot @
embedding-matrix inputs, full-vocabulary logits at every step.

Interpretation choices where the description leaves room (each is repeated at the line it concerns):

1. Labels are `input_ids` (the authors' `labels = ids`); a label is ignored in every CE when it equals
   `pad_token_id` (the authors' quirk 14, ``docs/algorithm.md``, "The authors' quirks"), not where
   `attention_mask` is 0. With right padding that holds pad_token_id the two coincide.
2. The step-0 input embedding is the ordinary embedding lookup (`embed_tokens(input_ids)`, as the HF
   model does when given input_ids); the one-hot `(R*L, V) @ E` matmul is used for the sampled thought
   tokens and the teacher-forced talk tokens (``docs/algorithm.md``, "Sampling thought tokens" and
   "Non-myopic teacher forcing"). Both give the same numbers in float32.
3. Which step gets the start/end embedding is decided by the step index (step 1 and step T-1), not by
   the authors' "does the one-hot contain the start/end id anywhere" test. The two differ only if the
   text itself contains a meta id; that case is outside the spec and not rejected here.
4. Sampling: the token is `argmax` of the hard Gumbel-softmax sample; the next input is the exact
   one-hot of that token times E. `F.gumbel_softmax(hard=True)` returns `y_hard - y_soft + y_soft`,
   whose hot entry can be 1 +- 1 ulp; that ulp is not reproduced. With a `generator`, the Gumbel noise
   is drawn the way `F.gumbel_softmax` draws it (`-log(Exp(1))`), but from the generator (the torch
   function has no generator argument); without one, `F.gumbel_softmax` itself is called.
5. Baseline: `A = r - mean over the P copies` only when P > 1 (the authors' `trice_mode and n_passes > 1`
   guard, ``docs/algorithm.md``, "Rewards and the baseline"); with P = 1, `A = r`. Then
   `A+ = max(A, 0)` when remove_negative_rewards.
6. NLL weights: `original_loss_weight` on the base loss, `1 - original_loss_weight` on the mean of the
   talk losses (both 0.5 with the default: the formula in ``docs/algorithm.md``, "The NLL losses").
7. The policy loss needs at least one sampled thought token: n_ahead >= 4 is required (T - 3 >= 1).
8. The eval-mode override of the authors (K := 1, P := 1 when not model.training) is NOT implemented:
   the model runs in whatever train/eval mode it is in, with the K and P given.
9. intermediate_losses=True computes, at steps 1..T-2, the mixed logits (base hidden unshifted, as the
   authors' shift_idx = 1 there) and their CE, and throws them away (returned under
   "intermediate_ce" for inspection only); the returned loss is unchanged.
10. output_logits=True also returns "logits", the (R, L, V) mixed logits of talk step 0 (the
   `<end>` step), already computed for its CE: what the authors' eval-mode forward (K = 1) returns as
   `logits`. Nothing else changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from qstar_kernels.hf import cache_keyword


def loss_mean(x: torch.Tensor) -> torch.Tensor:
    """The authors' mean: sum over the count of non-zero entries (ignored labels give exact zeros)."""
    return x.sum() / (x != 0).sum()


def token_ce(logits: torch.Tensor, labels: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Unreduced cross-entropy (R, n); labels equal to pad_token_id are ignored (CE = 0 there)."""
    R, n, V = logits.shape
    labels = labels.clone()
    labels[labels == pad_token_id] = -100
    ce = F.cross_entropy(logits.reshape(R * n, V), labels.reshape(R * n), reduction="none", ignore_index=-100)
    return ce.reshape(R, n)


def base_causal_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 1, L, L) additive mask of the step-0 pass: query i sees key k iff k <= i and key k is not pad.

    This is what HF's _prepare_4d_causal_attention_mask produced for the authors
    (``docs/algorithm.md``, "The thought mask").
    """
    R, L = keep.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=keep.device).tril()
    allowed = causal.unsqueeze(0) & keep.unsqueeze(1)  # (R, L queries, L keys)
    mask = torch.zeros(R, 1, L, L, dtype=dtype, device=keep.device)
    mask[~allowed.unsqueeze(1)] = torch.finfo(dtype).min
    return mask


def extend_mask(mask: torch.Tensor, L: int) -> torch.Tensor:
    """Append one diag(non-pad) block on the key axis (``docs/algorithm.md``, "The thought mask").

    The base block's allowed entries are those equal to the mask's maximum (0); the identity keeps the
    diagonal only where the base diagonal is allowed, i.e. where x_j is not padding.
    """
    dtype = mask.dtype
    base_block = mask[:, :, :, :L]
    allowed = base_block == base_block.max()
    eye = torch.eye(L, dtype=torch.float32, device=mask.device).to(dtype)
    diag_allowed = (eye * allowed.to(dtype)) != 0
    block = torch.zeros_like(base_block)
    block[~diag_allowed] = torch.finfo(dtype).min
    return torch.cat([mask, block], dim=-1)


def run_step(lm, inputs_embeds, mask, position_ids, cache):
    """One transformer pass on L new tokens per row; returns the final (post-norm) hidden states."""
    out = lm.model(
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_keyword(lm.model): cache},
    )
    return out.last_hidden_state


def one_hot_embed(tokens: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """(R, L) ids -> (R, L, H) as a dense one-hot (R*L, V) @ E (V, H) matmul, like the authors."""
    R, L = tokens.shape
    V = E.shape[0]
    one_hot = F.one_hot(tokens.reshape(R * L), V).to(E.dtype)
    return (one_hot @ E).reshape(R, L, -1)


def gumbel_hard_sample(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Token ids sampled by hard Gumbel-softmax at tau = 1 (argmax of logits + Gumbel noise)."""
    if generator is None:
        y = F.gumbel_softmax(logits, tau=1.0, hard=True, dim=-1).detach()
        return y.argmax(dim=-1)
    # Same noise construction as F.gumbel_softmax, drawn from the given generator (choice 4).
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    y_soft = ((logits + gumbels) / 1.0).softmax(dim=-1)
    return y_soft.argmax(dim=-1).detach()


def mix(mixing_head, h_base, h_thought):
    """w = head([h_base ; h_thought]) (no sigmoid); returns (mixed hidden, w of shape (R, L))."""
    w = mixing_head(torch.cat([h_base, h_thought], dim=-1))  # (R, L, 1)
    h_mix = (1 - w) * h_base + w * h_thought
    return h_mix, w.squeeze(-1)


def plain_quietstar_forward(
    lm,
    mixing_head,
    start_embedding,
    end_embedding,
    input_ids,
    attention_mask,
    *,
    n_ahead: int,
    n_ahead_talk: int,
    n_passes: int,
    start_id: int,
    end_id: int,
    pad_token_id: int,
    embedding_scale: float = 100.0,
    reinforce_temperature: float = 3.0,
    policy_loss_beta: float = 1e6,
    original_loss_weight: float = 0.5,
    remove_negative_rewards: bool = True,
    thought_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    intermediate_losses: bool = False,
    output_logits: bool = False,
) -> dict:
    T, K, P = n_ahead, n_ahead_talk, n_passes
    if T < 4:
        raise ValueError(f"n_ahead: expected >= 4 (at least one sampled thought token), got {T}")
    if K < 1:
        raise ValueError(f"n_ahead_talk: expected >= 1, got {K}")
    if P < 1:
        raise ValueError(f"n_passes: expected >= 1, got {P}")
    B, L = input_ids.shape
    if L < K + 2:
        raise ValueError(f"input_ids: expected a length L >= n_ahead_talk + 2 = {K + 2}, got {L}")
    R = B * P
    E = lm.get_input_embeddings().weight  # (V, H)
    V = E.shape[0]
    dtype = E.dtype

    if thought_tokens is not None:
        expected = (T - 3, R, L)
        if tuple(thought_tokens.shape) != expected:
            raise ValueError(
                f"thought_tokens: expected shape (n_ahead - 3, B * n_passes, L) = {expected}, "
                f"got {tuple(thought_tokens.shape)}"
            )
        if thought_tokens.dtype.is_floating_point or thought_tokens.dtype == torch.bool:
            raise ValueError(f"thought_tokens: expected an integer dtype, got {thought_tokens.dtype}")
        if ((thought_tokens == start_id) | (thought_tokens == end_id)).any():
            raise ValueError(
                f"thought_tokens: expected no meta-token ids (start_id={start_id}, end_id={end_id}), got some"
            )
        if (thought_tokens < 0).any() or (thought_tokens >= V).any():
            raise ValueError(
                f"thought_tokens: expected ids in [0, {V}), got values in "
                f"[{int(thought_tokens.min())}, {int(thought_tokens.max())}]"
            )

    # Rows: each sequence repeated P times, copies adjacent (rows b*P .. b*P+P-1).
    ids = input_ids.repeat_interleave(P, dim=0)  # (R, L)
    keep = attention_mask.repeat_interleave(P, dim=0).bool()  # (R, L)
    labels = ids  # choice 1: labels = ids, pad_token_id ignored in the CEs

    # Teacher-forcing inputs: labels shifted left by n, right-padded with pad_token_id.
    def shifted_labels(n: int) -> torch.Tensor:
        pad = torch.full((R, n), pad_token_id, dtype=labels.dtype, device=labels.device)
        return torch.cat([labels[:, n:], pad], dim=1)

    start_in = (start_embedding[0] * embedding_scale).expand(R, L, -1)
    end_in = (end_embedding[0] * embedding_scale).expand(R, L, -1)

    cache = DynamicCache()
    position_ids = torch.arange(L, device=input_ids.device).unsqueeze(0)  # (1, L), broadcast over rows

    # ---- step 0: the base pass ---------------------------------------------------------------
    mask = base_causal_mask(keep, dtype)
    h_base = run_step(lm, lm.get_input_embeddings()(ids), mask, position_ids, cache)  # choice 2
    base_logits = lm.lm_head(h_base)  # (R, L, V), full vocabulary
    base_ce = token_ce(base_logits[:, :-1], labels[:, 1:], pad_token_id)  # (R, L-1)
    base_nll = loss_mean(base_ce)

    next_in = start_in
    sampled_tokens = []
    thought_logprobs = []
    talk_ce = []
    talk_nll = []
    deltas = []
    mixing_weights = []
    intermediate_ce = []
    talk0_logits = None

    for a in range(1, T + K - 1):  # steps 1 .. T+K-2: S - 1 = T + K - 2 more passes
        mask = extend_mask(mask, L)
        assert mask.shape == (R, 1, L, (a + 1) * L)
        h = run_step(lm, next_in, mask, position_ids + a, cache)
        assert cache.get_seq_length() == (a + 1) * L

        if a <= T - 3:
            # Thought step: sample t_a from the plain LM head on the thought stream, meta ids excluded.
            logits = lm.lm_head(h).clone()
            logits[:, :, start_id] = -1e10
            logits[:, :, end_id] = -1e10
            if thought_tokens is None:
                tok = gumbel_hard_sample(logits.detach(), generator)
            else:
                tok = thought_tokens[a - 1].to(device=ids.device, dtype=ids.dtype)
            logp = F.log_softmax(logits / reinforce_temperature, dim=-1)
            thought_logprobs.append(logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))  # (R, L)
            sampled_tokens.append(tok)
            next_in = one_hot_embed(tok, E)
        elif a == T - 2:
            next_in = end_in  # the last thought step's output is not sampled from

        if a <= T - 2 and intermediate_losses:
            # Thrown away by the authors (first_and_last_mode): computed for cost only (choice 9).
            h_mix, _ = mix(mixing_head, h_base, h)
            z = lm.lm_head(h_mix)
            intermediate_ce.append(token_ce(z[:, :-1], labels[:, 1:], pad_token_id).detach())

        if a >= T - 1:
            # Talk step s: predicts x_{j+1+s} with the base hidden of position j+s (rolled left by s).
            s = a - (T - 1)
            hb = torch.roll(h_base, shifts=-s, dims=1)
            h_mix, w = mix(mixing_head, hb, h)
            z = lm.lm_head(h_mix)
            if s == 0 and output_logits:
                talk0_logits = z.detach()  # choice 10
            ce = token_ce(z[:, : L - 1 - s], labels[:, 1 + s :], pad_token_id)  # (R, L-1-s)
            ce_base_shift = token_ce(base_logits.detach()[:, s : L - 1], labels[:, 1 + s :], pad_token_id)
            talk_ce.append(ce)
            talk_nll.append(loss_mean(ce))
            deltas.append((ce_base_shift - ce)[:, : L - K - 1])
            mixing_weights.append(w)
            next_in = one_hot_embed(shifted_labels(s + 1), E)  # x_{j+s+1} for the next talk step

    # ---- rewards, advantages, policy loss ---------------------------------------------------
    rewards = torch.stack(deltas).sum(0)  # (R, L-K-1)
    if P > 1:  # choice 5
        per_seq = rewards.reshape(B, P, L - K - 1)
        advantages = (per_seq - per_seq.mean(dim=1, keepdim=True)).reshape(R, L - K - 1)
    else:
        advantages = rewards
    if remove_negative_rewards:
        advantages = advantages.clamp(min=0)
    advantages = advantages.detach()

    policy_terms = [(-advantages * lp[:, : L - K - 1]).mean() for lp in thought_logprobs]
    policy_loss = torch.stack(policy_terms).sum() / (T - 3)

    talk_nll = torch.stack(talk_nll)  # (K,)
    nll = original_loss_weight * base_nll + (1 - original_loss_weight) * talk_nll.mean()  # choice 6
    loss = nll + policy_loss_beta * policy_loss

    out = dict(
        loss=loss,
        base_nll=base_nll,
        talk_nll=talk_nll,
        policy_loss=policy_loss,
        rewards=rewards,
        advantages=advantages,
        mixing_weights=torch.stack(mixing_weights),  # (K, R, L)
        thought_tokens=torch.stack(sampled_tokens),  # (T-3, R, L)
        thought_logprobs=torch.stack(thought_logprobs),  # (T-3, R, L)
        talk_ce=talk_ce,
        base_ce=base_ce,
    )
    if intermediate_losses:
        out["intermediate_ce"] = intermediate_ce
    if output_logits:
        out["logits"] = talk0_logits
    return out
