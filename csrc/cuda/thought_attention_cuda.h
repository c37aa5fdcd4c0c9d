// The launch interface of the CUDA thought attention kernels (csrc/cuda/thought_attention.cu) and
// of the dense thought mask (csrc/cuda/thought_mask.cu). Plain C++ and the CUDA runtime only: no
// torch header, so that nvcc stays fast. The torch glue (checks, allocation, streams, op
// registration) is thought_attention_ops.cpp and bindings.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"  // DType, LaunchInfo

namespace qstar::cuda {

// Every tensor is contiguous and on one device. q/out/grad_out/dq: (B, Hq, L, D);
// k/v/dk/dv: (B, Hkv, (a + 1) * L, D); keep: (B, L) bool or null; lse/delta/grad_lse: (B, Hq, L)
// float32 (grad_lse may be null). window <= 0: no sliding window.
struct AttnShape {
  int B, Hq, Hkv, L, D, a;
  int window;
  float scale;
};

struct AttnFwdArgs {
  AttnShape s;
  const void* q;
  const void* k;
  const void* v;
  const bool* keep;
  void* out;
  float* lse;
};

struct AttnBwdArgs {
  AttnShape s;
  const void* q;
  const void* k;
  const void* v;
  const bool* keep;
  const void* out;
  const float* lse;
  const void* grad_out;
  const float* grad_lse;
  float* delta;  // scratch (B, Hq, L)
  void* dq;
  void* dk;
  void* dv;
};

// Head dims with compiled kernels.
constexpr bool attention_head_dim_supported(int D) { return D == 64 || D == 128; }

cudaError_t thought_attention_fwd(DType dtype, const AttnFwdArgs& args, cudaStream_t stream);
cudaError_t thought_attention_bwd(DType dtype, const AttnBwdArgs& args, cudaStream_t stream);

// The launch configuration of every kernel instance (see LaunchInfo). Returns the number of
// entries (fills up to cap).
int thought_attention_launch_table(LaunchInfo* out, int cap);

// The dense (B, 1, L, (depth + 1) * L) bool thought mask into `mask`; keep: (B, L) bool or null.
cudaError_t launch_thought_mask(const bool* keep, bool* mask, int64_t B, int64_t L, int64_t depth,
                                int64_t window, cudaStream_t stream);

}  // namespace qstar::cuda
