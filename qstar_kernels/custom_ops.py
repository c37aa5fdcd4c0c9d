"""The fused paths of the three public ops as ``torch.library`` custom ops::

    qstar::thought_attention_fwd / _bwd        backends cpu, triton, cuda
    qstar::mixed_token_logprobs_fwd / _bwd     backends torch, cpu, triton, cuda (the tiled algorithm)
    qstar::sample_thought_tokens_fwd / _bwd    backends torch, cpu, triton

Each op is opaque to ``torch.compile``: its fake implementation gives the output shapes, so a model
that calls the public ops traces with ``fullgraph=True``. The autograd formula of each forward op
calls its backward op, and refuses double backward (the kernels' gradients are not themselves
differentiable). The checks that read tensor values (target ids, banned ids) run inside the ops,
so that a compiled graph has no data-dependent branch around them (eagerly, the public functions
check the banned ids before anything runs as well). Sampling takes its seed as a 0-d int64 tensor,
drawn outside the op from the caller's generator (``qstar_kernels.sampling._seed_tensor``, the same
draw as :func:`qstar_kernels.sampling.draw_sampling_seed`; under ``torch.compile`` the compiled RNG
draws it), so the op itself is deterministic.

The pure-PyTorch ``reference`` backends (and the attention's structured ``torch`` backend) need no
registration: torch.compile traces through them.
"""

from __future__ import annotations

import torch

from . import lm_head_tiled as tiled
from ._checks import banned_id_set, check_target_values
from .backends.attention import cpu as _attention_cpu
from .backends.attention import cuda as _attention_cuda
from .backends.attention import triton as _attention_triton
from .backends.lm_head.base import LMHeadPasses, acc_dtype

__all__ = [
    "thought_attention_fwd",
    "thought_attention_bwd",
    "mixed_token_logprobs_fwd",
    "mixed_token_logprobs_bwd",
    "sample_thought_tokens_fwd",
    "sample_thought_tokens_bwd",
    "passes_for",
]

#: The attention backends behind qstar::thought_attention_fwd (looked up at each call).
ATTENTION_BACKENDS = {"cpu": _attention_cpu, "triton": _attention_triton, "cuda": _attention_cuda}


def _refuse_double_backward(op: str, backend: str, higher: str) -> None:
    if torch.is_grad_enabled():
        # create_graph=True: the kernels' gradients are not themselves differentiable, and
        # returning them as constants would silently drop second-order terms.
        raise RuntimeError(
            f"{op}(backend={backend!r}) does not support double backward (create_graph=True); "
            f"use {higher} for higher-order gradients"
        )


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor like ``t`` (what the fake implementations return)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


# ------------------------------------------------------------------------------------------------
# thought attention
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("qstar::thought_attention_fwd", mutates_args=())
def thought_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    window: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, L, D) in q.dtype, lse (B, Hq, L)); ``keep`` a contiguous bool (B, L) mask or
    None; ``window`` <= 0 means none."""
    return ATTENTION_BACKENDS[backend].forward(q, k, v, keep, scale, window)


@thought_attention_fwd.register_fake
def _(q, k, v, keep, scale, window, backend):
    B, Hq, L, _ = q.shape
    return _fresh(q), q.new_empty((B, Hq, L), dtype=acc_dtype(q))


@torch.library.custom_op("qstar::thought_attention_bwd", mutates_args=())
def thought_attention_bwd(
    grad_out: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    window: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes."""
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return ATTENTION_BACKENDS[backend].backward(grad_out, grad_lse, q, k, v, out, lse, keep, scale, window)


@thought_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, keep, scale, window, backend):
    return _fresh(q), _fresh(k), _fresh(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, keep, scale, window, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, keep)
    ctx.scale, ctx.window, ctx.backend = scale, window, backend
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, grad_lse):
    _refuse_double_backward("thought_attention", ctx.backend, "backend='torch' or 'reference'")
    q, k, v, out, lse, keep = ctx.saved_tensors
    if grad_out is None and grad_lse is None:
        return None, None, None, None, None, None, None
    dq, dk, dv = thought_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, keep, ctx.scale, ctx.window, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


thought_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# ------------------------------------------------------------------------------------------------
# The LM-head ops
# ------------------------------------------------------------------------------------------------


def passes_for(backend: str) -> LMHeadPasses:
    """The passes of a fused LM-head backend (the modules load on first use: the Triton one
    decorates its kernels when it loads)."""
    if backend == "torch":
        from .backends.lm_head.torch import TorchPasses

        return TorchPasses()
    if backend == "cpu":
        from .backends.lm_head.cpu import CpuPasses

        return CpuPasses()
    if backend == "triton":
        from .backends.lm_head.triton import TritonPasses

        return TritonPasses()
    if backend == "cuda":
        from .backends.lm_head.cuda import CudaPasses

        return CudaPasses()
    raise AssertionError(backend)


def _grads_or_empty(grads, like) -> tuple[torch.Tensor, ...]:
    """A custom op returns tensors only: an unneeded gradient is an empty tensor."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _fake_grads(needs, inputs) -> tuple[torch.Tensor, ...]:
    like = inputs[0]
    return tuple(_fresh(x) if need else like.new_empty(0) for need, x in zip(needs, inputs))


@torch.library.custom_op("qstar::mixed_token_logprobs_fwd", mutates_args=())
def mixed_token_logprobs_fwd(
    h_base: torch.Tensor,
    h_thought: torch.Tensor | None,
    w: torch.Tensor | None,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (N,), lse (N,)) in the accumulation dtype, 0 at ignored rows; ``target`` int64."""
    check_target_values(target, weight.shape[0], ignore_index)
    return tiled.mixed_forward(h_base, h_thought, w, weight, target, ignore_index, passes_for(backend))


@mixed_token_logprobs_fwd.register_fake
def _(h_base, h_thought, w, weight, target, ignore_index, backend):
    n = (h_base.shape[0],)
    return h_base.new_empty(n, dtype=acc_dtype(h_base)), h_base.new_empty(n, dtype=acc_dtype(h_base))


@torch.library.custom_op("qstar::mixed_token_logprobs_bwd", mutates_args=())
def mixed_token_logprobs_bwd(
    grad_logp: torch.Tensor,
    h_base: torch.Tensor,
    h_thought: torch.Tensor | None,
    w: torch.Tensor | None,
    weight: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h_base, grad_h_thought, grad_w, grad_weight); an empty tensor where ``needs`` is False."""
    grads = tiled.mixed_backward(
        grad_logp, h_base, h_thought, w, weight, target, lse, ignore_index, passes_for(backend), needs
    )
    return _grads_or_empty(grads, h_base)


@mixed_token_logprobs_bwd.register_fake
def _(grad_logp, h_base, h_thought, w, weight, target, lse, ignore_index, backend, needs):
    return _fake_grads(needs, (h_base, h_thought, w, weight))


def _mixed_setup(ctx, inputs, output):
    h_base, h_thought, w, weight, target, ignore_index, backend = inputs
    ctx.save_for_backward(h_base, h_thought, w, weight, target, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _mixed_backward(ctx, grad_logp, _grad_lse):
    _refuse_double_backward("mixed_token_logprobs", ctx.backend, "backend='reference'")
    if grad_logp is None:
        return (None,) * 7
    needs = list(ctx.needs_input_grad[:4])
    grads = mixed_token_logprobs_bwd(grad_logp, *ctx.saved_tensors, ctx.ignore_index, ctx.backend, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 3


mixed_token_logprobs_fwd.register_autograd(_mixed_backward, setup_context=_mixed_setup)


def _banned_on(h: torch.Tensor, banned: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
    banned = banned_id_set(banned, vocab)
    return None if banned is None else banned.to(h.device)


@torch.library.custom_op("qstar::sample_thought_tokens_fwd", mutates_args=())
def sample_thought_tokens_fwd(
    h: torch.Tensor,
    weight: torch.Tensor,
    banned: torch.Tensor | None,
    seed: torch.Tensor,
    temperature: float,
    logprob_temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (N,), tokens (N,) int64, lse (N,)); ``banned`` any int64 ids (checked here);
    ``seed`` a 0-d int64 tensor (ignored when ``temperature == 0``). (A floating output first:
    opcheck's autograd test sums the outputs into the first one's dtype.)"""
    banned = _banned_on(h, banned, weight.shape[0])
    seed_value = 0 if temperature == 0 else int(seed)
    tokens, logp, lse = tiled.sample_forward(
        h, weight, banned, temperature, logprob_temperature, seed_value, passes_for(backend)
    )
    return logp, tokens, lse


@sample_thought_tokens_fwd.register_fake
def _(h, weight, banned, seed, temperature, logprob_temperature, backend):
    n = (h.shape[0],)
    acc = acc_dtype(h)
    return h.new_empty(n, dtype=acc), h.new_empty(n, dtype=torch.int64), h.new_empty(n, dtype=acc)


@torch.library.custom_op("qstar::sample_thought_tokens_bwd", mutates_args=())
def sample_thought_tokens_bwd(
    grad_logp: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    banned: torch.Tensor | None,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    logprob_temperature: float,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_h, grad_weight); an empty tensor where ``needs`` is False."""
    banned = _banned_on(h, banned, weight.shape[0])
    grads = tiled.sample_backward(
        grad_logp, h, weight, banned, tokens, lse, logprob_temperature, passes_for(backend), needs
    )
    return _grads_or_empty(grads, h)


@sample_thought_tokens_bwd.register_fake
def _(grad_logp, h, weight, banned, tokens, lse, logprob_temperature, backend, needs):
    return _fake_grads(needs, (h, weight))


def _sample_setup(ctx, inputs, output):
    h, weight, banned, seed, temperature, logprob_temperature, backend = inputs
    _, tokens, lse = output
    ctx.save_for_backward(h, weight, banned, tokens, lse)
    ctx.logprob_temperature, ctx.backend = logprob_temperature, backend
    ctx.mark_non_differentiable(tokens, lse)
    ctx.set_materialize_grads(False)


def _sample_backward(ctx, grad_logp, _grad_tokens, _grad_lse):
    _refuse_double_backward("sample_thought_tokens", ctx.backend, "backend='reference'")
    if grad_logp is None:
        return (None,) * 7
    needs = list(ctx.needs_input_grad[:2])
    grads = sample_thought_tokens_bwd(
        grad_logp, *ctx.saved_tensors, ctx.logprob_temperature, ctx.backend, needs
    )
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 5


sample_thought_tokens_fwd.register_autograd(_sample_backward, setup_context=_sample_setup)
