// The launch interface of the CUDA thought attention kernels (csrc/cuda/thought_attention.cu).
// Plain C++ and the CUDA runtime only: no torch header, so that nvcc stays fast (environment.md).
// The torch glue (checks, allocation, streams, op registration) is thought_attention_ops.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qstar::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

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

// The launch configuration of every kernel instance, for the resource test: the kernel's base
// name (a substring of its mangled name), the dtype and head dim it serves, threads per block and
// the dynamic shared memory it is launched with. Returns the number of entries (fills up to cap).
struct LaunchInfo {
  const char* kernel;
  DType dtype;
  int head_dim;
  int threads;
  int dynamic_smem;
};
int thought_attention_launch_table(LaunchInfo* out, int cap);

}  // namespace qstar::cuda
