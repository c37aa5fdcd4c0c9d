// CUDA kernels of mixed_token_logprobs (docs/kernels.md, "Contract: mixed LM-head log-probabilities"):
// everything around the LM-head GEMMs, which cuBLAS runs. The per-element maths is common/lm_head_math.h and
// common/softmax_math.h, shared with the CPU kernels (csrc/cpu/lm_head.cpp).
//
//   mix          h = (1 - w) h_base + w h_thought           grid-stride over elements
//   lse_merge    lse_i <- lse_merge(lse_i, logsumexp(z_i))  a block per tile row (max, then sum)
//   target       z_t[i] = h_i . weight[target_i]            a warp per row
//   grad_rows    z <- coef (onehot - exp(z scale - lse))    grid-stride over elements, in place
//   mix_bwd      grad_h_base, grad_h_thought, grad_w        a block per row
#include <cstdint>

#include "common/lm_head_math.h"
#include "cuda/mixing_cuda.h"
#include "cuda/scalar.cuh"

namespace qstar::cuda {
namespace {

constexpr int kThreads = 256;

// Block-wide reductions over kThreads threads (every thread gets the result).
template <bool MAX>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  x = MAX ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane_id() == 0) scratch[warp_id()] = x;
  __syncthreads();
  x = scratch[0];
  for (int i = 1; i < kThreads / kWarp; ++i) x = MAX ? (scratch[i] > x ? scratch[i] : x) : x + scratch[i];
  return x;
}

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kThreads, 1)
    mix_kernel(const Tin* __restrict__ hb, const Tin* __restrict__ ht, const float* __restrict__ w,
               Tout* __restrict__ out, int64_t N, int64_t H) {
  const int64_t total = N * H;
  for (int64_t idx = grid_thread(); idx < total; idx += grid_stride()) {
    out[idx] = from_f32<Tout>(mix_hidden(to_f32(hb[idx]), to_f32(ht[idx]), w[idx / H]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    lse_merge_kernel(const T* __restrict__ z, int64_t ld, int64_t cols, float* __restrict__ lse) {
  __shared__ float scratch[kThreads / kWarp];
  const T* row = z + blockIdx.x * ld;
  float m = neg_inf<float>();
  float bad = 0.f;  // > 0: a NaN or +inf in the row
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float x = to_f32(row[j]);
    bad += (x != x || x == -neg_inf<float>()) ? 1.f : 0.f;
    m = x > m ? x : m;
  }
  m = block_reduce<true>(m, scratch);
  bad = block_reduce<false>(bad, scratch);
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) s += exp_shifted(to_f32(row[j]), m);
  s = block_reduce<false>(s, scratch);
  if (threadIdx.x == 0) {
    const float tile = bad > 0.f ? nan_f32() : softmax_lse(SoftmaxState<float>{m, s});
    lse[blockIdx.x] = lse_merge_nan(lse[blockIdx.x], tile);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    target_kernel(const T* __restrict__ h, const T* __restrict__ weight,
                  const int64_t* __restrict__ target, float* __restrict__ out, int64_t n, int64_t H,
                  int64_t V) {
  const int64_t i = grid_warp();
  const int lane = lane_id();
  if (i >= n) return;
  const int64_t t = target[i];
  if (t < 0 || t >= V) {
    if (lane == 0) out[i] = nan_f32();
    return;
  }
  float acc = 0.f;
  for (int64_t k = lane; k < H; k += kWarp) acc += to_f32(h[i * H + k]) * to_f32(weight[t * H + k]);
  acc = warp_sum(acc);
  if (lane == 0) out[i] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    grad_rows_kernel(T* __restrict__ z, int64_t ld, int64_t rows, int64_t cols,
                     const float* __restrict__ lse, const int64_t* __restrict__ index,
                     const float* __restrict__ coef, float scale) {
  const int64_t total = rows * cols;
  for (int64_t idx = grid_thread(); idx < total; idx += grid_stride()) {
    const int64_t i = idx / cols, j = idx % cols;
    T& e = z[i * ld + j];
    e = from_f32<T>(logit_grad(to_f32(e), scale, lse[i], coef[i], j == index[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    mix_bwd_kernel(const float* __restrict__ g, const T* __restrict__ hb, const T* __restrict__ ht,
                   const float* __restrict__ w, float* __restrict__ ghb, float* __restrict__ ght,
                   float* __restrict__ gw, int64_t H) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t i = blockIdx.x;
  const float wi = w[i];
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < H; k += kThreads) {
    const int64_t idx = i * H + k;
    const MixGrad<float> r = mix_hidden_grad(g[idx], to_f32(hb[idx]), to_f32(ht[idx]), wi);
    ghb[idx] = r.h_base;
    ght[idx] = r.h_thought;
    acc += r.w_term;
  }
  acc = block_reduce<false>(acc, scratch);
  if (threadIdx.x == 0) gw[i] = acc;
}

// The grid of the grid-stride kernels.
unsigned grid_for(int64_t elements) { return grid_stride_blocks(elements, kThreads, 65535 * 16); }

}  // namespace

cudaError_t lm_head_mix(DType in, DType out, const void* h_base, const void* h_thought,
                        const float* w, void* dst, int64_t N, int64_t H, cudaStream_t stream) {
  if (N * H == 0) return cudaSuccess;
  if (out != in && out != DType::f32) return cudaErrorInvalidValue;
  return by_dtype(in, [&](auto tag) {
    using T = decltype(tag);
    const T* b = static_cast<const T*>(h_base);
    const T* t = static_cast<const T*>(h_thought);
    if (out == DType::f32) {
      mix_kernel<T, float><<<grid_for(N * H), kThreads, 0, stream>>>(b, t, w, static_cast<float*>(dst), N, H);
    } else {
      mix_kernel<T, T><<<grid_for(N * H), kThreads, 0, stream>>>(b, t, w, static_cast<T*>(dst), N, H);
    }
    return cudaGetLastError();
  });
}

cudaError_t lm_head_lse_merge(DType dt, const void* z, int64_t ld, int64_t rows, int64_t cols,
                              float* lse, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  return by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    lse_merge_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(z), ld, cols, lse);
    return cudaGetLastError();
  });
}

cudaError_t lm_head_target_logits(DType dt, const void* h, const void* weight,
                                  const int64_t* target, float* out, int64_t n, int64_t H,
                                  int64_t V, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kRows = kThreads / kWarp;
  return by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    target_kernel<T><<<blocks_for(n, kRows), kThreads, 0, stream>>>(
        static_cast<const T*>(h), static_cast<const T*>(weight), target, out, n, H, V);
    return cudaGetLastError();
  });
}

cudaError_t lm_head_grad_rows(DType dt, void* z, int64_t ld, int64_t rows, int64_t cols,
                              const float* lse, const int64_t* index, const float* coef,
                              float scale, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    grad_rows_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream>>>(static_cast<T*>(z), ld, rows,
                                                                        cols, lse, index, coef, scale);
    return cudaGetLastError();
  });
}

cudaError_t lm_head_mix_backward(DType in, const float* g, const void* h_base,
                                 const void* h_thought, const float* w, float* grad_h_base,
                                 float* grad_h_thought, float* grad_w, int64_t N, int64_t H,
                                 cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;
  return by_dtype(in, [&](auto tag) {
    using T = decltype(tag);
    mix_bwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        g, static_cast<const T*>(h_base), static_cast<const T*>(h_thought), w, grad_h_base,
        grad_h_thought, grad_w, H);
    return cudaGetLastError();
  });
}

int mixing_launch_table(LaunchInfo* out, int cap) {
  const char* names[] = {"mix_kernel", "lse_merge_kernel", "target_kernel", "grad_rows_kernel",
                         "mix_bwd_kernel"};
  int n = 0;
  for (const char* name : names) {
    for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
      if (n < cap) out[n] = LaunchInfo{name, dt, 0, kThreads, 0};
      ++n;
    }
  }
  return n;
}

}  // namespace qstar::cuda
