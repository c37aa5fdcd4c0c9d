"""The ``"cpu"`` backend: the C++/OpenMP kernels of ``csrc/cpu`` behind an autograd.Function.

The kernels compute in float32 (float64 for float64 inputs); float16/bfloat16 inputs are widened
on entry and the output is rounded back to the input dtype.
"""

from __future__ import annotations

import torch

from .. import _ext


class _ThoughtAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, scale, window):
        ext = _ext.cpu_extension()
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        qc = q.to(compute).contiguous()
        kc = k.to(compute).contiguous()
        vc = v.to(compute).contiguous()
        out, lse = ext.thought_attention_fwd(qc, kc, vc, keep, scale, window)
        ctx.save_for_backward(qc, kc, vc, out, lse, keep)
        ctx.scale, ctx.window = scale, window
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable()
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():
            # create_graph=True: the kernel's gradients are not themselves differentiable, and
            # returning them as constants would silently drop second-order terms.
            raise RuntimeError(
                "thought_attention(backend='cpu') does not support double backward "
                "(create_graph=True); use backend='torch' or 'reference' for higher-order gradients"
            )
        qc, kc, vc, out, lse, keep = ctx.saved_tensors
        if grad_out is None and grad_lse is None:
            return None, None, None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(out.dtype).contiguous()
        if grad_lse is not None:
            grad_lse = grad_lse.to(lse.dtype).contiguous()
        dq, dk, dv = _ext.cpu_extension().thought_attention_bwd(
            grad_out, qc, kc, vc, out, lse, grad_lse, keep, ctx.scale, ctx.window
        )
        qd, kd, vd = ctx.dtypes
        return dq.to(qd), dk.to(kd), dv.to(vd), None, None, None


def thought_attention_cpu(q, k, v, *, key_padding_mask=None, scale, sliding_window=None, return_lse=False):
    keep = None if key_padding_mask is None else key_padding_mask.contiguous()
    window = -1 if sliding_window is None else int(sliding_window)
    out, lse = _ThoughtAttentionCPU.apply(q, k, v, keep, float(scale), window)
    if return_lse:
        return out, lse
    return out
