// The fused LM-head ops on the CPU (mixed_token_logprobs, sample_thought_tokens): tiled passes over
// the logits z = h @ weight.T that never hold (N, V). The contracts: docs/kernels.md, "Contract: mixed
// LM-head log-probabilities" and "Contract: thought-token sampling"; the design: lm_head.cpp. h: (n, H) and
// weight: (V, H), contiguous, both float32 or both float64, on the CPU; block_rows x block_cols is
// the tile shape.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace qstar::cpu {

// lse[i] = logsumexp_v z[i, v] (natural log), (n,) in h's dtype. NaN for a row with a NaN or +inf
// logit.
at::Tensor lm_head_lse_fwd(const at::Tensor& h, const at::Tensor& weight, int64_t block_rows,
                           int64_t block_cols);

// With z[:, banned] = -inf: tokens[i] = the first argmax_v of z[i, v] * inv_temperature +
// G(seed, i, v) (G: the Gumbel noise of qstar_kernels/reference/sampling.py), or of z[i, v] when
// inv_temperature == 0 (greedy); lse[i] = logsumexp_v z[i, v] * lp_scale. Returns (tokens int64,
// lse in h's dtype).
std::tuple<at::Tensor, at::Tensor> lm_head_sample_fwd(const at::Tensor& h, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& banned,
                                                      double inv_temperature, double lp_scale,
                                                      int64_t seed, int64_t block_rows,
                                                      int64_t block_cols);

// The gradients (grad_h (n, H) if need_h, grad_weight (V, H) if need_weight) of
// sum_i coef[i] / scale * logp[i], logp[i] = z[i, index[i]] * scale - lse[i] (z with the banned
// ids at -inf); that is, of sum_i g[i] * logp[i] for coef = g * scale. lse, coef: (n,) in h's dtype.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> lm_head_bwd(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& banned,
    const at::Tensor& lse, const at::Tensor& index, const at::Tensor& coef, double scale,
    bool need_h, bool need_weight, int64_t block_rows, int64_t block_cols);

// The Gumbel noise of rows [row0, row0 + rows) and ids [0, vocab), float32, as the sampling pass
// draws it (for tests).
at::Tensor lm_head_gumbel_noise(int64_t seed, int64_t row0, int64_t rows, int64_t vocab);

// The mixing prologue (1 - w) h_base + w h_thought, (N, H) in dtype (float32 or float64); w has N
// elements. The per-element maths is common/lm_head_math.h, which the CUDA kernels share.
at::Tensor lm_head_mix(const at::Tensor& h_base, const at::Tensor& h_thought, const at::Tensor& w,
                       at::ScalarType dtype);

// The mixing epilogue of the backward: from grad_h (N, H) of the mixed state, (grad_h_base,
// grad_h_thought, grad_w (N,)) in grad_h's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_mix_backward(const at::Tensor& grad_h,
                                                                    const at::Tensor& h_base,
                                                                    const at::Tensor& h_thought,
                                                                    const at::Tensor& w);

// Test mode: fill every buffer these kernels allocate (outputs, tables, tiles) with NaN (-7 for
// integers) before they run. Returns the previous setting.
bool lm_head_set_poison(bool on);

// One line: the GEMM provider, the ISA of the float32 loops and the number of threads.
std::string lm_head_backend_info();

}  // namespace qstar::cpu
