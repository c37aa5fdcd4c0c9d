"""The ``"cuda"`` backend of ``mixed_token_logprobs``: the tile loop of
:class:`.base.TiledPasses` with cuBLAS GEMMs (``torch.mm`` in the inputs' dtype, so float16/bfloat16
use the tensor cores) and the CUDA kernels of ``csrc/cuda/mixing.cu`` for every other stage:

* the fused mix prologue ``(1 - w) h_base + w h_thought`` and its backward epilogue;
* the online log-softmax: each tile's row log-sum-exp merged into the running one in one kernel;
* the target gather ``h_i . weight[target_i]``;
* the in-place gradient epilogue ``z <- coef (onehot - exp(z - lse))`` before the two GEMMs.

The kernels are the ``qstar_cuda::lm_head_*`` operators (``TORCH_LIBRARY`` in
``csrc/cuda/mixing_ops.cpp``); their fake implementations are registered here. float32, float16
and bfloat16 inputs; ``sample_thought_tokens`` has no CUDA backend (use ``triton``).
"""

from __future__ import annotations

import functools

import torch

from ... import _ext
from .base import TiledPasses, _Tiles

__all__ = ["CudaPasses", "ops_registered"]


@functools.cache
def ops_registered() -> bool:
    """Load ``qstar_kernels._C_cuda`` (which registers the ``qstar_cuda::`` ops) and register the
    fake implementations once. False when the extension or its LM-head ops are missing."""
    if _ext.cuda_extension() is None or not hasattr(torch.ops.qstar_cuda, "lm_head_mix"):
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    lib = "qstar_cuda::"

    @torch.library.register_fake(lib + "lm_head_mix")
    def _mix(h_base, h_thought, w, dtype):
        return h_base.new_empty(h_base.shape, dtype=dtype)

    @torch.library.register_fake(lib + "lm_head_lse_merge_")
    def _lse_merge(z, lse):
        return None

    @torch.library.register_fake(lib + "lm_head_target_logits")
    def _target(h, weight, target):
        return h.new_empty((h.shape[0],), dtype=torch.float32)

    @torch.library.register_fake(lib + "lm_head_grad_rows_")
    def _grad_rows(z, lse, index, coef, scale):
        return None

    @torch.library.register_fake(lib + "lm_head_mix_backward")
    def _mix_bwd(grad_h, h_base, h_thought, w):
        return (
            torch.empty_like(grad_h, memory_format=torch.contiguous_format),
            torch.empty_like(grad_h, memory_format=torch.contiguous_format),
            grad_h.new_empty((grad_h.shape[0],)),
        )


class CudaPasses(TiledPasses):
    name = "cuda"
    lowp_gemm = True

    def __init__(self):
        ops_registered()
        self.ops = torch.ops.qstar_cuda

    def mix(self, h_base, h_thought, w, dtype):
        hb = h_base.contiguous()
        return self.ops.lm_head_mix(
            hb, h_thought.to(hb.dtype).contiguous(), w.reshape(-1).to(torch.float32).contiguous(), dtype
        )

    def mix_backward(self, grad_h, h_base, h_thought, w):
        hb = h_base.contiguous()
        return self.ops.lm_head_mix_backward(
            grad_h.to(torch.float32).contiguous(),
            hb,
            h_thought.to(hb.dtype).contiguous(),
            w.reshape(-1).to(torch.float32).contiguous(),
        )

    def target_logits(self, h, weight, target):
        # h in the GEMM dtype, as the tiles see it (never a widened copy of the whole weight);
        # the row dot accumulates in float32.
        return self.ops.lm_head_target_logits(
            h.to(weight.dtype).contiguous(), weight.contiguous(), target.contiguous()
        )

    def lse_pass(self, h, weight):
        n, V = h.shape[0], weight.shape[0]
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
        if n == 0:
            return lse
        tiles = _Tiles(n, V, h.dtype, h.device, None, self)
        for v0, v1, _ in tiles.vocab_blocks():
            w_blk = weight[v0:v1]
            for r0, r1 in tiles.row_blocks():
                z = tiles.logits(h[r0:r1], w_blk, None)  # one cuBLAS GEMM
                self.ops.lm_head_lse_merge_(z, lse[r0:r1])  # the online log-softmax, in place
        return lse

    def grad_rows_(self, z, lse, index, coef, scale):
        self.ops.lm_head_grad_rows_(z, lse.contiguous(), index.contiguous(), coef.contiguous(), float(scale))

    def sample_pass(self, h, weight, banned, inv_t, lp_scale, seed):
        raise NotImplementedError("the 'cuda' backend implements mixed_token_logprobs only")
