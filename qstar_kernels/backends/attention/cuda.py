"""The ``"cuda"`` backend of ``thought_attention``: the kernels of ``csrc/cuda/thought_attention.cu``,
registered in C++ as the operators ``qstar_cuda::thought_attention_fwd`` / ``_bwd``
(``TORCH_LIBRARY``; CUDA kernels only). Their fake implementations are registered here, so that
``torch.compile`` can trace them; the public op goes through ``qstar::thought_attention_fwd``
(:mod:`qstar_kernels.custom_ops`), whose autograd calls the backward operator. What this backend
supports (dtypes, head dims 64 and 128) is in :mod:`qstar_kernels.dispatch`.

float16/bfloat16 run on the tensor cores (WMMA, float32 accumulation), float32 in plain FMA.
Head dims 64 and 128. Inputs are made contiguous on entry (the kernels read rows of ``D``).

This backend is compiled and statically checked (ptxas resources) on machines without a GPU; see
``docs/kernels.md``, "CUDA status: what was checked without a GPU", for what has and has not run.
"""

from __future__ import annotations

import functools

import torch

from ... import _ext

__all__ = ["ops_registered", "forward", "backward"]


@functools.cache
def ops_registered() -> bool:
    """Load ``qstar_kernels._C_cuda`` (its static initialisers register the ``qstar_cuda::`` ops)
    and register the fake implementations once. False when the extension is not there."""
    ext = _ext.cuda_extension()
    if ext is None or not hasattr(torch.ops.qstar_cuda, "thought_attention_fwd"):
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    @torch.library.register_fake("qstar_cuda::thought_attention_fwd")
    def _fwd_fake(q, k, v, keep, scale, window):
        B, Hq, L, _ = q.shape
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
            (B, Hq, L), dtype=torch.float32
        )

    @torch.library.register_fake("qstar_cuda::thought_attention_bwd")
    def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, keep, scale, window):
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
        )


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned: the kernels read rows in 16-byte vectors. A contiguous view
    that starts mid-allocation (``buf[1:].view(...)``) is copied, as ``.contiguous()`` would copy a
    strided one."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def forward(q, k, v, keep, scale: float, window: int):
    """(out (B, Hq, L, D) in q.dtype, lse (B, Hq, L) float32)."""
    ops_registered()
    return torch.ops.qstar_cuda.thought_attention_fwd(
        _dense(q), _dense(k), _dense(v), keep, float(scale), int(window)
    )


def backward(grad_out, grad_lse, q, k, v, out, lse, keep, scale: float, window: int):
    """(dq, dk, dv) in the inputs' dtypes; ``grad_lse`` may be None."""
    ops_registered()
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    return torch.ops.qstar_cuda.thought_attention_bwd(
        _dense(grad_out.to(q.dtype)),
        grad_lse,
        _dense(q),
        _dense(k),
        _dense(v),
        _dense(out),
        lse.contiguous(),
        keep,
        float(scale),
        int(window),
    )
