"""The tiled algorithm of the fused LM-head ops, forward and backward, over the passes a backend
supplies (:class:`~qstar_kernels.backends.lm_head.base.LMHeadPasses`). The custom ops of
:mod:`qstar_kernels.custom_ops` run these functions; their autograd formulas call the backward ones.

The logits ``z = h @ weight.T`` are computed one tile at a time, never as an ``(N, V)`` tensor::

    forward   for each vocabulary block, for each row block:
                  z = h_rows @ weight[ids].T                               (one GEMM)
                  lse_rows = logaddexp(lse_rows, logsumexp(z * scale))     (online log-sum-exp)
                  sampling only: the tile's best Gumbel key and id; keep the larger key
              logp = z[target] * scale - lse, with z[target] = h . weight[target] (a row dot)
    backward  the same tiles again (rows whose grad_output is 0 are skipped):
                  z = h_rows @ weight[ids].T                               (recomputed, one GEMM)
                  z <- coef * (onehot(target) - exp(z * scale - lse))      (dlogp/dz, in place)
                  grad_h[rows] += z @ weight[ids];  grad_weight[ids] += z.T @ h_rows   (two GEMMs)

So a forward+backward costs four GEMMs of the size of the logits, against three for the unfused
computation, and keeps no activation beyond the inputs and the ``(N,)`` lse. (Computing the
gradients during the forward would save one GEMM only when ``grad_output`` is the same for every
row, and would hold a weight-sized buffer from the forward to the backward.) Double backward is
refused by the custom ops' autograd.
"""

from __future__ import annotations

import torch

from .backends.lm_head.base import LMHeadPasses, dtypes

__all__ = ["first_allowed_id", "mixed_forward", "mixed_backward", "sample_forward", "sample_backward"]


# ------------------------------------------------------------------------------------------------
# mixed_token_logprobs: logp = log_softmax(((1 - w) h_base + w h_thought) @ weight.T)[target]
# ------------------------------------------------------------------------------------------------


def _mix(h_base, h_thought, w, rows, dtype, passes: LMHeadPasses):
    """(1 - w) * h_base + w * h_thought on the given rows (all when rows is None), in dtype."""
    hb = h_base if rows is None else h_base.index_select(0, rows)
    if h_thought is None:
        return hb.to(dtype)
    ht = h_thought if rows is None else h_thought.index_select(0, rows)
    wc = w.reshape(-1)
    wc = wc if rows is None else wc.index_select(0, rows)
    return passes.mix(hb, ht, wc, dtype)


def mixed_forward(h_base, h_thought, w, weight, target, ignore_index: int, passes: LMHeadPasses):
    """``(logp, lse)``, both ``(N,)`` in the accumulation dtype; both 0 at ignored rows. ``target``
    is int64."""
    acc, gemm = dtypes(h_base, passes)
    N, device = h_base.shape[0], h_base.device
    rows = (target != ignore_index).nonzero()[:, 0]  # (n,) the rows that have a target
    all_rows = rows.numel() == N
    h = _mix(h_base, h_thought, w, None if all_rows else rows, acc, passes)  # (n, H)
    weight_g = weight.to(gemm).contiguous()
    t = target if all_rows else target.index_select(0, rows)
    lse_rows = passes.lse_pass(h.to(gemm).contiguous(), weight_g)  # (n,)
    # The target logit as a row dot (in the accumulation dtype), not from the tiles.
    z_t = passes.target_logits(h, weight_g, t)
    logp_rows = (z_t - lse_rows).clamp_max(0.0)  # log-probabilities are <= 0 (NaN stays NaN)
    if all_rows:
        return logp_rows, lse_rows
    logp = torch.zeros(N, dtype=acc, device=device)
    logp.index_copy_(0, rows, logp_rows)
    lse = torch.zeros(N, dtype=acc, device=device)
    lse.index_copy_(0, rows, lse_rows)
    return logp, lse


def mixed_backward(
    grad_logp, h_base, h_thought, w, weight, target, lse, ignore_index: int, passes: LMHeadPasses, needs
):
    """``(grad_h_base, grad_h_thought, grad_w, grad_weight)``, None where ``needs`` is False."""
    need_hb, need_ht, need_w, need_weight = needs
    acc, gemm = dtypes(h_base, passes)
    N, H = h_base.shape
    rows = (target != ignore_index).nonzero()[:, 0]
    all_rows = rows.numel() == N
    g, t = grad_logp.to(acc), target
    if not all_rows:
        g, t, lse = g.index_select(0, rows), t.index_select(0, rows), lse.index_select(0, rows)
    active = (g != 0).nonzero()[:, 0]  # rows whose gradient can be nonzero (NaN counts)
    if active.numel() < g.numel():
        g, lse, t = g[active], lse[active], t[active]
        rows = active if all_rows else rows[active]
        all_rows = False
    need_h = need_hb or need_ht or need_w
    h = _mix(h_base, h_thought, w, None if all_rows else rows, acc, passes)
    grad_h_rows, grad_weight = passes.grad_pass(
        h.to(gemm).contiguous(),
        weight.to(gemm).contiguous(),
        None,
        lse.contiguous(),
        t.contiguous(),
        g.contiguous(),
        1.0,
        need_h,
        need_weight,
    )
    grad_hb = grad_ht = grad_w = None
    if need_h:
        if all_rows:
            grad_h = grad_h_rows
        else:
            grad_h = torch.zeros(N, H, dtype=acc, device=h_base.device)
            grad_h.index_copy_(0, rows, grad_h_rows)
        if h_thought is None:
            grad_hb = grad_h.to(h_base.dtype) if need_hb else None
        else:
            g_hb, g_ht, g_w = passes.mix_backward(grad_h, h_base, h_thought, w)
            grad_hb = g_hb.to(h_base.dtype) if need_hb else None
            grad_ht = g_ht.to(h_thought.dtype) if need_ht else None
            grad_w = g_w.reshape(w.shape).to(w.dtype) if need_w else None
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hb, grad_ht, grad_w, grad_weight


# ------------------------------------------------------------------------------------------------
# sample_thought_tokens: tokens ~ softmax(z / T) by Gumbel-max over the tiles (the max of the
# tiles' maxima is the max of the row), logp = log_softmax(z / T_lp)[tokens]; banned ids -inf.
# ------------------------------------------------------------------------------------------------


def sample_forward(h, weight, banned, temperature: float, logprob_temperature: float, seed: int, passes):
    """``(tokens (N,) int64, logp (N,), lse (N,))``, ``lse`` the log-sum-exp at
    ``logprob_temperature``. ``banned``: sorted unique ids on ``h``'s device, or None."""
    acc, gemm = dtypes(h, passes)
    inv_t = 0.0 if temperature == 0 else 1.0 / temperature
    lp_scale = 1.0 / logprob_temperature
    h_acc = h.to(acc)
    weight_g = weight.to(gemm).contiguous()
    tokens, lse = passes.sample_pass(h_acc.to(gemm).contiguous(), weight_g, banned, inv_t, lp_scale, seed)
    z_tok = (h_acc * weight_g.index_select(0, tokens).to(acc)).sum(-1)
    logp = (z_tok * lp_scale - lse).clamp_max(0.0)
    # A row whose logits hold a NaN (or +inf, or no finite value) has no maximum: the passes' running
    # max never moves and would hand back their start id, banned or not. Such a row's logp is NaN;
    # it gets the smallest allowed id instead (the reference does the same), and keeps logp NaN.
    tokens = torch.where(torch.isnan(logp), first_allowed_id(banned, tokens.device), tokens)
    return tokens, logp, lse


def first_allowed_id(banned: torch.Tensor | None, device) -> torch.Tensor:
    """The smallest id not in ``banned`` (sorted, unique, non-negative ids, or None), as a 0-d int64
    tensor on ``device``: the length of the prefix of ``banned`` that equals ``0, 1, 2, ...``
    (computed on the device: no synchronisation)."""
    if banned is None or not banned.numel():
        return torch.zeros((), dtype=torch.int64, device=device)
    banned = banned.to(device)
    return (banned == torch.arange(banned.numel(), device=device)).sum()


def sample_backward(grad_logp, h, weight, banned, tokens, lse, logprob_temperature: float, passes, needs):
    """``(grad_h, grad_weight)``, None where ``needs`` is False."""
    need_h, need_weight = needs
    acc, gemm = dtypes(h, passes)
    lp_scale = 1.0 / logprob_temperature
    coef = grad_logp.to(acc) * lp_scale
    rows = (coef != 0).nonzero()[:, 0]  # rows whose gradient can be nonzero (NaN counts)
    all_rows = rows.numel() == coef.numel()

    def pick(x):
        return x if all_rows else x.index_select(0, rows)

    grad_h_rows, grad_weight = passes.grad_pass(
        pick(h).to(gemm).contiguous(),
        weight.to(gemm).contiguous(),
        banned,
        pick(lse).contiguous(),
        pick(tokens).contiguous(),
        pick(coef).contiguous(),
        lp_scale,
        need_h,
        need_weight,
    )
    grad_h = None
    if need_h:
        if all_rows:
            grad_h = grad_h_rows
        else:
            grad_h = torch.zeros(h.shape, dtype=acc, device=h.device)
            grad_h.index_copy_(0, rows, grad_h_rows)
        grad_h = grad_h.to(h.dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_h, grad_weight
