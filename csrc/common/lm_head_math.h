// Per-element maths of the fused LM-head ops (docs/kernels.md, "Contract: mixed LM-head log-probabilities"),
// shared by the CPU kernels (csrc/cpu/lm_head.cpp) and the CUDA kernels (csrc/cuda/mixing.cu), so
// that the CPU tests exercise the arithmetic the GPU runs. Plain inline functions on scalars, no
// torch.
#pragma once

#include "common/softmax_math.h"

namespace qstar {

// The mixing prologue: the hidden state the LM head sees, (1 - w) h_base + w h_thought.
template <typename T>
QSTAR_HD inline T mix_hidden(T h_base, T h_thought, T w) {
  return (T(1) - w) * h_base + w * h_thought;
}

// The mixing epilogue of the backward: given g = dL/dh of the mixed state, the gradients of
// h_base and h_thought, and the term g * (h_thought - h_base) whose sum over the hidden units is
// dL/dw.
template <typename T>
struct MixGrad {
  T h_base, h_thought, w_term;
};

template <typename T>
QSTAR_HD inline MixGrad<T> mix_hidden_grad(T g, T h_base, T h_thought, T w) {
  return MixGrad<T>{(T(1) - w) * g, w * g, g * (h_thought - h_base)};
}

// The in-place gradient epilogue of logp = z[target] * scale - lse: dlogp/dz times coef, from the
// softmax probability p = exp(z * scale - lse) of the entry: coef * (onehot - p).
template <typename T>
QSTAR_HD inline T logit_grad_from_prob(T p, T coef, bool is_target) {
  return coef * ((is_target ? T(1) : T(0)) - p);
}

// The same from the logit itself.
template <typename T>
QSTAR_HD inline T logit_grad(T z, T scale, T lse, T coef, bool is_target) {
  return logit_grad_from_prob(static_cast<T>(std::exp(z * scale - lse)), coef, is_target);
}

// A log-probability from the target logit and the row's lse: never above 0 (rounding), NaN stays
// NaN (a comparison with NaN is false).
template <typename T>
QSTAR_HD inline T logprob_from_lse(T z_target, T lse) {
  const T x = z_target - lse;
  return x > T(0) ? T(0) : x;
}

// Merge the log-sum-exp of one more block into a running one (lse_merge), except that a NaN in
// either stays NaN (lse_merge's comparisons would pick the other operand as the maximum).
template <typename T>
QSTAR_HD inline T lse_merge_nan(T running, T block) {
  if (running != running || block != block) return running + block;  // NaN
  return lse_merge(running, block);
}

}  // namespace qstar
