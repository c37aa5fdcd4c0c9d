"""The ``"cuda"`` backend of ``thought_attention``: the kernels of ``csrc/cuda/thought_attention.cu``,
registered in C++ as the operators ``qstar_cuda::thought_attention_fwd`` / ``_bwd``
(``TORCH_LIBRARY``; CUDA kernels only). Their fake implementations are registered here, so that
``torch.compile`` can trace them; the public op goes through ``qstar::thought_attention_fwd``
(:mod:`qstar_kernels._ops`), whose autograd calls the backward operator.

float16/bfloat16 run on the tensor cores (WMMA, float32 accumulation), float32 in plain FMA.
Head dims 64 and 128. Inputs are made contiguous on entry (the kernels read rows of ``D``).

This backend is compiled and statically checked (ptxas resources) on machines without a GPU; see
the README for what has and has not been run.
"""

from __future__ import annotations

import functools

import torch

from .. import _ext

__all__ = ["unavailable_reason", "forward", "backward", "thought_attention_cuda", "HEAD_DIMS"]

HEAD_DIMS = (64, 128)
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


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


def unavailable_reason(device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if the CUDA kernels can run on such tensors (``head_dim`` 0: not known), else why not."""
    if _ext.cuda_extension() is None:
        return (
            "the CUDA extension qstar_kernels._C_cuda is not built or does not import "
            f"({_ext.cuda_extension_error()}); it is built by `pip install -e . --no-build-isolation` "
            "when torch is a CUDA build and nvcc is found"
        )
    if not ops_registered():
        return (
            "qstar_kernels._C_cuda was built from older sources without the thought attention "
            "kernels; rebuild it with `pip install -e . --no-build-isolation`"
        )
    if device_type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors, got tensors on {device_type}"
    if dtype not in _SUPPORTED:
        return f"the 'cuda' backend supports float16, bfloat16 and float32, got {dtype}"
    if head_dim and head_dim not in HEAD_DIMS:
        return f"the 'cuda' backend supports head dims {HEAD_DIMS}, got D={head_dim}"
    return None


def forward(q, k, v, keep, scale: float, window: int):
    """(out (B, Hq, L, D) in q.dtype, lse (B, Hq, L) float32)."""
    ops_registered()
    keep = None if keep is None else keep.contiguous()
    return torch.ops.qstar_cuda.thought_attention_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), keep, float(scale), int(window)
    )


def backward(grad_out, grad_lse, q, k, v, out, lse, keep, scale: float, window: int):
    """(dq, dk, dv) in the inputs' dtypes; ``grad_lse`` may be None."""
    ops_registered()
    keep = None if keep is None else keep.contiguous()
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    return torch.ops.qstar_cuda.thought_attention_bwd(
        grad_out.to(q.dtype).contiguous(),
        grad_lse,
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out.contiguous(),
        lse.contiguous(),
        keep,
        float(scale),
        int(window),
    )


def thought_attention_cuda(q, k, v, *, key_padding_mask=None, scale, sliding_window=None, return_lse=False):
    from .._ops import thought_attention_op

    keep = None if key_padding_mask is None else key_padding_mask.contiguous()
    window = -1 if sliding_window is None else int(sliding_window)
    out, lse = thought_attention_op(q, k, v, keep, float(scale), window, "cuda")
    if return_lse:
        return out, lse
    return out
