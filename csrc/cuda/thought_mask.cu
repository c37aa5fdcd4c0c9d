// Dense thought mask on the GPU, for callers that need the mask tensor itself (for example to feed
// a dense-mask attention). The fused attention kernels never build it.
//
// mask[b, 0, i, s * L + j] (bool) is true iff
//   s == 0: j <= i, keep[b, j], and (window <= 0 or i - j < window)   -- the causal text block
//   s >= 1: j == i and keep[b, i]                                       -- one diagonal per step
//
// Torch headers stay out of this file (see environment.md): raw pointers and a stream only.

#include <cuda_runtime.h>
#include <cstdint>

namespace qstar {

__global__ void thought_mask_kernel(const bool* __restrict__ keep, bool* __restrict__ mask, int64_t B,
                                    int64_t L, int64_t depth, int64_t window) {
  const int64_t width = (depth + 1) * L;
  const int64_t total = B * L * width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
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

cudaError_t launch_thought_mask(const bool* keep, bool* mask, int64_t B, int64_t L, int64_t depth,
                                int64_t window, cudaStream_t stream) {
  const int64_t total = B * L * (depth + 1) * L;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  thought_mask_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(keep, mask, B, L, depth,
                                                                               window);
  return cudaGetLastError();
}

}  // namespace qstar
