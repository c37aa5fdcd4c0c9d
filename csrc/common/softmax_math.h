// Online-softmax / log-sum-exp helpers shared by the CPU and CUDA kernels.
//
// Plain inline functions on scalars: no torch, no std containers, so that nvcc can compile them
// for the device. Every function here treats -inf as "nothing seen yet" and never produces a NaN
// for an empty row: the empty row's lse stays -inf, and its probabilities are 0.
#pragma once

#include <cmath>
#include <limits>

#include "common/host_device.h"

namespace qstar {

template <typename T>
QSTAR_HD inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// The running state of an online softmax over one row: max m and sum l of exp(x - m).
template <typename T>
struct SoftmaxState {
  T m;
  T l;
};

template <typename T>
QSTAR_HD inline SoftmaxState<T> softmax_state_empty() {
  return SoftmaxState<T>{neg_inf<T>(), T(0)};
}

// exp(x - m) that is 0 (never NaN) when x is -inf, including when m is -inf too.
template <typename T>
QSTAR_HD inline T exp_shifted(T x, T m) {
  return (x == neg_inf<T>()) ? T(0) : static_cast<T>(std::exp(x - m));
}

// Rescale factor exp(m_old - m_new) for a running sum when the maximum grows; 0 for an empty old
// state (its sum is 0 anyway) so that -inf - -inf is never formed.
template <typename T>
QSTAR_HD inline T rescale_factor(T m_old, T m_new) {
  return (m_old == neg_inf<T>()) ? T(0) : static_cast<T>(std::exp(m_old - m_new));
}

// Merge a block with maximum m_blk and sum l_blk (of exp(x - m_blk)) into the running state.
// Returns the factor by which an accumulator (e.g. the running P @ V) of the old state must be
// multiplied; the block's own accumulator must be multiplied by exp(m_blk - m_new), which is
// rescale_factor(m_blk, s.m) after the call.
template <typename T>
QSTAR_HD inline T softmax_merge(SoftmaxState<T>& s, T m_blk, T l_blk) {
  const T m_new = (m_blk > s.m) ? m_blk : s.m;
  if (m_new == neg_inf<T>()) return T(1);  // both empty
  const T a = rescale_factor(s.m, m_new);
  s.l = s.l * a + l_blk * rescale_factor(m_blk, m_new);
  s.m = m_new;
  return a;
}

// Add one score x to the running state (returns the factor for the old accumulator).
template <typename T>
QSTAR_HD inline T softmax_push(SoftmaxState<T>& s, T x) {
  return softmax_merge(s, x, (x == neg_inf<T>()) ? T(0) : T(1));
}

// The natural-log logsumexp of a finished row: m + log(l), -inf for an empty row.
template <typename T>
QSTAR_HD inline T softmax_lse(const SoftmaxState<T>& s) {
  return (s.m == neg_inf<T>() || !(s.l > T(0))) ? neg_inf<T>()
                                                : s.m + static_cast<T>(std::log(s.l));
}

// 1 / l for normalising a finished row, 0 for an empty row (its output is then exactly 0).
template <typename T>
QSTAR_HD inline T softmax_inv_sum(const SoftmaxState<T>& s) {
  return (s.m == neg_inf<T>() || !(s.l > T(0))) ? T(0) : T(1) / s.l;
}

// log(exp(a) + exp(b)) of two partial log-sum-exps, -inf when both are -inf.
template <typename T>
QSTAR_HD inline T lse_merge(T a, T b) {
  const T hi = (a > b) ? a : b;
  const T lo = (a > b) ? b : a;
  if (hi == neg_inf<T>()) return hi;
  return hi + static_cast<T>(std::log1p(std::exp(lo - hi)));
}

// The softmax probability of a score given the row's final lse: exp(x - lse), 0 for an empty row
// (lse = -inf) or a masked score (x = -inf).
template <typename T>
QSTAR_HD inline T prob_from_lse(T x, T lse) {
  return (lse == neg_inf<T>() || x == neg_inf<T>()) ? T(0) : static_cast<T>(std::exp(x - lse));
}

// The row term of the softmax backward with a differentiable lse: D_i = rowsum(dO * O) - dlse_i.
// dS_ij = P_ij * (dP_ij - D_i).
template <typename T>
QSTAR_HD inline T softmax_bwd_row_term(T do_dot_o, T grad_lse) {
  return do_dot_o - grad_lse;
}

}  // namespace qstar
