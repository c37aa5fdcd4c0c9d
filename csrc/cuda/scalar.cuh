// The scalar helpers of the CUDA kernels (every .cu file), in one place: the element types and
// their float32 conversions, warp reductions, thread and warp indices, grid sizes, and the switch
// from a run-time DType to the compiled element type. CUDA headers only: no torch header enters a
// .cu file, so that nvcc stays fast. The per-element softmax and LM-head maths, which the CPU
// kernels share, is in common/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

namespace qstar::cuda {

constexpr int kWarp = 32;

// ------------------------------------------------------------------------------------------------
// Element types: the kernels compute in float32 and load/store float, __half or __nv_bfloat16.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// float32 to T, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    static_assert(std::is_same_v<T, float>, "the kernels store float, __half or __nv_bfloat16");
    return x;
  }
}

// A quiet NaN, for a result that must not look finite.
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// Calls fn(T{}) with the element type of dt; what fn returns (cudaErrorInvalidValue for an unknown
// dt).
template <typename Fn>
cudaError_t by_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::f32:
      return fn(float{});
    case DType::f16:
      return fn(__half{});
    case DType::bf16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------------
// Warps: butterfly reductions over the 32 lanes (every lane gets the result).
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The maximum, ignoring nothing: -inf only when every lane holds -inf (NaN is not selected, as in
// the CPU kernels' comparison).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// ------------------------------------------------------------------------------------------------
// Indices (one-dimensional grids)
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarp; }
__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarp; }

// A grid-stride loop: this thread's first element, and the step (every thread of the grid).
__device__ __forceinline__ int64_t grid_thread() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Warp-per-row kernels: this warp's index in the grid (blocks are whole warps).
__device__ __forceinline__ int64_t grid_warp() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
}

// ------------------------------------------------------------------------------------------------
// Grid sizes (host)
// ------------------------------------------------------------------------------------------------
// ceil(a / b) for a >= 0 and b > 0.
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `per_block` items that cover `items`, as a grid dimension.
inline unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(ceil_div(items, per_block));
}

// The blocks of a grid-stride kernel over `elements`: one thread per element, at least 1 block and
// at most max_blocks (the loop covers the rest).
inline unsigned grid_stride_blocks(int64_t elements, int threads, int64_t max_blocks) {
  const int64_t blocks = ceil_div(elements, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > max_blocks ? max_blocks : blocks);
}

}  // namespace qstar::cuda
