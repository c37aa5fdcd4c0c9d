"""The ``"cpu"`` backend of the LM-head ops: each pass of :class:`.base.LMHeadPasses` runs in
C++ (``csrc/cpu/lm_head.cpp``): OpenMP over vocabulary blocks, single-threaded BLAS GEMMs per tile,
vectorised row loops. Tiles are float32 (float64 for float64 inputs); float16/bfloat16 inputs are
widened on entry."""

from __future__ import annotations

from ... import _ext
from .base import LMHeadPasses, choose_tiling

__all__ = ["CpuPasses"]


class CpuPasses(LMHeadPasses):
    name = "cpu"
    # A 256 x 512 float32 tile (512 KiB, one per thread) stays in the L2 cache while its row passes
    # run, and a single-threaded GEMM of that shape runs near peak.
    cpu_tile = (256, 512)

    def __init__(self):
        self.ext = _ext.cpu_extension()

    def _tile(self, h, weight):
        t = choose_tiling(h.shape[0], weight.shape[0], h.device, self)
        return t.rows, t.cols

    # The mixing prologue/epilogue in C++ (common/lm_head_math.h, the maths the CUDA kernels run).
    def mix(self, h_base, h_thought, w, dtype):
        return self.ext.lm_head_mix(h_base, h_thought, w, dtype)

    def mix_backward(self, grad_h, h_base, h_thought, w):
        return self.ext.lm_head_mix_backward(grad_h.contiguous(), h_base, h_thought, w)

    def lse_pass(self, h, weight):
        return self.ext.lm_head_lse_fwd(h, weight, *self._tile(h, weight))

    def sample_pass(self, h, weight, banned, inv_t, lp_scale, seed):
        return self.ext.lm_head_sample_fwd(
            h, weight, banned, float(inv_t), float(lp_scale), int(seed), *self._tile(h, weight)
        )

    def grad_pass(self, h, weight, banned, lse, index, coef, scale, need_h, need_w):
        return self.ext.lm_head_bwd(
            h,
            weight,
            banned,
            lse,
            index,
            coef,
            float(scale),
            bool(need_h),
            bool(need_w),
            *self._tile(h, weight),
        )
