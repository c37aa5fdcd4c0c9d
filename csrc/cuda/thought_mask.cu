// Dense thought mask on the GPU, for callers that need the mask tensor itself (for example to feed
// a dense-mask attention). The fused attention kernels never build it.
//
// mask[b, 0, i, s * L + j] (bool) is true iff
//   s == 0: j <= i, keep[b, j], and (window <= 0 or i - j < window)   -- the causal text block
//   s >= 1: j == i and keep[b, i]                                       -- one diagonal per step
//
// No torch header here (see cuda/scalar.cuh): raw pointers and a stream only.
#include <cstdint>

#include "cuda/scalar.cuh"
#include "cuda/thought_attention_cuda.h"

namespace qstar::cuda {
namespace {

__global__ void thought_mask_kernel(const bool* __restrict__ keep, bool* __restrict__ mask, int64_t B,
                                    int64_t L, int64_t depth, int64_t window) {
  const int64_t width = (depth + 1) * L;
  const int64_t total = B * L * width;
  for (int64_t idx = grid_thread(); idx < total; idx += grid_stride()) {
    const int64_t col = idx % width;
    const int64_t i = (idx / width) % L;
    const int64_t b = idx / (width * L);
    const int64_t s = col / L;
    const int64_t j = col % L;
    bool allowed;
    if (s == 0) {
      allowed = j <= i && (window <= 0 || i - j < window) && (keep == nullptr || keep[b * L + j]);
    } else {
      allowed = j == i && (keep == nullptr || keep[b * L + i]);
    }
    mask[idx] = allowed;
  }
}

}  // namespace

cudaError_t launch_thought_mask(const bool* keep, bool* mask, int64_t B, int64_t L, int64_t depth,
                                int64_t window, cudaStream_t stream) {
  const int64_t total = B * L * (depth + 1) * L;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  thought_mask_kernel<<<grid_stride_blocks(total, kThreads, 65535 * 8), kThreads, 0, stream>>>(
      keep, mask, B, L, depth, window);
  return cudaGetLastError();
}

}  // namespace qstar::cuda
