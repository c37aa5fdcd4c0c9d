// The torch glue that the CUDA ops share (thought_attention_ops.cpp, mixing_ops.cpp, bindings.cpp):
// the kernels' DType of a tensor, the launch check, the current stream, and the entry points of
// thought_attention_ops.cpp that bindings.cpp exposes to Python. Host C++ with torch headers; the
// .cu files never include it.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "cuda/launch.h"

namespace qstar::cuda {

// The kernels' element type for t; fails with "fn: name must be float32, float16 or bfloat16".
inline DType dtype_of(const char* fn, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK(false, fn, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::f32;
}

inline void check_launch(const char* fn, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, fn, ": kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Test mode of the qstar_cuda ops: fill every output with NaN before the kernels write it.
// Returns the previous setting.
bool set_poison_outputs(bool on);

// The input checks of thought_attention_fwd alone, on any device (tests run them on the CPU).
// Returns (B, Hq, Hkv, L, D, a, window) as the kernels would see them.
std::vector<int64_t> check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const std::optional<at::Tensor>& keep, double scale,
                                            int64_t window);

}  // namespace qstar::cuda
