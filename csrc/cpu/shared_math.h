// The shared GPU/CPU per-element maths, run in the CUDA kernels' sequence on the CPU (for tests).
// See shared_math.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace qstar::cpu {

// scores (R, C) float32 -> (weights (R, C), lse (R,)): softmax rows by the forward kernel's online
// sequence (n_push single pushes, then tiles of `tile`).
std::tuple<at::Tensor, at::Tensor> online_softmax_rows(const at::Tensor& scores, int64_t n_push,
                                                       int64_t tile);

// dS (R, C) = P (dP - Delta), P = exp(S - lse), Delta = do_dot_o - grad_lse (all float32).
at::Tensor softmax_bwd_rows(const at::Tensor& scores, const at::Tensor& lse, const at::Tensor& dp,
                            const at::Tensor& do_dot_o, const at::Tensor& grad_lse);

// The row log-sum-exp of z (R, C) by merging tiles of `tile` columns.
at::Tensor lse_merge_tiles(const at::Tensor& z, int64_t tile);

// coef (onehot(index) - exp(z * scale - lse)) per row.
at::Tensor logit_grad_rows(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& index,
                           const at::Tensor& coef, double scale);

}  // namespace qstar::cpu
