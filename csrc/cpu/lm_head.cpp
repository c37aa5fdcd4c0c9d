// The fused LM-head ops on the CPU (mixed_token_logprobs, sample_thought_tokens): the whole tiled
// pass over the logits z = h @ weight.T, forward and backward, without ever holding (N, V).
//
// Design
// ------
// * Work unit = one block of Vc vocabulary ids (default 512). Units run under one OpenMP parallel
//   region with a dynamic schedule, so a thread that the OS slows down (a shared machine) delays
//   nobody: the others take the remaining units. Inside a unit the rows go by in blocks of Rb
//   (default 256); the tile z (Rb x Vc, 512 KiB in float32) is computed by one single-threaded
//   BLAS GEMM into the thread's buffer and stays in its L2 cache for the row passes. The weight
//   block (Vc x H) is read once per unit.
// * Forward: per tile row, pass 1 takes the maximum (noting NaNs), pass 2 sums exp((z - max) *
//   scale) in float blocks added into a double; sampling adds pass 3: the Gumbel keys
//   z * (1/T) + G in blocks of 256 ids (64 Philox4x32-10 counters give the 256 words; noise defined
//   in qstar_kernels/reference/sampling.py), the block maximum and the first index of it. Each
//   unit leaves its per-row lse (and best key and id) in a (units, N) table; a merge per row
//   then combines the units in vocabulary order (online log-sum-exp; a strictly larger key wins,
//   so the first maximum wins ties, as in torch.argmax). Non-finite rows (a NaN or +inf logit)
//   get lse = NaN, never a quietly finite number.
// * Backward: per tile, z is recomputed (GEMM), turned in place into coef * (onehot(index) -
//   exp(z * scale - lse)), then grad_weight[block] (+)= z^T h_rows (the unit owns that block: no
//   race) and tmp = z W_block, added into grad_h[rows] under that row block's lock (a cheap
//   Rb x H add next to the GEMMs; threads start at different row blocks).
// * GEMMs: gemm() of cpu/blas.h, single-threaded inside the parallel region (torch's own BLAS,
//   or at::addmm_ without it).
// * float32 runs vectorised loops compiled per ISA (target_clones: avx512f / avx2 / default) with
//   polynomial exp and log written for the vectoriser (relative error about 1e-7); float64 uses
//   std::exp / std::log (the noise is float32 by definition, in both).
// * Extra memory: per thread one tile and one Rb x H block, the (units, N) tables, grad_h and
//   grad_weight; all from at::empty, so the profiler sees it.
#include "cpu/lm_head.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "common/lm_head_math.h"
#include "common/philox.h"
#include "common/poison.h"
#include "cpu/blas.h"
#include "cpu/platform.h"

namespace qstar::cpu {
namespace {

constexpr int kNoiseBlock = 256;  // ids per Philox block (64 counters x 4 words)

// ------------------------------------------------------------------------------------------------
// Vectorisable float32 exp and log
// ------------------------------------------------------------------------------------------------

// exp(x): x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial for exp(r) (truncation
// error below 1e-8), and 2^n built in the exponent bits. Inputs below -88 (including -inf) give
// exactly 0 (n = -127 makes the bit pattern of +0), inputs above 88 are clamped, NaN stays NaN
// (both clamps are written so that a NaN fails their comparison and passes through).
QSTAR_AI float exp_f32(float x) {
  float xc = x < -88.0f ? -88.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 = hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int ni = static_cast<int>(n);  // in [-127, 127] (garbage for NaN, but then p is NaN)
  return p * std::bit_cast<float>((ni + 127) << 23);
}

// log(x) for positive normal x (the only inputs it gets: uniforms in (0, 1) and their -log):
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172,
// by its odd series up to s^9 (truncation below 3e-9 relative).
QSTAR_AI float log_f32(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  int32_t e = ((bits >> 23) & 0xFF) - 127;
  float m = std::bit_cast<float>((bits & 0x007FFFFF) | 0x3F800000);  // [1, 2)
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  float p = 2.0f / 9.0f;
  p = p * s2 + 2.0f / 7.0f;
  p = p * s2 + 2.0f / 5.0f;
  p = p * s2 + 2.0f / 3.0f;
  const float fe = static_cast<float>(e);
  // e * ln 2 split in a high part (8 significant bits: exact products) and a low part.
  return fe * 0.693359375f + (fe * -2.12194440e-4f + (2.0f * s + s * s2 * p));
}

QSTAR_AI float vexp(float x) { return exp_f32(x); }
QSTAR_AI double vexp(double x) { return std::exp(x); }

// ------------------------------------------------------------------------------------------------
// Row bodies (templated on the value type; the float32 ones are instantiated per ISA below)
// ------------------------------------------------------------------------------------------------

// The maximum of the row and whether it holds a NaN.
template <typename T>
QSTAR_AI T body_max(const T* __restrict z, int64_t n, bool& has_nan) {
  T m = neg_inf<T>();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    const T x = z[j];
    m = x > m ? x : m;
    nan |= (x != x);
  }
  has_nan = nan != 0;
  return m;
}

// sum_j exp((z[j] - m) * scale), float blocks accumulated in a double.
template <typename T>
QSTAR_AI double body_sum_exp(const T* __restrict z, int64_t n, T m, T scale) {
  double total = 0.0;
  constexpr int64_t kBlock = 512;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = b; j < e; ++j) s += vexp((z[j] - m) * scale);
    total += static_cast<double>(s);
  }
  return total;
}

// logsumexp_j(z[j] * scale): NaN for a row with a NaN or +inf, -inf for a row of -inf only.
template <typename T>
QSTAR_AI T body_lse(const T* __restrict z, int64_t n, T scale) {
  bool has_nan = false;
  const T m = body_max(z, n, has_nan);
  if (has_nan || m == std::numeric_limits<T>::infinity()) return std::numeric_limits<T>::quiet_NaN();
  if (m == neg_inf<T>()) return m;  // every id banned (in this tile)
  const double s = body_sum_exp(z, n, m, scale);
  return static_cast<T>(static_cast<double>(m) * scale + std::log(s));
}

// The first index of the maximum of key[0, n) if it exceeds best (updating best), else -1.
template <typename T>
QSTAR_AI int64_t body_block_argmax(const T* __restrict key, int64_t n, T& best) {
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = key[j] > m ? key[j] : m;
  if (!(m > best)) return -1;
  best = m;
  for (int64_t j = 0; j < n; ++j)
    if (key[j] == m) return j;
  return -1;  // unreachable
}

// Gumbel noise of ids [v0, v0 + 256) of one row (v0 a multiple of 4) into g (256 floats).
QSTAR_AI void body_noise_block(float* __restrict g, int64_t v0, uint32_t row, uint32_t k0,
                                  uint32_t k1) {
  constexpr int kCounters = kNoiseBlock / 4;
  uint32_t w[4][kCounters];
  const uint32_t q0 = static_cast<uint32_t>(v0 >> 2);
#pragma omp simd
  for (int j = 0; j < kCounters; ++j) {
    uint32_t c0 = q0 + static_cast<uint32_t>(j), c1 = row, c2 = 0, c3 = 0;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    w[0][j] = c0;
    w[1][j] = c1;
    w[2][j] = c2;
    w[3][j] = c3;
  }
  float gl[4][kCounters];
  for (int l = 0; l < 4; ++l) {
#pragma omp simd
    for (int j = 0; j < kCounters; ++j) {
      const float u = philox_word_to_open_uniform(w[l][j]);
      gl[l][j] = -log_f32(-log_f32(u));
    }
  }
  for (int j = 0; j < kCounters; ++j)
    for (int l = 0; l < 4; ++l) g[4 * j + l] = gl[l][j];
}

// The sampled id (relative to z) of one row of ids [v0, v0 + n): argmax of z * inv_t + G
// (inv_t > 0) or of z (inv_t == 0); its key goes to best (-inf if no key beats -inf).
template <typename T>
QSTAR_AI int64_t body_sample(const T* __restrict z, int64_t n, int64_t v0, T inv_t, uint32_t row,
                                uint32_t k0, uint32_t k1, T& best) {
  best = neg_inf<T>();
  int64_t token = 0;
  if (inv_t == T(0)) {
    for (int64_t b = 0; b < n; b += kNoiseBlock) {
      const int64_t len = b + kNoiseBlock < n ? kNoiseBlock : n - b;
      const int64_t j = body_block_argmax(z + b, len, best);
      if (j >= 0) token = b + j;
    }
    return token;
  }
  alignas(64) float g[kNoiseBlock];
  alignas(64) T key[kNoiseBlock];
  for (int64_t b = 0; b < n; b += kNoiseBlock) {
    const int64_t len = b + kNoiseBlock < n ? kNoiseBlock : n - b;
    body_noise_block(g, v0 + b, row, k0, k1);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) key[j] = z[b + j] * inv_t + static_cast<T>(g[j]);
    const int64_t j = body_block_argmax(key, len, best);
    if (j >= 0) token = b + j;
  }
  return token;
}

// z <- coef * (onehot(index) - exp(z * scale - lse)).
template <typename T>
QSTAR_AI void body_grad_row(T* __restrict z, int64_t n, int64_t index, T coef, T scale, T lse) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] = logit_grad_from_prob(vexp(z[j] * scale - lse), coef, j == index);
}

QSTAR_CLONES float row_lse_f32(const float* z, int64_t n, float scale) {
  return body_lse(z, n, scale);
}
QSTAR_CLONES int64_t row_sample_f32(const float* z, int64_t n, int64_t v0, float inv_t,
                                       uint32_t row, uint32_t k0, uint32_t k1, float& best) {
  return body_sample(z, n, v0, inv_t, row, k0, k1, best);
}
QSTAR_CLONES void row_grad_f32(float* z, int64_t n, int64_t index, float coef, float scale,
                                  float lse) {
  body_grad_row(z, n, index, coef, scale, lse);
}
QSTAR_CLONES void noise_block_f32(float* g, int64_t v0, uint32_t row, uint32_t k0, uint32_t k1) {
  body_noise_block(g, v0, row, k0, k1);
}

double row_lse(const double* z, int64_t n, double scale) { return body_lse(z, n, scale); }
float row_lse(const float* z, int64_t n, float scale) { return row_lse_f32(z, n, scale); }
int64_t row_sample(const double* z, int64_t n, int64_t v0, double inv_t, uint32_t row, uint32_t k0,
                   uint32_t k1, double& best) {
  return body_sample(z, n, v0, inv_t, row, k0, k1, best);
}
int64_t row_sample(const float* z, int64_t n, int64_t v0, float inv_t, uint32_t row, uint32_t k0,
                   uint32_t k1, float& best) {
  return row_sample_f32(z, n, v0, inv_t, row, k0, k1, best);
}
void row_grad(double* z, int64_t n, int64_t index, double coef, double scale, double lse) {
  body_grad_row(z, n, index, coef, scale, lse);
}
void row_grad(float* z, int64_t n, int64_t index, float coef, float scale, float lse) {
  row_grad_f32(z, n, index, coef, scale, lse);
}

// ------------------------------------------------------------------------------------------------
// The passes
// ------------------------------------------------------------------------------------------------

PoisonSwitch poisoned;  // the test mode of these kernels (lm_head_set_poison)

at::Tensor fresh(at::IntArrayRef shape, at::ScalarType dtype) {
  return poisoned(at::empty(shape, at::TensorOptions().dtype(dtype)));
}

struct Plan {
  int64_t n, H, V, rb, vc, units, row_blocks;
  int threads;
};

Plan make_plan(int64_t n, int64_t H, int64_t V, int64_t block_rows, int64_t block_cols) {
  Plan p{};
  p.n = n;
  p.H = H;
  p.V = V;
  p.rb = std::clamp<int64_t>(block_rows, 1, std::max<int64_t>(n, 1));
  p.vc = block_cols >= V ? V : std::max<int64_t>(4, block_cols - block_cols % 4);
  p.units = (V + p.vc - 1) / p.vc;
  p.row_blocks = (n + p.rb - 1) / p.rb;
  p.threads = static_cast<int>(
      std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(p.units, 1)));
  return p;
}

// The banned ids (sorted) of [v0, v0 + vc), relative to v0, as a pointer range into `banned`.
struct Span {
  const int64_t* lo;
  const int64_t* hi;
};
Span banned_in(const std::vector<int64_t>& banned, int64_t v0, int64_t vc) {
  const int64_t* b = banned.data();
  const int64_t* e = b + banned.size();
  return Span{std::lower_bound(b, e, v0), std::lower_bound(b, e, v0 + vc)};
}

template <typename T>
void ban(T* z, int64_t rows, int64_t vc, int64_t v0, Span s) {
  for (const int64_t* p = s.lo; p != s.hi; ++p)
    for (int64_t r = 0; r < rows; ++r) z[r * vc + (*p - v0)] = neg_inf<T>();
}

// Forward: lse over each unit's ids (and, when sampling, the best key and its id), into the
// (units, n) tables, then merged per row.
template <typename T>
void forward_pass(const Plan& p, const T* h, const T* W, const std::vector<int64_t>& banned,
                  bool sampling, T lp_scale, T inv_t, uint32_t k0, uint32_t k1, T* lse,
                  int64_t* tokens) {
  const at::ScalarType st = scalar_type_of<T>();
  at::Tensor part_lse = fresh({p.units, p.n}, st);
  at::Tensor part_key = fresh({sampling ? p.units : 0, p.n}, st);
  at::Tensor part_tok = fresh({sampling ? p.units : 0, p.n}, at::kLong);
  at::Tensor scratch = fresh({p.threads, p.rb * p.vc}, st);
  T* pl = part_lse.data_ptr<T>();
  T* pk = part_key.data_ptr<T>();
  int64_t* pt = part_tok.data_ptr<int64_t>();
  T* zbase = scratch.data_ptr<T>();

#pragma omp parallel num_threads(p.threads)
  {
    BlasOneThread one_thread;
    T* z = zbase + omp_get_thread_num() * p.rb * p.vc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < p.units; ++u) {
      const int64_t v0 = u * p.vc, vc = std::min(p.vc, p.V - v0);
      const Span bs = banned_in(banned, v0, vc);
      for (int64_t r0 = 0; r0 < p.n; r0 += p.rb) {
        const int64_t rb = std::min(p.rb, p.n - r0);
        gemm<T>(false, true, rb, vc, p.H, T(1), h + r0 * p.H, p.H, W + v0 * p.H, p.H, T(0), z, vc);
        ban(z, rb, vc, v0, bs);
        for (int64_t r = 0; r < rb; ++r) {
          const T* row = z + r * vc;
          pl[u * p.n + r0 + r] = row_lse(row, vc, lp_scale);
          if (sampling) {
            T best;
            const int64_t j =
                row_sample(row, vc, v0, inv_t, static_cast<uint32_t>(r0 + r), k0, k1, best);
            pk[u * p.n + r0 + r] = best;
            pt[u * p.n + r0 + r] = v0 + j;
          }
        }
      }
    }
  }

  at::parallel_for(0, p.n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      // Online log-sum-exp over the units in vocabulary order (NaN stays NaN), in double.
      double acc = neg_inf<double>();
      for (int64_t u = 0; u < p.units; ++u) {
        acc = lse_merge_nan(acc, static_cast<double>(pl[u * p.n + i]));
      }
      lse[i] = static_cast<T>(acc);
      if (sampling) {
        T best = neg_inf<T>();
        int64_t tok = 0;
        for (int64_t u = 0; u < p.units; ++u) {
          if (pk[u * p.n + i] > best) {  // strict: the earlier block keeps a tie
            best = pk[u * p.n + i];
            tok = pt[u * p.n + i];
          }
        }
        tokens[i] = tok;
      }
    }
  });
}

// Backward: grad_h (n x H, zero on entry, accumulated) and grad_w (V x H, written) of
// sum_i coef_i / scale * (z[i, index_i] * scale - lse_i).
template <typename T>
void backward_pass(const Plan& p, const T* h, const T* W, const std::vector<int64_t>& banned,
                   const T* lse, const int64_t* index, const T* coef, T scale, T* grad_h, T* grad_w) {
  const at::ScalarType st = scalar_type_of<T>();
  at::Tensor scratch = fresh({p.threads, p.rb * p.vc + (grad_h ? p.rb * p.H : 0)}, st);
  T* base = scratch.data_ptr<T>();
  std::vector<std::mutex> locks(static_cast<size_t>(p.row_blocks));

#pragma omp parallel num_threads(p.threads)
  {
    BlasOneThread one_thread;
    const int tid = omp_get_thread_num();
    T* z = base + tid * (p.rb * p.vc + (grad_h ? p.rb * p.H : 0));
    T* tmp = z + p.rb * p.vc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < p.units; ++u) {
      const int64_t v0 = u * p.vc, vc = std::min(p.vc, p.V - v0);
      const Span bs = banned_in(banned, v0, vc);
      for (int64_t k = 0; k < p.row_blocks; ++k) {
        const int64_t b = (k + tid) % p.row_blocks;  // threads start at different row blocks
        const int64_t r0 = b * p.rb, rb = std::min(p.rb, p.n - r0);
        gemm<T>(false, true, rb, vc, p.H, T(1), h + r0 * p.H, p.H, W + v0 * p.H, p.H, T(0), z, vc);
        ban(z, rb, vc, v0, bs);
        for (int64_t r = 0; r < rb; ++r)
          row_grad(z + r * vc, vc, index[r0 + r] - v0, coef[r0 + r], scale, lse[r0 + r]);
        if (grad_w != nullptr)  // this unit owns grad_w[v0 : v0 + vc]
          gemm<T>(true, false, vc, p.H, rb, T(1), z, vc, h + r0 * p.H, p.H, k == 0 ? T(0) : T(1),
                  grad_w + v0 * p.H, p.H);
        if (grad_h != nullptr) {
          gemm<T>(false, false, rb, p.H, vc, T(1), z, vc, W + v0 * p.H, p.H, T(0), tmp, p.H);
          std::lock_guard<std::mutex> guard(locks[static_cast<size_t>(b)]);
          T* dst = grad_h + r0 * p.H;
          const int64_t len = rb * p.H;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) dst[j] += tmp[j];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Argument checks (the Python layer validates user input; these guard the binding itself)
// ------------------------------------------------------------------------------------------------

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), "lm_head kernels: ", name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "lm_head kernels: ",
              name, " must be float32 or float64, got ", t.scalar_type());
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous() && t.size(0) == n,
              "lm_head kernels: ", name, " must be a contiguous CPU (n,) tensor with n = ", n);
  TORCH_CHECK(t.scalar_type() == dtype, "lm_head kernels: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

std::vector<int64_t> sorted_ids(const std::optional<at::Tensor>& banned, int64_t V) {
  std::vector<int64_t> ids;
  if (banned.has_value()) {
    const at::Tensor b = banned->to(at::kLong).contiguous();
    ids.assign(b.data_ptr<int64_t>(), b.data_ptr<int64_t>() + b.numel());
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    TORCH_CHECK(ids.empty() || (ids.front() >= 0 && ids.back() < V),
                "lm_head kernels: banned ids must be in [0, V)");
  }
  return ids;
}

Plan checked_plan(const at::Tensor& h, const at::Tensor& weight, int64_t block_rows,
                  int64_t block_cols) {
  check_matrix(h, "h");
  check_matrix(weight, "weight");
  TORCH_CHECK(h.scalar_type() == weight.scalar_type(), "lm_head kernels: h and weight dtypes differ");
  TORCH_CHECK(h.size(1) == weight.size(1), "lm_head kernels: h and weight must share H");
  TORCH_CHECK(block_rows >= 1 && block_cols >= 1, "lm_head kernels: block sizes must be >= 1");
  return make_plan(h.size(0), h.size(1), weight.size(0), block_rows, block_cols);
}

}  // namespace

at::Tensor lm_head_lse_fwd(const at::Tensor& h, const at::Tensor& weight, int64_t block_rows,
                           int64_t block_cols) {
  const Plan p = checked_plan(h, weight, block_rows, block_cols);
  at::Tensor lse = fresh({p.n}, h.scalar_type());
  if (p.n == 0) return lse;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lm_head_lse_fwd", [&] {
    forward_pass<scalar_t>(p, h.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), {},
                           false, scalar_t(1), scalar_t(0), 0, 0, lse.mutable_data_ptr<scalar_t>(),
                           nullptr);
  });
  return lse;
}

std::tuple<at::Tensor, at::Tensor> lm_head_sample_fwd(const at::Tensor& h, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& banned,
                                                      double inv_temperature, double lp_scale,
                                                      int64_t seed, int64_t block_rows,
                                                      int64_t block_cols) {
  const Plan p = checked_plan(h, weight, block_rows, block_cols);
  TORCH_CHECK(seed >= 0, "lm_head_sample_fwd: seed must be >= 0");
  TORCH_CHECK(p.n <= (int64_t{1} << 32), "lm_head_sample_fwd: row indices must fit in 32 bits");
  TORCH_CHECK(inv_temperature >= 0 && lp_scale > 0, "lm_head_sample_fwd: bad temperatures");
  const std::vector<int64_t> ids = sorted_ids(banned, p.V);
  TORCH_CHECK(static_cast<int64_t>(ids.size()) < p.V, "lm_head_sample_fwd: every id is banned");
  at::Tensor tokens = fresh({p.n}, at::kLong);
  at::Tensor lse = fresh({p.n}, h.scalar_type());
  if (p.n == 0) return {tokens, lse};
  const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
  const uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lm_head_sample_fwd", [&] {
    forward_pass<scalar_t>(p, h.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), ids,
                           true, static_cast<scalar_t>(lp_scale),
                           static_cast<scalar_t>(inv_temperature), k0, k1,
                           lse.mutable_data_ptr<scalar_t>(), tokens.mutable_data_ptr<int64_t>());
  });
  return {tokens, lse};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> lm_head_bwd(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& banned,
    const at::Tensor& lse, const at::Tensor& index, const at::Tensor& coef, double scale,
    bool need_h, bool need_weight, int64_t block_rows, int64_t block_cols) {
  const Plan p = checked_plan(h, weight, block_rows, block_cols);
  check_vector(lse, p.n, h.scalar_type(), "lse");
  check_vector(coef, p.n, h.scalar_type(), "coef");
  check_vector(index, p.n, at::kLong, "index");
  TORCH_CHECK(scale > 0, "lm_head_bwd: scale must be > 0");
  const std::vector<int64_t> ids = sorted_ids(banned, p.V);
  std::optional<at::Tensor> grad_h, grad_w;
  if (need_h) grad_h = at::zeros({p.n, p.H}, h.options());
  if (need_weight) {
    grad_w = p.n == 0 ? at::zeros({p.V, p.H}, h.options()) : fresh({p.V, p.H}, h.scalar_type());
  }
  if (p.n == 0 || (!need_h && !need_weight)) return {grad_h, grad_w};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lm_head_bwd", [&] {
    backward_pass<scalar_t>(p, h.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), ids,
                            lse.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(),
                            coef.const_data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
                            need_h ? grad_h->mutable_data_ptr<scalar_t>() : nullptr,
                            need_weight ? grad_w->mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {grad_h, grad_w};
}

at::Tensor lm_head_gumbel_noise(int64_t seed, int64_t row0, int64_t rows, int64_t vocab) {
  TORCH_CHECK(seed >= 0 && row0 >= 0 && rows >= 0 && vocab >= 0 && row0 + rows <= (int64_t{1} << 32),
              "lm_head_gumbel_noise: bad arguments");
  at::Tensor out = at::empty({rows, vocab}, at::kFloat);
  const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
  const uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    alignas(64) float g[kNoiseBlock];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < vocab; b += kNoiseBlock) {
        noise_block_f32(g, b, static_cast<uint32_t>(row0 + r), k0, k1);
        const int64_t len = b + kNoiseBlock < vocab ? kNoiseBlock : vocab - b;
        for (int64_t j = 0; j < len; ++j) o[r * vocab + b + j] = g[j];
      }
    }
  });
  return out;
}

namespace {
void check_mix_inputs(const char* fn, const at::Tensor& h_base, const at::Tensor& h_thought,
                      const at::Tensor& w) {
  TORCH_CHECK(h_base.dim() == 2, fn, ": h_base must be 2-D (N, H), got shape ", h_base.sizes());
  TORCH_CHECK(h_thought.sizes() == h_base.sizes(), fn, ": h_thought must have the shape of h_base ",
              h_base.sizes(), ", got ", h_thought.sizes());
  TORCH_CHECK(w.numel() == h_base.size(0), fn, ": w must have N = ", h_base.size(0),
              " elements, got shape ", w.sizes());
  for (const at::Tensor* t : {&h_base, &h_thought, &w}) {
    TORCH_CHECK(t->device().is_cpu(), fn, ": the inputs must be CPU tensors, got ", t->device());
  }
}
}  // namespace

at::Tensor lm_head_mix(const at::Tensor& h_base, const at::Tensor& h_thought, const at::Tensor& w,
                       at::ScalarType dtype) {
  check_mix_inputs("lm_head_mix", h_base, h_thought, w);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "lm_head_mix: dtype must be float32 or float64, got ", dtype);
  const at::Tensor hb = h_base.to(dtype).contiguous(), ht = h_thought.to(dtype).contiguous();
  const at::Tensor wc = w.to(dtype).reshape({-1}).contiguous();
  at::Tensor out = at::empty(hb.sizes(), hb.options());
  const int64_t N = hb.size(0), H = hb.size(1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "lm_head_mix", [&] {
    const scalar_t* b = hb.data_ptr<scalar_t>();
    const scalar_t* t = ht.data_ptr<scalar_t>();
    const scalar_t* ws = wc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t k = 0; k < H; ++k) o[i * H + k] = mix_hidden(b[i * H + k], t[i * H + k], ws[i]);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_mix_backward(const at::Tensor& grad_h,
                                                                    const at::Tensor& h_base,
                                                                    const at::Tensor& h_thought,
                                                                    const at::Tensor& w) {
  check_mix_inputs("lm_head_mix_backward", h_base, h_thought, w);
  TORCH_CHECK(grad_h.sizes() == h_base.sizes(), "lm_head_mix_backward: grad_h must have the shape ",
              h_base.sizes(), ", got ", grad_h.sizes());
  const at::ScalarType dtype = grad_h.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "lm_head_mix_backward: grad_h must be float32 or float64, got ", dtype);
  const at::Tensor g = grad_h.contiguous();
  const at::Tensor hb = h_base.to(dtype).contiguous(), ht = h_thought.to(dtype).contiguous();
  const at::Tensor wc = w.to(dtype).reshape({-1}).contiguous();
  at::Tensor gb = at::empty(g.sizes(), g.options()), gt = at::empty(g.sizes(), g.options());
  at::Tensor gw = at::empty({g.size(0)}, g.options());
  const int64_t N = g.size(0), H = g.size(1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "lm_head_mix_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* b = hb.data_ptr<scalar_t>();
    const scalar_t* t = ht.data_ptr<scalar_t>();
    const scalar_t* ws = wc.data_ptr<scalar_t>();
    scalar_t *ob = gb.data_ptr<scalar_t>(), *ot = gt.data_ptr<scalar_t>(), *ow = gw.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        double acc = 0.0;
        for (int64_t k = 0; k < H; ++k) {
          const MixGrad<scalar_t> r = mix_hidden_grad(gp[i * H + k], b[i * H + k], t[i * H + k], ws[i]);
          ob[i * H + k] = r.h_base;
          ot[i * H + k] = r.h_thought;
          acc += r.w_term;
        }
        ow[i] = static_cast<scalar_t>(acc);
      }
    });
  });
  return {gb, gt, gw};
}

bool lm_head_set_poison(bool on) { return poisoned.set(on); }

std::string lm_head_backend_info() {
  return std::string("lm_head kernels: GEMM ") + (blas().sgemm ? "sgemm_ (BLAS)" : "at::addmm fallback") +
         ", " + cpu_isa() + " float32 loops, threads: " + std::to_string(at::get_num_threads());
}

}  // namespace qstar::cpu
