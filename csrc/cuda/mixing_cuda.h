// The launch interface of the CUDA kernels of mixed_token_logprobs (csrc/cuda/mixing.cu): the
// element-wise and row stages around the LM-head GEMMs, which cuBLAS runs (through ATen, in
// mixing_ops.cpp). Plain C++ and the CUDA runtime only, no torch header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"  // DType, LaunchInfo

namespace qstar::cuda {

// out (N, H) = (1 - w) h_base + w h_thought; h_base, h_thought of dtype `in`, w float32 (N,),
// out of dtype `out` (float32 or `in`).
cudaError_t lm_head_mix(DType in, DType out, const void* h_base, const void* h_thought,
                        const float* w, void* dst, int64_t N, int64_t H, cudaStream_t stream);

// The online log-softmax over a tile z (rows, cols) with row stride ld, dtype dt:
// lse[i] <- log(exp(lse[i]) + sum_j exp(z[i, j])) (float32; NaN for a row with a NaN or +inf).
cudaError_t lm_head_lse_merge(DType dt, const void* z, int64_t ld, int64_t rows, int64_t cols,
                              float* lse, cudaStream_t stream);

// The target gather: out[i] = h[i] . weight[target[i]] in float32 (NaN for a target outside
// [0, V)); h (n, H) and weight (V, H) of dtype dt.
cudaError_t lm_head_target_logits(DType dt, const void* h, const void* weight,
                                  const int64_t* target, float* out, int64_t n, int64_t H,
                                  int64_t V, cudaStream_t stream);

// The in-place gradient epilogue: z[i, j] <- coef[i] * (onehot(index[i])_j - exp(z[i, j] * scale
// - lse[i])); index relative to the tile (outside [0, cols): no one-hot). z of dtype dt.
cudaError_t lm_head_grad_rows(DType dt, void* z, int64_t ld, int64_t rows, int64_t cols,
                              const float* lse, const int64_t* index, const float* coef,
                              float scale, cudaStream_t stream);

// The mixing epilogue of the backward: from g (N, H) float32, grad_h_base = (1 - w) g,
// grad_h_thought = w g, grad_w[i] = sum_k g (h_thought - h_base), all float32.
cudaError_t lm_head_mix_backward(DType in, const float* g, const void* h_base,
                                 const void* h_thought, const float* w, float* grad_h_base,
                                 float* grad_h_thought, float* grad_w, int64_t N, int64_t H,
                                 cudaStream_t stream);

// The launch configuration of every kernel instance (see LaunchInfo); as
// thought_attention_launch_table.
int mixing_launch_table(LaunchInfo* out, int cap);

}  // namespace qstar::cuda
