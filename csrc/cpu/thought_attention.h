// Thought attention ("diagonal-plus-causal"), the C++/OpenMP CPU kernels. The contract:
// docs/kernels.md, "Contract: thought attention"; the design: thought_attention.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace qstar::cpu {

// q: (B, Hq, L, D); k, v: (B, Hkv, (a+1)*L, D); all contiguous, all float32 or all float64, cpu.
// keep: optional bool (B, L), True for real tokens. window <= 0: no sliding window.
// Returns out (B, Hq, L, D) and lse (B, Hq, L) (natural log; -inf for a row with nothing allowed),
// both of q's dtype.
std::tuple<at::Tensor, at::Tensor> thought_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const std::optional<at::Tensor>& keep,
                                                         double scale, int64_t window);

// The gradients of out and lse of thought_attention_fwd. grad_lse is optional (B, Hq, L).
// Returns dq, dk, dv, shaped and typed like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> thought_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& keep, double scale, int64_t window);

// A one-line description of what the kernels run on (GEMM provider, threads, ISA), for debugging.
std::string thought_attention_backend_info();

// Test mode: fill every buffer the kernels allocate with NaN before they run. Returns the old value.
bool set_poison_outputs(bool on);

}  // namespace qstar::cpu
