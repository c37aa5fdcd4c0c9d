// Thought attention on the CPU: causal (optionally windowed, padded) attention over the text block
// plus one diagonal key per thought block, merged in one exact softmax.
//
// Design
// ------
// * Work unit = (batch b, kv head hk, block of Bq query rows). All G = Hq / Hkv query heads of the
//   group are stacked into one M = G * Bq (about 128) row panel, so every K/V row read serves G
//   heads and the GEMMs are taller (native GQA: no kv head is ever copied). Units run under one
//   OpenMP parallel region with a dynamic schedule, heaviest (last) query blocks first.
// * Forward, per unit: the `a` diagonal scores q_i . k^{(s)}_i start an online softmax per row;
//   then the text keys [key_lo, i1) (key_lo from the window) in chunks of at most 2048 keys (one
//   chunk for L <= 2048): S = scale * Q_panel K_chunk^T (one GEMM), per row the allowed contiguous
//   key range (the causal diagonal tile and the window edge are cut by range, padding by an
//   additive 0/-inf bias), max, exp, merge into the row state, O = P V_chunk (one GEMM,
//   accumulated with rescaling across chunks). At the end O + the diagonal terms, normalised, and
//   lse = m + log l.
// * Backward, per unit: Delta = rowsum(dO * O) - grad_lse and the diagonal P/dS per row; per text
//   chunk recompute S -> P from the saved lse, dP = dO V^T, dS = P (dP - Delta) (scale folded in);
//   dQ_text += dS K, dK_text += dS^T Q, dV_text += P^T dO (GEMMs). dQ rows and the diagonal dK/dV
//   rows belong to the unit (all G heads of a query are in it): written directly. The text dK/dV
//   of a kv head get contributions from all its query blocks: either a thread owns whole kv heads
//   (when they split evenly over the threads) and accumulates into dk/dv, or units are shared and
//   threads 1.. accumulate into private buffers reduced after the loop.
// * GEMMs: gemm() of cpu/blas.h, single-threaded inside the parallel region (torch's own BLAS,
//   or at::addmm_ without it).
// * Elementwise row loops (mask/max, exp/sum, the backward row, dots, axpys) are compiled
//   per ISA with function multi-versioning (avx512f / avx2 / default), float32 with a vectorisable
//   polynomial exp (exactly 0 for masked scores); the two exp loops also have a hand-written
//   AVX-512 version (target attribute + intrinsics, chosen at run time), no -march needed.
// * Extra memory: per-thread scratch O(G * Bq * (min(L, window + Bq, 2048) + D + a)), plus, in the
//   shared backward schedule only, (threads - 1) text-sized dK/dV accumulators. Never
//   O(L * L * (a + 1)); all of it from at::empty, so the profiler sees it.
// * Knobs for tests/tuning (read once per process): QSTAR_CPU_BLOCK_ROWS (Bq),
//   QSTAR_CPU_KEY_CHUNK (text keys per chunk), QSTAR_CPU_NO_BLAS=1 (force the at::addmm path),
//   QSTAR_CPU_NO_AVX512=1 (skip the hand-written AVX-512 exp loops).
#include "cpu/thought_attention.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "common/poison.h"
#include "common/softmax_math.h"
#include "cpu/blas.h"
#include "cpu/platform.h"
#if QSTAR_X86
#include <immintrin.h>
#endif

namespace qstar::cpu {
namespace {

PoisonSwitch poisoned;  // the test mode of these kernels (_set_poison_outputs)

// ------------------------------------------------------------------------------------------------
// Elementwise row kernels
// ------------------------------------------------------------------------------------------------

// exp for float32 in a form the vectoriser accepts: range reduction by ln 2 with a rounding
// constant, a degree-7 polynomial (relative error ~1e-7), the power of two built in the exponent
// bits. Inputs are clamped to [-88, 88]; at the bottom the exponent field becomes 0, so inputs
// below about -87.7 (including -inf) give exactly 0 without a separate select.
QSTAR_AI float exp_poly(float x) {
  float xc = x > -88.0f ? x : -88.0f;  // also maps -inf (and NaN) to -88
  xc = xc < 88.0f ? xc : 88.0f;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int ni = static_cast<int>(n);  // in [-127, 127]; -127 gives the bit pattern of +0.0
  const float two_n = std::bit_cast<float>((ni + 127) << 23);
  return p * two_n;
}

QSTAR_AI float vexp(float x) { return exp_poly(x); }
QSTAR_AI double vexp(double x) { return std::exp(x); }

// s[j] += bias[j] (bias may be null: s is only read); returns the maximum (-inf for n == 0).
template <typename T>
QSTAR_AI T body_bias_max(T* __restrict s, int n, const T* __restrict bias) {
  T m = neg_inf<T>();
  if (bias) {
#pragma omp simd reduction(max : m)
    for (int j = 0; j < n; ++j) {
      const T x = s[j] + bias[j];
      s[j] = x;
      m = x > m ? x : m;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  }
  return m;
}

// s[j] = exp(s[j] - m); returns the sum.
template <typename T>
QSTAR_AI T body_exp_sum(T* __restrict s, int n, T m) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    const T p = vexp(s[j] - m);
    s[j] = p;
    sum += p;
  }
  return sum;
}

// Backward row: p = exp(s * scale + bias - lse) -> s; dp = p * (dp - delta) * scale -> dp.
template <typename T>
QSTAR_AI void body_bwd_row(T* __restrict s, T* __restrict dp, int n, T scale,
                           const T* __restrict bias, T lse, T delta) {
  if (bias) {
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      const T p = vexp(s[j] * scale + bias[j] - lse);
      s[j] = p;
      dp[j] = p * (dp[j] - delta) * scale;
    }
  } else {
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      const T p = vexp(s[j] * scale - lse);
      s[j] = p;
      dp[j] = p * (dp[j] - delta) * scale;
    }
  }
}

template <typename T>
QSTAR_AI T body_dot(const T* __restrict a, const T* __restrict b, int n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// y += alpha * x
template <typename T>
QSTAR_AI void body_axpy(T* __restrict y, T alpha, const T* __restrict x, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) y[j] += alpha * x[j];
}

// y = alpha * x
template <typename T>
QSTAR_AI void body_scale_copy(T* __restrict y, T alpha, const T* __restrict x, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) y[j] = alpha * x[j];
}

QSTAR_CLONES float row_bias_max(float* s, int n, const float* bias) {
  return body_bias_max(s, n, bias);
}
QSTAR_CLONES float row_exp_sum_generic(float* s, int n, float m) { return body_exp_sum(s, n, m); }
QSTAR_CLONES void row_bwd_generic(float* s, float* dp, int n, float scale, const float* bias,
                                  float lse, float delta) {
  body_bwd_row(s, dp, n, scale, bias, lse, delta);
}

#if QSTAR_X86
// AVX-512 versions of the two exp loops (the hottest elementwise code): the same polynomial, with
// the rounding and the power of two done by vrndscaleps / vscalefps, masked tails, and the zero for
// scores below -87.5 (masked ones are -inf) folded into the vscalefps mask.
#define QSTAR_AVX512 __attribute__((target("avx512f")))

QSTAR_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.5f), _CMP_GT_OQ);
  // (The maskz forms with a full mask: the plain ones pass GCC 12 an "undefined" vector that
  // -Wmaybe-uninitialized reports.)
  const __mmask16 all = 0xFFFF;
  x = _mm512_maskz_min_ps(all, _mm512_maskz_max_ps(all, x, _mm512_set1_ps(-88.0f)),
                          _mm512_set1_ps(88.0f));
  const __m512 n =
      _mm512_maskz_roundscale_ps(all, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

QSTAR_AVX512 inline __mmask16 tail_mask(int left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

QSTAR_AVX512 float row_exp_sum_avx512(float* s, int n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vm));
    _mm512_mask_storeu_ps(s + j, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);  // (not _mm512_reduce_add_ps: GCC 12 warns inside it)
  float sum = 0.0f;
  for (int i = 0; i < 16; ++i) sum += lanes[i];
  return sum;
}

QSTAR_AVX512 void row_bwd_avx512(float* s, float* dp, int n, float scale, const float* bias,
                                 float lse, float delta) {
  const __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(delta);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + j), vs, vl);
    if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(k, bias + j));
    const __m512 p = exp_avx512(x);
    _mm512_mask_storeu_ps(s + j, k, p);
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), vd);
    _mm512_mask_storeu_ps(dp + j, k, _mm512_mul_ps(_mm512_mul_ps(p, g), vs));
  }
}

// QSTAR_CPU_NO_AVX512=1 forces the multi-versioned loops (for tests).
bool use_avx512() {
  static const bool v =
      !env_flag("QSTAR_CPU_NO_AVX512") && static_cast<bool>(__builtin_cpu_supports("avx512f"));
  return v;
}
#else
inline bool use_avx512() { return false; }
inline float row_exp_sum_avx512(float*, int, float) { return 0.0f; }
inline void row_bwd_avx512(float*, float*, int, float, const float*, float, float) {}
#endif

float row_exp_sum(float* s, int n, float m) {
  return use_avx512() ? row_exp_sum_avx512(s, n, m) : row_exp_sum_generic(s, n, m);
}
void row_bwd(float* s, float* dp, int n, float scale, const float* bias, float lse, float delta) {
  if (use_avx512())
    row_bwd_avx512(s, dp, n, scale, bias, lse, delta);
  else
    row_bwd_generic(s, dp, n, scale, bias, lse, delta);
}
QSTAR_CLONES float vdot(const float* a, const float* b, int n) { return body_dot(a, b, n); }
QSTAR_CLONES void vaxpy(float* y, float alpha, const float* x, int n) { body_axpy(y, alpha, x, n); }
QSTAR_CLONES void vscale_copy(float* y, float alpha, const float* x, int n) {
  body_scale_copy(y, alpha, x, n);
}

// float64 is the checking dtype (gradcheck): plain code, libm exp.
double row_bias_max(double* s, int n, const double* bias) { return body_bias_max(s, n, bias); }
double row_exp_sum(double* s, int n, double m) { return body_exp_sum(s, n, m); }
void row_bwd(double* s, double* dp, int n, double scale, const double* bias, double lse,
             double delta) {
  body_bwd_row(s, dp, n, scale, bias, lse, delta);
}
double vdot(const double* a, const double* b, int n) { return body_dot(a, b, n); }
void vaxpy(double* y, double alpha, const double* x, int n) { body_axpy(y, alpha, x, n); }
void vscale_copy(double* y, double alpha, const double* x, int n) {
  body_scale_copy(y, alpha, x, n);
}

template <typename T>
void fill_zero(T* p, int64_t n) {
  if (n > 0) std::memset(p, 0, sizeof(T) * n);
}

// ------------------------------------------------------------------------------------------------
// Problem geometry and scheduling
// ------------------------------------------------------------------------------------------------
struct Geom {
  int64_t B, Hq, Hkv, G, L, D, a, Lk;  // Lk = (a + 1) * L
  int64_t W;                           // window, <= 0: none
  int64_t Bq;                          // query rows per unit
  int64_t nqb;                         // query blocks per (b, kv head)
  int64_t units;                       // B * Hkv * nqb
  int64_t Mcap;                        // max rows of a unit panel: G * Bq
  int64_t Nc;                          // max text keys per chunk (bounds the score scratch)
};

int64_t env_int(const char* name) {
  const char* s = std::getenv(name);
  if (s == nullptr) return 0;
  const long x = std::strtol(s, nullptr, 10);
  return x > 0 ? int64_t(x) : int64_t(0);
}

// Tuning/testing knobs, read once: QSTAR_CPU_BLOCK_ROWS (query rows per unit), and
// QSTAR_CPU_KEY_CHUNK (text keys per score chunk).
int64_t env_block_rows() {
  static const int64_t v = env_int("QSTAR_CPU_BLOCK_ROWS");
  return v;
}
int64_t env_key_chunk() {
  static const int64_t v = env_int("QSTAR_CPU_KEY_CHUNK");
  return v;
}

constexpr int64_t kDefaultKeyChunk = 2048;

Geom make_geom(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t D, int64_t Lk, int64_t W) {
  Geom g{};
  g.B = B;
  g.Hq = Hq;
  g.Hkv = Hkv;
  g.G = Hq / Hkv;
  g.L = L;
  g.D = D;
  g.Lk = Lk;
  g.a = Lk / L - 1;
  g.W = W > 0 ? W : 0;
  int64_t bq = env_block_rows();
  // About 128 panel rows (G heads x Bq queries): tall enough for the GEMMs, small enough that the
  // score and dP panels stay in L2.
  if (bq == 0) bq = std::clamp<int64_t>(128 / g.G, 16, 128);
  g.Bq = std::max<int64_t>(1, std::min(bq, L));
  g.nqb = (L + g.Bq - 1) / g.Bq;
  g.units = B * Hkv * g.nqb;
  g.Mcap = g.G * g.Bq;
  const int64_t ncap = g.W > 0 ? std::min(L, g.W + g.Bq - 1) : L;  // text keys of a unit
  int64_t nc = env_key_chunk();
  if (nc == 0) nc = kDefaultKeyChunk;
  g.Nc = std::min(ncap, nc);
  return g;
}

struct Unit {
  int64_t b, hk, bk;  // bk = b * Hkv + hk
  int64_t i0, i1, nb, M;
  int64_t key_lo, N;  // text keys [key_lo, key_lo + N) = [key_lo, i1)
};

// The unit of query block qb of kv head bk (= b * Hkv + hk).
Unit make_unit_at(const Geom& g, int64_t bk, int64_t qb) {
  Unit t{};
  t.bk = bk;
  t.b = bk / g.Hkv;
  t.hk = bk % g.Hkv;
  t.i0 = qb * g.Bq;
  t.i1 = std::min(g.L, t.i0 + g.Bq);
  t.nb = t.i1 - t.i0;
  t.M = g.G * t.nb;
  t.key_lo = g.W > 0 ? std::max<int64_t>(0, t.i0 - g.W + 1) : 0;
  t.N = t.i1 - t.key_lo;
  return t;
}

// Unit u of the flat schedule: heaviest query blocks (the last ones) first, across all
// (b, kv head).
Unit make_unit(const Geom& g, int64_t u) {
  const int64_t BH = g.B * g.Hkv;
  return make_unit_at(g, u % BH, g.nqb - 1 - u / BH);
}

// The allowed text keys of query i, [lo, hi), intersected with the chunk [c0, c1), relative to c0
// (st >= en: none).
struct Seg {
  int64_t st, en;
};
inline Seg row_segment(const Geom& g, int64_t i, int64_t c0, int64_t c1) {
  const int64_t lo = g.W > 0 ? std::max<int64_t>(0, i - g.W + 1) : 0;
  const int64_t hi = i + 1;
  const int64_t st = std::clamp(lo, c0, c1) - c0;
  const int64_t en = std::clamp(hi, c0, c1) - c0;
  return Seg{st, std::max(st, en)};  // 0 <= st <= en <= c1 - c0
}

int pick_threads(const Geom& g) {
  const int64_t nt =
      std::min<int64_t>(std::max(at::get_num_threads(), 1), std::max<int64_t>(g.units, 1));
  return static_cast<int>(nt);
}

int64_t round_up(int64_t n) { return (n + 15) / 16 * 16; }

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename T>
void fwd_kernel(const Geom& g, const T* q, const T* k, const T* v, const T* bias, T scale, T* out,
                T* lse_out) {
  const int64_t D = g.D, L = g.L, a = g.a;
  const int64_t szQ = round_up(g.Mcap * D), szS = round_up(g.Mcap * g.Nc),
                szPd = round_up(g.Mcap * std::max<int64_t>(a, 1)), szRow = round_up(g.Mcap);
  const int64_t per_thread = 2 * szQ + szS + szPd + 4 * szRow;
  const int nt = pick_threads(g);
  at::Tensor scratch =
      poisoned(at::empty({nt * per_thread}, at::TensorOptions().dtype(scalar_type_of<T>())));
  T* scratch_base = scratch.data_ptr<T>();

#pragma omp parallel num_threads(nt)
  {
    BlasOneThread mkl_guard;
    T* base = scratch_base + omp_get_thread_num() * per_thread;
    T* Qs = base;           // (M, D) the group's queries
    T* Os = Qs + szQ;       // (M, D) running sum of exp(s - m) v over the text keys
    T* S = Os + szQ;        // (M, chunk) scores, then unnormalised probabilities
    T* Pd = S + szS;        // (M, a) diagonal scores, then exp(score - m_diag)
    T* rm = Pd + szPd;      // (M) running max of the text (and diagonal) scores
    T* rl = rm + szRow;     // (M) running sum
    T* rdm = rl + szRow;    // (M) the max of the diagonal scores (the reference of Pd)
    T* ralpha = rdm + szRow;  // (M) rescale factor of Os for the current chunk

#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < g.units; ++u) {
      const Unit t = make_unit(g, u);
      const int M = static_cast<int>(t.M), Di = static_cast<int>(D);
      const T* kb = k + t.bk * g.Lk * D;  // this kv head's keys: text block, then the a blocks
      const T* vb = v + t.bk * g.Lk * D;
      const int64_t h0 = t.b * g.Hq + t.hk * g.G;  // first query head of the group
      const T* brow = bias ? bias + t.b * L : nullptr;
      for (int64_t gi = 0; gi < g.G; ++gi)
        std::memcpy(Qs + gi * t.nb * D, q + ((h0 + gi) * L + t.i0) * D, sizeof(T) * t.nb * D);

      // The diagonal keys start the online softmax of every row.
      for (int64_t r = 0; r < t.M; ++r) {
        const int64_t i = t.i0 + r % t.nb;
        T* pd = Pd + r * a;
        const bool keep_i = brow == nullptr || brow[i] == T(0);
        T m = neg_inf<T>();
        for (int64_t s = 0; s < a; ++s) {
          pd[s] = keep_i ? scale * vdot(Qs + r * D, kb + ((s + 1) * L + i) * D, Di) : neg_inf<T>();
          m = std::max(m, pd[s]);
        }
        rdm[r] = m;
        rm[r] = m;
        rl[r] = m == neg_inf<T>() ? T(0) : row_exp_sum(pd, static_cast<int>(a), m);
        if (m == neg_inf<T>()) fill_zero(pd, a);
      }

      // The text keys, in chunks of at most Nc.
      for (int64_t c0 = t.key_lo; c0 < t.i1; c0 += g.Nc) {
        const int64_t c1 = std::min(t.i1, c0 + g.Nc);
        const int n = static_cast<int>(c1 - c0);
        const bool first = c0 == t.key_lo;
        // Scaled scores.
        gemm<T>(false, true, M, n, Di, scale, Qs, Di, kb + c0 * D, Di, T(0), S, n);
        for (int64_t r = 0; r < t.M; ++r) {
          const int64_t i = t.i0 + r % t.nb;
          T* srow = S + r * n;
          const Seg sg = row_segment(g, i, c0, c1);
          ralpha[r] = T(1);
          T mx = row_bias_max(srow + sg.st, static_cast<int>(sg.en - sg.st),
                              brow ? brow + c0 + sg.st : nullptr);
          fill_zero(srow, sg.st);
          fill_zero(srow + sg.en, n - sg.en);
          SoftmaxState<T> st{rm[r], rl[r]};
          const T m_new = std::max(st.m, mx);
          if (m_new == neg_inf<T>()) {  // nothing allowed so far
            fill_zero(srow + sg.st, sg.en - sg.st);
            continue;
          }
          const T l_blk = row_exp_sum(srow + sg.st, static_cast<int>(sg.en - sg.st), m_new);
          // l_blk is already relative to m_new, so merge it as a block whose max is m_new.
          ralpha[r] = softmax_merge(st, m_new, l_blk);
          rm[r] = st.m;
          rl[r] = st.l;
        }
        if (!first) {
          for (int64_t r = 0; r < t.M; ++r)
            if (ralpha[r] != T(1)) vscale_copy(Os + r * D, ralpha[r], Os + r * D, Di);
        }
        gemm<T>(false, false, M, Di, n, T(1), S, n, vb + c0 * D, Di, first ? T(0) : T(1), Os, Di);
      }

      for (int64_t r = 0; r < t.M; ++r) {
        const int64_t gi = r / t.nb, i = t.i0 + r % t.nb;
        const SoftmaxState<T> st{rm[r], rl[r]};
        lse_out[(h0 + gi) * L + i] = softmax_lse(st);
        T* orow = out + ((h0 + gi) * L + i) * D;
        const T c = softmax_inv_sum(st);
        vscale_copy(orow, c, Os + r * D, Di);
        if (rdm[r] == neg_inf<T>()) continue;
        const T cd = c * rescale_factor(rdm[r], st.m);
        const T* pd = Pd + r * a;
        for (int64_t s = 0; s < a; ++s)
          if (pd[s] != T(0)) vaxpy(orow, pd[s] * cd, vb + ((s + 1) * L + i) * D, Di);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
template <typename T>
void bwd_kernel(const Geom& g, const T* dout, const T* q, const T* k, const T* v, const T* out,
                const T* lse, const T* glse, const T* bias, T scale, T* dq, T* dk, T* dv) {
  const int64_t D = g.D, L = g.L, a = g.a, BH = g.B * g.Hkv;
  const int64_t szQ = round_up(g.Mcap * D), szS = round_up(g.Mcap * g.Nc),
                szPd = round_up(g.Mcap * std::max<int64_t>(a, 1)), szRow = round_up(g.Mcap);
  const int64_t per_thread = 3 * szQ + 2 * szS + 2 * szPd + 2 * szRow;
  const int nt = pick_threads(g);
  const auto opts = at::TensorOptions().dtype(scalar_type_of<T>());
  at::Tensor scratch = poisoned(at::empty({nt * per_thread}, opts));
  T* scratch_base = scratch.data_ptr<T>();
  // The text dK/dV of a kv head get contributions from all its query blocks. Two race-free
  // schedules:
  //  * owner: when the (b, kv head) pairs split evenly over the threads (or there are many of
  //    them), a thread takes whole kv heads and accumulates straight into dk/dv;
  //  * shared: otherwise units are (kv head, query block), and threads 1.. accumulate into private
  //    text-sized buffers that are summed into dk/dv after the loop (thread 0 uses dk/dv), as long
  //    as those buffers stay small (see shared_fits).
  const int64_t acc_per = BH * L * D;
  // The shared schedule's private accumulators cost (nt - 1) text-sized dK/dV copies. Allow them
  // up to 3 copies, or up to the size of the dk and dv this call returns (which keeps the extra
  // memory O(L * (a + 1))), or 64 MiB, whichever is largest; beyond that (many threads, few kv
  // heads, long text, shallow thoughts) the owner schedule runs on min(BH, nt) threads instead.
  const int64_t elem = static_cast<int64_t>(sizeof(T));
  const int64_t shared_bytes = (nt - 1) * 2 * acc_per * elem;
  const int64_t grad_bytes = 2 * BH * g.Lk * D * elem;
  const bool shared_fits =
      nt - 1 <= 3 || shared_bytes <= std::max(grad_bytes, int64_t(64) << 20);
  const bool owner =
      nt == 1 || (BH >= nt && (BH % nt == 0 || BH >= 4 * nt)) || !shared_fits;
  at::Tensor acc = poisoned(at::empty({owner ? 0 : (nt - 1) * 2 * acc_per}, opts));
  T* acc_base = acc.data_ptr<T>();

#pragma omp parallel num_threads(nt)
  {
    BlasOneThread mkl_guard;
    const int tid = omp_get_thread_num();
    T* base = scratch_base + tid * per_thread;
    T* Qs = base;          // (M, D)
    T* dOs = Qs + szQ;     // (M, D)
    T* dQs = dOs + szQ;    // (M, D) text part of dQ
    T* S = dQs + szQ;      // (M, chunk) scores, then P
    T* dP = S + szS;       // (M, chunk) dP, then dS (scale folded in)
    T* Pd = dP + szS;      // (M, a) diagonal P
    T* dSd = Pd + szPd;    // (M, a) diagonal dS
    T* Delta = dSd + szPd; // (M) rowsum(dO * O) - grad_lse
    T* Lse = Delta + szRow;
    // Where this thread accumulates the text dK/dV of kv head bk, and their row stride.
    const bool direct = owner || tid == 0;
    T* accK = direct ? dk : acc_base + (tid - 1) * 2 * acc_per;
    T* accV = direct ? dv : acc_base + (tid - 1) * 2 * acc_per + acc_per;
    const int64_t acc_stride = direct ? g.Lk * D : L * D;  // per bk

    auto do_unit = [&](const Unit& t) {
      const int M = static_cast<int>(t.M), Di = static_cast<int>(D);
      const T* kb = k + t.bk * g.Lk * D;
      const T* vb = v + t.bk * g.Lk * D;
      const int64_t h0 = t.b * g.Hq + t.hk * g.G;
      const T* brow = bias ? bias + t.b * L : nullptr;
      for (int64_t gi = 0; gi < g.G; ++gi) {
        const int64_t off = ((h0 + gi) * L + t.i0) * D;
        std::memcpy(Qs + gi * t.nb * D, q + off, sizeof(T) * t.nb * D);
        std::memcpy(dOs + gi * t.nb * D, dout + off, sizeof(T) * t.nb * D);
      }
      // Row terms and the diagonal keys.
      for (int64_t r = 0; r < t.M; ++r) {
        const int64_t gi = r / t.nb, i = t.i0 + r % t.nb;
        const int64_t row = (h0 + gi) * L + i;
        const T lr = lse[row];
        Lse[r] = lr;
        T* pd = Pd + r * a;
        T* dsd = dSd + r * a;
        const bool keep_i = brow == nullptr || brow[i] == T(0);
        if (lr == neg_inf<T>()) {  // nothing allowed: no gradient at all
          Delta[r] = T(0);
          fill_zero(pd, a);
          fill_zero(dsd, a);
          continue;
        }
        Delta[r] = softmax_bwd_row_term(vdot(dOs + r * D, out + row * D, Di),
                                        glse ? glse[row] : T(0));
        if (!keep_i) {
          fill_zero(pd, a);
          fill_zero(dsd, a);
          continue;
        }
        for (int64_t s = 0; s < a; ++s) {
          const int64_t krow = ((s + 1) * L + i) * D;
          pd[s] = scale * vdot(Qs + r * D, kb + krow, Di);
          dsd[s] = vdot(dOs + r * D, vb + krow, Di);  // dP of the diagonal key, for now
        }
        row_exp_sum(pd, static_cast<int>(a), lr);  // P = exp(score - lse)
        for (int64_t s = 0; s < a; ++s) dsd[s] = pd[s] * (dsd[s] - Delta[r]) * scale;
      }

      // The text keys, in chunks of at most Nc.
      for (int64_t c0 = t.key_lo; c0 < t.i1; c0 += g.Nc) {
        const int64_t c1 = std::min(t.i1, c0 + g.Nc);
        const int n = static_cast<int>(c1 - c0);
        const bool first = c0 == t.key_lo;
        gemm<T>(false, true, M, n, Di, T(1), Qs, Di, kb + c0 * D, Di, T(0), S, n);
        gemm<T>(false, true, M, n, Di, T(1), dOs, Di, vb + c0 * D, Di, T(0), dP, n);
        for (int64_t r = 0; r < t.M; ++r) {
          const int64_t i = t.i0 + r % t.nb;
          T* srow = S + r * n;
          T* dprow = dP + r * n;
          const T lr = Lse[r];
          const Seg sg = lr == neg_inf<T>() ? Seg{0, 0} : row_segment(g, i, c0, c1);
          fill_zero(srow, sg.st);
          fill_zero(dprow, sg.st);
          fill_zero(srow + sg.en, n - sg.en);
          fill_zero(dprow + sg.en, n - sg.en);
          row_bwd(srow + sg.st, dprow + sg.st, static_cast<int>(sg.en - sg.st), scale,
                  brow ? brow + c0 + sg.st : nullptr, lr, Delta[r]);
        }
        // dQ_text += dS K_chunk; dK_chunk += dS^T Q; dV_chunk += P^T dO.
        gemm<T>(false, false, M, Di, n, T(1), dP, n, kb + c0 * D, Di, first ? T(0) : T(1), dQs, Di);
        const int64_t acc_off = t.bk * acc_stride + c0 * D;
        gemm<T>(true, false, n, Di, M, T(1), dP, n, Qs, Di, T(1), accK + acc_off, Di);
        gemm<T>(true, false, n, Di, M, T(1), S, n, dOs, Di, T(1), accV + acc_off, Di);
      }

      // dQ rows (the unit owns them): text part plus the diagonal keys.
      for (int64_t r = 0; r < t.M; ++r) {
        const int64_t gi = r / t.nb, i = t.i0 + r % t.nb;
        T* dqrow = dq + ((h0 + gi) * L + i) * D;
        std::memcpy(dqrow, dQs + r * D, sizeof(T) * D);
        const T* dsd = dSd + r * a;
        for (int64_t s = 0; s < a; ++s)
          if (dsd[s] != T(0)) vaxpy(dqrow, dsd[s], kb + ((s + 1) * L + i) * D, Di);
      }
      // Diagonal dK/dV rows: key i of block s is seen only by query i (all G heads are here).
      for (int64_t ii = 0; ii < t.nb; ++ii) {
        const int64_t i = t.i0 + ii;
        for (int64_t s = 0; s < a; ++s) {
          const int64_t krow = (t.bk * g.Lk + (s + 1) * L + i) * D;
          T* dkrow = dk + krow;
          T* dvrow = dv + krow;
          fill_zero(dkrow, D);
          fill_zero(dvrow, D);
          for (int64_t gi = 0; gi < g.G; ++gi) {
            const int64_t r = gi * t.nb + ii;
            if (dSd[r * a + s] != T(0)) vaxpy(dkrow, dSd[r * a + s], Qs + r * D, Di);
            if (Pd[r * a + s] != T(0)) vaxpy(dvrow, Pd[r * a + s], dOs + r * D, Di);
          }
        }
      }
    };

    if (owner) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t bk = 0; bk < BH; ++bk) {
        fill_zero(accK + bk * acc_stride, L * D);
        fill_zero(accV + bk * acc_stride, L * D);
        for (int64_t qb = g.nqb - 1; qb >= 0; --qb) do_unit(make_unit_at(g, bk, qb));
      }
    } else {
      // Zero the accumulators (for thread 0: the text block of dk/dv).
      for (int64_t bk = 0; bk < BH; ++bk) {
        fill_zero(accK + bk * acc_stride, L * D);
        fill_zero(accV + bk * acc_stride, L * D);
      }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < g.units; ++u) do_unit(make_unit(g, u));
    }  // implicit barrier: all accumulators complete

    if (!owner) {
      // dk_text += sum over threads 1.. of their accumulators, split by rows.
      const int64_t rows = BH * L;
#pragma omp for schedule(static)
      for (int64_t rr = 0; rr < rows; ++rr) {
        const int64_t bk = rr / L, j = rr % L;
        T* dkrow = dk + (bk * g.Lk + j) * D;
        T* dvrow = dv + (bk * g.Lk + j) * D;
        for (int th = 1; th < nt; ++th) {
          const T* ak = acc_base + (th - 1) * 2 * acc_per + (bk * L + j) * D;
          vaxpy(dkrow, T(1), ak, static_cast<int>(D));
          vaxpy(dvrow, T(1), ak + acc_per, static_cast<int>(D));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Validation
// ------------------------------------------------------------------------------------------------
void check_4d(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got None/undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be on the cpu device, got ", t.device());
  TORCH_CHECK(t.dim() == 4, fn, ": ", name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

struct Checked {
  Geom g;
  at::Tensor bias;  // (B, L) additive 0 / -inf key mask, undefined when keep is None
};

Checked check_common(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& keep, double scale, int64_t window) {
  check_4d(fn, "q", q);
  check_4d(fn, "k", k);
  check_4d(fn, "v", v);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, fn,
              ": q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), fn, ": k must have q's dtype ", q.scalar_type(),
              ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), fn, ": v must have q's dtype ", q.scalar_type(),
              ", got ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), fn, ": k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B, fn, ": k batch size ", k.size(0), " must equal q batch size ", B);
  TORCH_CHECK(k.size(3) == D, fn, ": k head dim ", k.size(3), " must equal q head dim ", D);
  TORCH_CHECK(L >= 1, fn, ": q must have at least one query (L >= 1), got L = ", L);
  TORCH_CHECK(D >= 1, fn, ": the head dim D must be >= 1, got ", D);
  TORCH_CHECK(Hkv >= 1 && Hq >= 1 && Hq % Hkv == 0, fn, ": q heads (", Hq,
              ") must be a positive multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(Lk >= L && Lk % L == 0, fn, ": k/v length ", Lk,
              " must be (a+1)*L for an integer a >= 0, with L = ", L);
  TORCH_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(Lk <= kIntMax && D <= kIntMax && Hq / Hkv * L <= kIntMax, fn,
              ": sizes too large for the 32-bit BLAS interface");
  Checked c{make_geom(B, Hq, Hkv, L, D, Lk, window), at::Tensor()};
  if (keep.has_value() && keep->defined()) {
    const at::Tensor& kp = *keep;
    TORCH_CHECK(kp.device().is_cpu(), fn, ": keep must be on the cpu device, got ", kp.device());
    TORCH_CHECK(kp.scalar_type() == at::kBool, fn, ": keep must be a bool tensor, got ",
                kp.scalar_type());
    TORCH_CHECK(kp.dim() == 2 && kp.size(0) == B && kp.size(1) == L, fn,
                ": keep must have shape (B, L) = (", B, ", ", L, "), got ", kp.sizes());
    c.bias = at::zeros({B, L}, q.options())
                 .masked_fill_(kp.logical_not(), neg_inf<double>());
  }
  return c;
}

void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got None/undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be on the cpu device, got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have dtype ",
              ref.scalar_type(), " (that of ", ref_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), fn, ": ", name, " must have shape ", ref.sizes(),
              " (that of ",
              ref_name, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

}  // namespace

bool set_poison_outputs(bool on) { return poisoned.set(on); }

std::string thought_attention_backend_info() {
  const Blas& b = blas();
  std::string s = "gemm: ";
  s += b.sgemm ? "sgemm_" : "at::addmm (fp32 fallback)";
  s += b.dgemm ? ", dgemm_" : ", at::addmm (fp64 fallback)";
  s += b.set_threads_local ? "; MKL_Set_Num_Threads_Local: yes" : "; MKL_Set_Num_Threads_Local: no";
  s += "; omp threads: " + std::to_string(at::get_num_threads());
  s += "; cpu: ";
  s += cpu_isa();
  return s;
}

std::tuple<at::Tensor, at::Tensor> thought_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const std::optional<at::Tensor>& keep,
                                                         double scale, int64_t window) {
  const char* fn = "thought_attention_fwd";
  const Checked c = check_common(fn, q, k, v, keep, scale, window);
  const Geom& g = c.g;
  at::Tensor out = poisoned(at::empty_like(q));
  at::Tensor lse = poisoned(at::empty({g.B, g.Hq, g.L}, q.options()));
  if (q.numel() == 0 || g.units == 0) {
    out.zero_();
    lse.fill_(neg_inf<double>());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "thought_attention_fwd", [&] {
    fwd_kernel<scalar_t>(g, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                         c.bias.defined() ? c.bias.data_ptr<scalar_t>() : nullptr,
                         static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(),
                         lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> thought_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& keep, double scale, int64_t window) {
  const char* fn = "thought_attention_bwd";
  const Checked c = check_common(fn, q, k, v, keep, scale, window);
  const Geom& g = c.g;
  check_like(fn, "grad_out", grad_out, q, "q");
  check_like(fn, "out", out, q, "q");
  TORCH_CHECK(lse.defined(), fn, ": lse must be a tensor, got None/undefined");
  TORCH_CHECK(lse.device().is_cpu(), fn, ": lse must be on the cpu device, got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == q.scalar_type(), fn, ": lse must have dtype ", q.scalar_type(),
              " (that of q), got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == g.B && lse.size(1) == g.Hq && lse.size(2) == g.L, fn,
              ": lse must have shape (B, Hq, L) = (", g.B, ", ", g.Hq, ", ", g.L, "), got ",
              lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), fn, ": lse must be contiguous");
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_like(fn, "grad_lse", grad_lse->contiguous(), lse, "lse");
    glse = grad_lse->contiguous();
  }
  at::Tensor dq = poisoned(at::empty_like(q));
  at::Tensor dk = poisoned(at::empty_like(k));
  at::Tensor dv = poisoned(at::empty_like(v));
  if (q.numel() == 0 || g.units == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "thought_attention_bwd", [&] {
    bwd_kernel<scalar_t>(g, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                         k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         lse.data_ptr<scalar_t>(),
                         glse.defined() ? glse.data_ptr<scalar_t>() : nullptr,
                         c.bias.defined() ? c.bias.data_ptr<scalar_t>() : nullptr,
                         static_cast<scalar_t>(scale), dq.data_ptr<scalar_t>(),
                         dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace qstar::cpu
