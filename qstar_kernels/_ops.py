"""The compiled backends ("cpu", "triton", "cuda") as ``torch.library`` custom ops.

``qstar::thought_attention_fwd`` and ``qstar::thought_attention_bwd`` are opaque to
``torch.compile``: their fake (meta) implementations give the output shapes, so a model that
calls :func:`qstar_kernels.thought_attention` traces with ``fullgraph=True``. The autograd formula
of the forward op calls the backward op. The pure-PyTorch backends ("reference", "torch") need no
registration: torch.compile traces through them.
"""

from __future__ import annotations

import torch

from .backends import cpu as _cpu
from .backends import cuda_backend as _cuda
from .backends import triton_backend as _triton

_IMPLS = {
    "cpu": (_cpu.forward, _cpu.backward),
    "triton": (_triton.forward, _triton.backward),
    "cuda": (_cuda.forward, _cuda.backward),
}


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


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
    """(out (B, Hq, L, D) in q.dtype, lse (B, Hq, L)); ``window`` <= 0 means none."""
    return _IMPLS[backend][0](q, k, v, keep, scale, window)


@thought_attention_fwd.register_fake
def _(q, k, v, keep, scale, window, backend):
    B, Hq, L, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (B, Hq, L), dtype=_lse_dtype(q)
    )


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
    return _IMPLS[backend][1](grad_out, grad_lse, q, k, v, out, lse, keep, scale, window)


@thought_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, keep, scale, window, backend):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, keep, scale, window, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, keep)
    ctx.scale, ctx.window, ctx.backend = scale, window, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    if torch.is_grad_enabled():
        # create_graph=True: the kernels' gradients are not themselves differentiable, and
        # returning them as constants would silently drop second-order terms.
        raise RuntimeError(
            f"thought_attention(backend={ctx.backend!r}) does not support double backward "
            "(create_graph=True); use backend='torch' or 'reference' for higher-order gradients"
        )
    q, k, v, out, lse, keep = ctx.saved_tensors
    if grad_out is None and grad_lse is None:
        return None, None, None, None, None, None, None
    dq, dk, dv = thought_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, keep, ctx.scale, ctx.window, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


thought_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def thought_attention_op(q, k, v, keep, scale: float, window: int, backend: str):
    """(out, lse) through the registered op."""
    return thought_attention_fwd(q, k, v, keep, scale, window, backend)
