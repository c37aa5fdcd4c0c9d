// Thought attention on the GPU: causal (optionally windowed, padded) attention over the text block
// plus one diagonal key per thought block, merged in one exact softmax (the contract:
// docs/kernels.md, "Contract: thought attention").
//
// Design (correctness first; every stage is short and reads like the maths)
// -------------------------------------------------------------------------
// * Forward: one CTA per (query tile of BM rows, query head, batch). The tile's rows first take
//   their `a` diagonal keys (a warp per row: dot products with warp reductions, an online softmax
//   in registers), then the text keys in tiles of BN: S = Q K^T (tile matmul), the mask and the
//   online-softmax merge per row (warp per row), P rounded to the input dtype, O += P V (tile
//   matmul; O lives in shared memory in float32 so that each row can be rescaled). At the end
//   out = O / l and lse = m + log l (0 and -inf for a row with nothing to attend to).
// * Backward, four kernels, no atomics:
//     delta  Delta_i = rowsum(dO * O) - grad_lse_i (a warp per row);
//     dq     one CTA per (query tile, query head): per text key tile S, dP = dO V^T, then
//            dS = P (dP - Delta) scale with P = exp(S scale - lse), dQ += dS K; then the diagonal
//            keys per row;
//     dkdv   one CTA per (text key tile of BN rows, kv head): over the G query heads of the group
//            and the query tiles that can see the keys, dV += P^T dO, dK += dS^T Q;
//     diag   a warp per (thought key i of block s, kv head): dV, dK of that key, summed over the
//            G query heads (each thought key is seen by its own row i only).
//   Native GQA: query head h reads kv head h / G, and the dK/dV CTAs loop over the G heads.
// * Tile matmuls (block_mm): float16/bfloat16 on the tensor cores (WMMA m16n16k16, float32
//   accumulators, operands and accumulators in shared memory), float32 in plain FMA (SIMT).
// * The per-element softmax maths is common/softmax_math.h, the same functions the CPU kernels
//   run (tests/test_shared_math.py runs them on the CPU in this file's sequence).
// * Shared memory is dynamic; its size per instance is a constexpr of the tile config, capped at
//   99 KB by a static_assert and reported by thought_attention_launch_table() for the resource
//   test (tests/test_cuda_build.py).
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common/softmax_math.h"
#include "cuda/scalar.cuh"
#include "cuda/thought_attention_cuda.h"

namespace qstar::cuda {
namespace {

// 99 KB: sm_86/87/89 allow at most 101,376 bytes of dynamic shared memory per block.
constexpr int kMaxSmem = 99 * 1024;

// ------------------------------------------------------------------------------------------------
// Tile configuration and shared-memory layout
// ------------------------------------------------------------------------------------------------
// Row padding: 16 bytes per row keeps 16-byte vector stores aligned and shifts banks; the
// leading dimensions stay multiples of 8 (16-bit) / 4 (float32) elements, as WMMA requires, and
// every 16 x 16 fragment starts on a 32-byte boundary.
template <typename T>
constexpr int pad_of() {
  return 16 / static_cast<int>(sizeof(T));
}

constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

template <typename T, int ROWS, int COLS>
struct Buf {
  static constexpr int ld = COLS + pad_of<T>();
  static constexpr int bytes = align128(ROWS * ld * static_cast<int>(sizeof(T)));
};

// Tiles: BM query rows, BN key rows per step, NW warps.
template <typename T, int D>
struct FwdCfg {
  static constexpr bool lowp = sizeof(T) == 2;
  static constexpr int BM = lowp ? 64 : 32, BN = 32, NW = 4;
  using Q = Buf<T, BM, D>;
  using K = Buf<T, BN, D>;
  using S = Buf<float, BM, BN>;
  using P = Buf<T, BM, BN>;
  using O = Buf<float, BM, D>;
  static constexpr int oQ = 0, oK = oQ + Q::bytes, oV = oK + K::bytes, oS = oV + K::bytes,
                       oP = oS + S::bytes, oO = oP + P::bytes, oM = oO + O::bytes,
                       oL = oM + align128(BM * 4), smem = oL + align128(BM * 4);
  static_assert(smem <= kMaxSmem, "forward tile config exceeds 99 KB of shared memory");
};

template <typename T, int D>
struct DqCfg {
  static constexpr bool lowp = sizeof(T) == 2;
  static constexpr int BM = 32, BN = lowp ? 32 : 16, NW = 4;
  using Q = Buf<T, BM, D>;
  using K = Buf<T, BN, D>;
  using S = Buf<float, BM, BN>;
  using P = Buf<T, BM, BN>;
  using O = Buf<float, BM, D>;
  static constexpr int oQ = 0, oDO = oQ + Q::bytes, oK = oDO + Q::bytes, oV = oK + K::bytes,
                       oS = oV + K::bytes, oDP = oS + S::bytes, oDS = oDP + S::bytes,
                       oDQ = oDS + P::bytes, oLse = oDQ + O::bytes, oDelta = oLse + align128(BM * 4),
                       smem = oDelta + align128(BM * 4);
  static_assert(smem <= kMaxSmem, "dq tile config exceeds 99 KB of shared memory");
};

template <typename T, int D>
struct DkvCfg {
  static constexpr bool lowp = sizeof(T) == 2;
  static constexpr int BN = lowp ? 32 : 16, BM = 32, NW = 4;  // BN key rows, BM query rows
  using K = Buf<T, BN, D>;
  using Q = Buf<T, BM, D>;
  using S = Buf<float, BM, BN>;
  using P = Buf<T, BM, BN>;
  using A = Buf<float, BN, D>;
  static constexpr int oK = 0, oV = oK + K::bytes, oQ = oV + K::bytes, oDO = oQ + Q::bytes,
                       oS = oDO + Q::bytes, oDP = oS + S::bytes, oP = oDP + S::bytes,
                       oDS = oP + P::bytes, oDK = oDS + P::bytes, oDV = oDK + A::bytes,
                       oLse = oDV + A::bytes, oDelta = oLse + align128(BM * 4),
                       smem = oDelta + align128(BM * 4);
  static_assert(smem <= kMaxSmem, "dk/dv tile config exceeds 99 KB of shared memory");
};

constexpr int kRowThreads = 128;  // delta and diag kernels: 4 warps, a warp per row

// ------------------------------------------------------------------------------------------------
// Block-wide building blocks (every thread of the CTA calls them; the caller synchronises)
// ------------------------------------------------------------------------------------------------
// dst[r][:] = src[(row0 + r) * D + :] for r < valid, 0 for valid <= r < ROWS; 16-byte vectors.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* __restrict__ src, int64_t row0,
                                          int valid) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunks = D / kVec;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += NT) {
    const int r = idx / kChunks, c = idx % kChunks;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * D + c * kVec);
    *reinterpret_cast<uint4*>(dst + r * ld + c * kVec) = val;
  }
}

template <int ROWS, int COLS, int NT>
__device__ __forceinline__ void zero_f32(float* dst, int ld) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) dst[(idx / COLS) * ld + idx % COLS] = 0.f;
}

// C[M][N] (+)= op(A)[M][K] op(B)[K][N] in float32, everything in shared memory.
//   A_T = false: A(m, k) = A[m * lda + k];   A_T = true: A(m, k) = A[k * lda + m].
//   B_T = false: B(k, n) = B[k * ldb + n];   B_T = true: B(k, n) = B[n * ldb + k].
// float16/bfloat16: WMMA 16 x 16 x 16 fragments, one output fragment per warp at a time.
// float32: one output element per thread at a time.
template <typename T, int M, int N, int K, bool A_T, bool B_T, bool ACC, int NW>
__device__ __forceinline__ void block_mm(const T* A, int lda, const T* Bm, int ldb, float* C,
                                         int ldc) {
  if constexpr (std::is_same_v<T, float>) {
    for (int idx = threadIdx.x; idx < M * N; idx += NW * kWarp) {
      const int m = idx / N, n = idx % N;
      float acc = ACC ? C[m * ldc + n] : 0.f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) {
        const float a = A_T ? A[k * lda + m] : A[m * lda + k];
        const float b = B_T ? Bm[n * ldb + k] : Bm[k * ldb + n];
        acc = fmaf(a, b, acc);
      }
      C[m * ldc + n] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "WMMA tiles are 16 x 16 x 16");
    using LayA = std::conditional_t<A_T, wmma::col_major, wmma::row_major>;
    using LayB = std::conditional_t<B_T, wmma::col_major, wmma::row_major>;
    constexpr int TN = N / 16, TK = K / 16;
    const int warp = warp_id();
    for (int t = warp; t < (M / 16) * TN; t += NW) {
      const int mi = t / TN, ni = t % TN;
      float* cp = C + mi * 16 * ldc + ni * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if constexpr (ACC) {
        wmma::load_matrix_sync(c, cp, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.f);
      }
#pragma unroll
      for (int ki = 0; ki < TK; ++ki) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayB> b;
        const T* ap = A_T ? A + ki * 16 * lda + mi * 16 : A + mi * 16 * lda + ki * 16;
        const T* bp = B_T ? Bm + ni * 16 * ldb + ki * 16 : Bm + ki * 16 * ldb + ni * 16;
        wmma::load_matrix_sync(a, ap, lda);
        wmma::load_matrix_sync(b, bp, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(cp, c, ldc, wmma::mem_row_major);
    }
  }
}

// Whether query i may attend to text key j (docs/kernels.md, "Contract: thought attention"), i and j in
// [0, L).
__device__ __forceinline__ bool text_allowed(int i, int j, int L, int window, const bool* keep_b) {
  return i < L && j <= i && (window <= 0 || i - j < window) && (keep_b == nullptr || keep_b[j]);
}

// The first text key tile (a multiple of bn) that query rows [q0, ...) can see.
__device__ __forceinline__ int first_key_tile(int q0, int window, int bn) {
  const int lo = window > 0 ? max(0, q0 - window + 1) : 0;
  return lo / bn * bn;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(FwdCfg<T, D>::NW * kWarp, 1)
    attn_fwd_kernel(AttnShape sh, const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, const bool* __restrict__ keep, T* __restrict__ out,
                    float* __restrict__ lse) {
  using C = FwdCfg<T, D>;
  constexpr int NT = C::NW * kWarp, BM = C::BM, BN = C::BN, DL = D / kWarp;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + C::oQ);
  T* Ks = reinterpret_cast<T*>(smem + C::oK);
  T* Vs = reinterpret_cast<T*>(smem + C::oV);
  float* S = reinterpret_cast<float*>(smem + C::oS);
  T* P = reinterpret_cast<T*>(smem + C::oP);
  float* O = reinterpret_cast<float*>(smem + C::oO);
  float* rm = reinterpret_cast<float*>(smem + C::oM);
  float* rl = reinterpret_cast<float*>(smem + C::oL);

  const int L = sh.L, G = sh.Hq / sh.Hkv;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest rows first
  const int hq = blockIdx.y, b = blockIdx.z, hk = hq / G;
  const int64_t Lk = static_cast<int64_t>(sh.a + 1) * L;
  const T* qh = q + (static_cast<int64_t>(b) * sh.Hq + hq) * L * D;
  const T* kh = k + (static_cast<int64_t>(b) * sh.Hkv + hk) * Lk * D;
  const T* vh = v + (static_cast<int64_t>(b) * sh.Hkv + hk) * Lk * D;
  const bool* keep_b = keep == nullptr ? nullptr : keep + static_cast<int64_t>(b) * L;
  const int warp = warp_id(), lane = lane_id();
  const int rows = min(BM, L - q0);

  load_rows<T, D, BM, NT>(Qs, C::Q::ld, qh, q0, rows);
  __syncthreads();

  // The diagonal keys of every thought block start each row's online softmax (warp per row).
  for (int r = warp; r < BM; r += C::NW) {
    SoftmaxState<float> st = softmax_state_empty<float>();
    float o[DL];
#pragma unroll
    for (int t = 0; t < DL; ++t) o[t] = 0.f;
    const int i = q0 + r;
    if (r < rows && (keep_b == nullptr || keep_b[i])) {
      for (int s = 1; s <= sh.a; ++s) {
        const T* kr = kh + (s * static_cast<int64_t>(L) + i) * D;
        const T* vr = vh + (s * static_cast<int64_t>(L) + i) * D;
        float dot = 0.f;
#pragma unroll
        for (int t = 0; t < DL; ++t) dot += to_f32(Qs[r * C::Q::ld + lane + t * kWarp]) * to_f32(kr[lane + t * kWarp]);
        const float x = warp_sum(dot) * sh.scale;
        const float alpha = softmax_push(st, x);
        const float p = rescale_factor(x, st.m);  // exp(x - m_new)
#pragma unroll
        for (int t = 0; t < DL; ++t) o[t] = o[t] * alpha + p * to_f32(vr[lane + t * kWarp]);
      }
    }
#pragma unroll
    for (int t = 0; t < DL; ++t) O[r * C::O::ld + lane + t * kWarp] = o[t];
    if (lane == 0) {
      rm[r] = st.m;
      rl[r] = st.l;
    }
  }

  // The text keys: tiles of BN from the window's first key to the tile's last row.
  const int k_end = min(L, q0 + BM);
  for (int k0 = first_key_tile(q0, sh.window, BN); k0 < k_end; k0 += BN) {
    const int krows = min(BN, L - k0);
    load_rows<T, D, BN, NT>(Ks, C::K::ld, kh, k0, krows);
    load_rows<T, D, BN, NT>(Vs, C::K::ld, vh, k0, krows);
    __syncthreads();
    block_mm<T, BM, BN, D, false, true, false, C::NW>(Qs, C::Q::ld, Ks, C::K::ld, S, C::S::ld);
    __syncthreads();
    // Mask, online-softmax merge per row; P (rescaled to the new maximum) in the input dtype.
    for (int r = warp; r < BM; r += C::NW) {
      const int i = q0 + r;
      float x[BN / kWarp > 0 ? BN / kWarp : 1];
      float m_blk = neg_inf<float>();
      for (int t = 0; t * kWarp < BN; ++t) {
        const int c = lane + t * kWarp;
        const bool ok = c < BN && text_allowed(i, k0 + c, L, sh.window, keep_b) && k0 + c < L;
        x[t] = ok ? S[r * C::S::ld + c] * sh.scale : neg_inf<float>();
        m_blk = x[t] > m_blk ? x[t] : m_blk;
      }
      m_blk = warp_max(m_blk);
      float l_blk = 0.f;
      for (int t = 0; t * kWarp < BN; ++t) {
        x[t] = exp_shifted(x[t], m_blk);
        l_blk += x[t];
      }
      l_blk = warp_sum(l_blk);
      SoftmaxState<float> st{rm[r], rl[r]};
      const float alpha = softmax_merge(st, m_blk, l_blk);
      const float beta = rescale_factor(m_blk, st.m);
      for (int t = 0; t * kWarp < BN; ++t) {
        const int c = lane + t * kWarp;
        if (c < BN) P[r * C::P::ld + c] = from_f32<T>(x[t] * beta);
      }
#pragma unroll
      for (int t = 0; t < DL; ++t) O[r * C::O::ld + lane + t * kWarp] *= alpha;
      __syncwarp();
      if (lane == 0) {
        rm[r] = st.m;
        rl[r] = st.l;
      }
    }
    __syncthreads();
    block_mm<T, BM, D, BN, false, false, true, C::NW>(P, C::P::ld, Vs, C::K::ld, O, C::O::ld);
    __syncthreads();
  }

  // out = O / l, lse = m + log l (0 and -inf for a row that sees nothing).
  T* oh = out + (static_cast<int64_t>(b) * sh.Hq + hq) * L * D;
  float* lh = lse + (static_cast<int64_t>(b) * sh.Hq + hq) * L;
  for (int r = warp; r < rows; r += C::NW) {
    const SoftmaxState<float> st{rm[r], rl[r]};
    const float inv = softmax_inv_sum(st);
#pragma unroll
    for (int t = 0; t < DL; ++t) {
      const int d = lane + t * kWarp;
      oh[static_cast<int64_t>(q0 + r) * D + d] = from_f32<T>(O[r * C::O::ld + d] * inv);
    }
    if (lane == 0) lh[q0 + r] = softmax_lse(st);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
// Delta_i = rowsum(dO_i * O_i) - grad_lse_i, a warp per row of (B * Hq * L).
template <typename T, int D>
__global__ void __launch_bounds__(kRowThreads, 1)
    attn_bwd_delta_kernel(int64_t rows, const T* __restrict__ grad_out, const T* __restrict__ out,
                          const float* __restrict__ grad_lse, float* __restrict__ delta) {
  const int64_t row = grid_warp();
  const int lane = lane_id();
  if (row >= rows) return;
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < D / kWarp; ++t) {
    const int64_t idx = row * D + lane + t * kWarp;
    acc += to_f32(grad_out[idx]) * to_f32(out[idx]);
  }
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = softmax_bwd_row_term(acc, grad_lse == nullptr ? 0.f : grad_lse[row]);
}

// dS = P (dP - Delta) scale with P = exp(S scale - lse) on the allowed entries (0 elsewhere), for
// a BM x BN tile of query rows q0.. and text keys k0..; P and dS stored in T (P only if wanted).
template <typename T, int BM, int BN, int NT, bool STORE_P>
__device__ __forceinline__ void bwd_tile_ds(const float* S, const float* dP, int lds, T* P, T* dS,
                                            int ldp, const float* lse_s, const float* delta_s,
                                            int q0, int k0, const AttnShape& sh,
                                            const bool* keep_b) {
  for (int idx = threadIdx.x; idx < BM * BN; idx += NT) {
    const int r = idx / BN, c = idx % BN;
    const int i = q0 + r, j = k0 + c;
    const bool ok = j < sh.L && text_allowed(i, j, sh.L, sh.window, keep_b);
    const float x = ok ? S[r * lds + c] * sh.scale : neg_inf<float>();
    const float p = prob_from_lse(x, lse_s[r]);
    const float ds = p == 0.f ? 0.f : p * (dP[r * lds + c] - delta_s[r]) * sh.scale;
    if constexpr (STORE_P) P[r * ldp + c] = from_f32<T>(p);
    dS[r * ldp + c] = from_f32<T>(ds);
  }
}

template <typename T, int BM, int NT>
__device__ __forceinline__ void load_row_stats(float* lse_s, float* delta_s, const float* lse_h,
                                               const float* delta_h, int q0, int rows) {
  for (int r = threadIdx.x; r < BM; r += NT) {
    lse_s[r] = r < rows ? lse_h[q0 + r] : neg_inf<float>();
    delta_s[r] = r < rows ? delta_h[q0 + r] : 0.f;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(DqCfg<T, D>::NW * kWarp, 1)
    attn_bwd_dq_kernel(AttnShape sh, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const bool* __restrict__ keep,
                       const T* __restrict__ grad_out, const float* __restrict__ lse,
                       const float* __restrict__ delta, T* __restrict__ dq) {
  using C = DqCfg<T, D>;
  constexpr int NT = C::NW * kWarp, BM = C::BM, BN = C::BN, DL = D / kWarp;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + C::oQ);
  T* dOs = reinterpret_cast<T*>(smem + C::oDO);
  T* Ks = reinterpret_cast<T*>(smem + C::oK);
  T* Vs = reinterpret_cast<T*>(smem + C::oV);
  float* S = reinterpret_cast<float*>(smem + C::oS);
  float* dP = reinterpret_cast<float*>(smem + C::oDP);
  T* dS = reinterpret_cast<T*>(smem + C::oDS);
  float* dQ = reinterpret_cast<float*>(smem + C::oDQ);
  float* lse_s = reinterpret_cast<float*>(smem + C::oLse);
  float* delta_s = reinterpret_cast<float*>(smem + C::oDelta);

  const int L = sh.L, G = sh.Hq / sh.Hkv;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int hq = blockIdx.y, b = blockIdx.z, hk = hq / G;
  const int64_t Lk = static_cast<int64_t>(sh.a + 1) * L;
  const int64_t qrow0 = (static_cast<int64_t>(b) * sh.Hq + hq) * L;  // row index of (b, hq, 0)
  const T* kh = k + (static_cast<int64_t>(b) * sh.Hkv + hk) * Lk * D;
  const T* vh = v + (static_cast<int64_t>(b) * sh.Hkv + hk) * Lk * D;
  const bool* keep_b = keep == nullptr ? nullptr : keep + static_cast<int64_t>(b) * L;
  const int warp = warp_id(), lane = lane_id();
  const int rows = min(BM, L - q0);

  load_rows<T, D, BM, NT>(Qs, C::Q::ld, q + qrow0 * D, q0, rows);
  load_rows<T, D, BM, NT>(dOs, C::Q::ld, grad_out + qrow0 * D, q0, rows);
  load_row_stats<T, BM, NT>(lse_s, delta_s, lse + qrow0, delta + qrow0, q0, rows);
  zero_f32<BM, D, NT>(dQ, C::O::ld);

  const int k_end = min(L, q0 + BM);
  for (int k0 = first_key_tile(q0, sh.window, BN); k0 < k_end; k0 += BN) {
    const int krows = min(BN, L - k0);
    load_rows<T, D, BN, NT>(Ks, C::K::ld, kh, k0, krows);
    load_rows<T, D, BN, NT>(Vs, C::K::ld, vh, k0, krows);
    __syncthreads();
    block_mm<T, BM, BN, D, false, true, false, C::NW>(Qs, C::Q::ld, Ks, C::K::ld, S, C::S::ld);
    block_mm<T, BM, BN, D, false, true, false, C::NW>(dOs, C::Q::ld, Vs, C::K::ld, dP, C::S::ld);
    __syncthreads();
    bwd_tile_ds<T, BM, BN, NT, false>(S, dP, C::S::ld, nullptr, dS, C::P::ld, lse_s, delta_s, q0, k0,
                                      sh, keep_b);
    __syncthreads();
    block_mm<T, BM, D, BN, false, false, true, C::NW>(dS, C::P::ld, Ks, C::K::ld, dQ, C::O::ld);
    __syncthreads();
  }

  // The diagonal keys (warp per row), then dQ out.
  for (int r = warp; r < rows; r += C::NW) {
    const int i = q0 + r;
    float acc[DL];
#pragma unroll
    for (int t = 0; t < DL; ++t) acc[t] = dQ[r * C::O::ld + lane + t * kWarp];
    if (keep_b == nullptr || keep_b[i]) {
      for (int s = 1; s <= sh.a; ++s) {
        const T* kr = kh + (s * static_cast<int64_t>(L) + i) * D;
        const T* vr = vh + (s * static_cast<int64_t>(L) + i) * D;
        float qk = 0.f, dov = 0.f;
#pragma unroll
        for (int t = 0; t < DL; ++t) {
          const int d = lane + t * kWarp;
          qk += to_f32(Qs[r * C::Q::ld + d]) * to_f32(kr[d]);
          dov += to_f32(dOs[r * C::Q::ld + d]) * to_f32(vr[d]);
        }
        const float p = prob_from_lse(warp_sum(qk) * sh.scale, lse_s[r]);
        const float ds = p == 0.f ? 0.f : p * (warp_sum(dov) - delta_s[r]) * sh.scale;
#pragma unroll
        for (int t = 0; t < DL; ++t) acc[t] += ds * to_f32(kr[lane + t * kWarp]);
      }
    }
#pragma unroll
    for (int t = 0; t < DL; ++t) dq[(qrow0 + i) * D + lane + t * kWarp] = from_f32<T>(acc[t]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(DkvCfg<T, D>::NW * kWarp, 1)
    attn_bwd_dkdv_kernel(AttnShape sh, const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const bool* __restrict__ keep,
                         const T* __restrict__ grad_out, const float* __restrict__ lse,
                         const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  using C = DkvCfg<T, D>;
  constexpr int NT = C::NW * kWarp, BM = C::BM, BN = C::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + C::oK);
  T* Vs = reinterpret_cast<T*>(smem + C::oV);
  T* Qs = reinterpret_cast<T*>(smem + C::oQ);
  T* dOs = reinterpret_cast<T*>(smem + C::oDO);
  float* S = reinterpret_cast<float*>(smem + C::oS);
  float* dP = reinterpret_cast<float*>(smem + C::oDP);
  T* P = reinterpret_cast<T*>(smem + C::oP);
  T* dS = reinterpret_cast<T*>(smem + C::oDS);
  float* dK = reinterpret_cast<float*>(smem + C::oDK);
  float* dV = reinterpret_cast<float*>(smem + C::oDV);
  float* lse_s = reinterpret_cast<float*>(smem + C::oLse);
  float* delta_s = reinterpret_cast<float*>(smem + C::oDelta);

  const int L = sh.L, G = sh.Hq / sh.Hkv;
  const int k0 = blockIdx.x * BN;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int64_t Lk = static_cast<int64_t>(sh.a + 1) * L;
  const int64_t kvrow0 = (static_cast<int64_t>(b) * sh.Hkv + hk) * Lk;  // row of (b, hk, 0)
  const bool* keep_b = keep == nullptr ? nullptr : keep + static_cast<int64_t>(b) * L;
  const int krows = min(BN, L - k0);

  load_rows<T, D, BN, NT>(Ks, C::K::ld, k + kvrow0 * D, k0, krows);
  load_rows<T, D, BN, NT>(Vs, C::K::ld, v + kvrow0 * D, k0, krows);
  zero_f32<BN, D, NT>(dK, C::A::ld);
  zero_f32<BN, D, NT>(dV, C::A::ld);

  // Queries i that see a key j of the tile: j <= i (< j + window).
  const int q_end = sh.window > 0 ? min(L, k0 + BN - 1 + sh.window) : L;
  for (int g = 0; g < G; ++g) {
    const int hq = hk * G + g;
    const int64_t qrow0 = (static_cast<int64_t>(b) * sh.Hq + hq) * L;
    for (int q0 = k0 / BM * BM; q0 < q_end; q0 += BM) {
      const int rows = min(BM, L - q0);
      __syncthreads();  // the previous step's readers of Qs, dOs and the stats are done
      load_rows<T, D, BM, NT>(Qs, C::Q::ld, q + qrow0 * D, q0, rows);
      load_rows<T, D, BM, NT>(dOs, C::Q::ld, grad_out + qrow0 * D, q0, rows);
      load_row_stats<T, BM, NT>(lse_s, delta_s, lse + qrow0, delta + qrow0, q0, rows);
      __syncthreads();
      block_mm<T, BM, BN, D, false, true, false, C::NW>(Qs, C::Q::ld, Ks, C::K::ld, S, C::S::ld);
      block_mm<T, BM, BN, D, false, true, false, C::NW>(dOs, C::Q::ld, Vs, C::K::ld, dP, C::S::ld);
      __syncthreads();
      bwd_tile_ds<T, BM, BN, NT, true>(S, dP, C::S::ld, P, dS, C::P::ld, lse_s, delta_s, q0, k0, sh,
                                       keep_b);
      __syncthreads();
      // dV += P^T dO, dK += dS^T Q (P and dS are stored BM x BN: read transposed).
      block_mm<T, BN, D, BM, true, false, true, C::NW>(P, C::P::ld, dOs, C::Q::ld, dV, C::A::ld);
      block_mm<T, BN, D, BM, true, false, true, C::NW>(dS, C::P::ld, Qs, C::Q::ld, dK, C::A::ld);
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < krows * D; idx += NT) {
    const int r = idx / D, d = idx % D;
    const int64_t o = (kvrow0 + k0 + r) * D + d;
    dk[o] = from_f32<T>(dK[r * C::A::ld + d]);
    dv[o] = from_f32<T>(dV[r * C::A::ld + d]);
  }
}

// dK, dV of the thought keys: key i of block s (1 <= s <= a) is seen by query row i alone, in
// each of the G query heads of its kv head. A warp per (b, kv head, s, i).
template <typename T, int D>
__global__ void __launch_bounds__(kRowThreads, 1)
    attn_bwd_diag_kernel(AttnShape sh, const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const bool* __restrict__ keep,
                         const T* __restrict__ grad_out, const float* __restrict__ lse,
                         const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int DL = D / kWarp;
  const int64_t L = sh.L, a = sh.a, G = sh.Hq / sh.Hkv;
  const int64_t total = static_cast<int64_t>(sh.B) * sh.Hkv * a * L;
  const int64_t w = grid_warp();
  const int lane = lane_id();
  if (w >= total) return;
  const int64_t i = w % L;
  const int64_t s = 1 + (w / L) % a;
  const int64_t hk = (w / (L * a)) % sh.Hkv;
  const int64_t b = w / (L * a * sh.Hkv);
  const int64_t krow = (b * sh.Hkv + hk) * (a + 1) * L + s * L + i;
  float kr[DL], vr[DL], gk[DL], gv[DL];
#pragma unroll
  for (int t = 0; t < DL; ++t) {
    kr[t] = to_f32(k[krow * D + lane + t * kWarp]);
    vr[t] = to_f32(v[krow * D + lane + t * kWarp]);
    gk[t] = 0.f;
    gv[t] = 0.f;
  }
  if (keep == nullptr || keep[b * L + i]) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t qrow = (b * sh.Hq + hk * G + g) * L + i;
      float qv[DL], dov[DL], qk = 0.f, dp = 0.f;
#pragma unroll
      for (int t = 0; t < DL; ++t) {
        qv[t] = to_f32(q[qrow * D + lane + t * kWarp]);
        dov[t] = to_f32(grad_out[qrow * D + lane + t * kWarp]);
        qk += qv[t] * kr[t];
        dp += dov[t] * vr[t];
      }
      const float p = prob_from_lse(warp_sum(qk) * sh.scale, lse[qrow]);
      const float ds = p == 0.f ? 0.f : p * (warp_sum(dp) - delta[qrow]) * sh.scale;
#pragma unroll
      for (int t = 0; t < DL; ++t) {
        gv[t] += p * dov[t];
        gk[t] += ds * qv[t];
      }
    }
  }
#pragma unroll
  for (int t = 0; t < DL; ++t) {
    dk[krow * D + lane + t * kWarp] = from_f32<T>(gk[t]);
    dv[krow * D + lane + t * kWarp] = from_f32<T>(gv[t]);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------
template <typename Kern>
cudaError_t prepare(Kern kernel, int smem) {
  // Above 48 KB the dynamic shared memory must be allowed explicitly.
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
}

template <typename T, int D>
cudaError_t fwd_impl(const AttnFwdArgs& x, cudaStream_t stream) {
  using C = FwdCfg<T, D>;
  const AttnShape& sh = x.s;
  auto kernel = attn_fwd_kernel<T, D>;
  if (cudaError_t e = prepare(kernel, C::smem); e != cudaSuccess) return e;
  const dim3 grid(blocks_for(sh.L, C::BM), sh.Hq, sh.B);
  kernel<<<grid, C::NW * kWarp, C::smem, stream>>>(
      sh, static_cast<const T*>(x.q), static_cast<const T*>(x.k), static_cast<const T*>(x.v), x.keep,
      static_cast<T*>(x.out), x.lse);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t bwd_impl(const AttnBwdArgs& x, cudaStream_t stream) {
  const AttnShape& sh = x.s;
  const T* q = static_cast<const T*>(x.q);
  const T* k = static_cast<const T*>(x.k);
  const T* v = static_cast<const T*>(x.v);
  const T* go = static_cast<const T*>(x.grad_out);
  const int64_t rows = static_cast<int64_t>(sh.B) * sh.Hq * sh.L;
  constexpr int kRowsPerBlock = kRowThreads / kWarp;
  attn_bwd_delta_kernel<T, D><<<blocks_for(rows, kRowsPerBlock), kRowThreads, 0, stream>>>(
      rows, go, static_cast<const T*>(x.out), x.grad_lse, x.delta);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

  using CQ = DqCfg<T, D>;
  auto dq_kernel = attn_bwd_dq_kernel<T, D>;
  if (cudaError_t e = prepare(dq_kernel, CQ::smem); e != cudaSuccess) return e;
  dq_kernel<<<dim3(blocks_for(sh.L, CQ::BM), sh.Hq, sh.B), CQ::NW * kWarp, CQ::smem, stream>>>(
      sh, q, k, v, x.keep, go, x.lse, x.delta, static_cast<T*>(x.dq));
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

  using CK = DkvCfg<T, D>;
  auto dkdv_kernel = attn_bwd_dkdv_kernel<T, D>;
  if (cudaError_t e = prepare(dkdv_kernel, CK::smem); e != cudaSuccess) return e;
  dkdv_kernel<<<dim3(blocks_for(sh.L, CK::BN), sh.Hkv, sh.B), CK::NW * kWarp, CK::smem, stream>>>(
      sh, q, k, v, x.keep, go, x.lse, x.delta, static_cast<T*>(x.dk), static_cast<T*>(x.dv));
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

  if (sh.a > 0) {
    const int64_t warps = static_cast<int64_t>(sh.B) * sh.Hkv * sh.a * sh.L;
    attn_bwd_diag_kernel<T, D><<<blocks_for(warps, kRowsPerBlock), kRowThreads, 0, stream>>>(
        sh, q, k, v, x.keep, go, x.lse, x.delta, static_cast<T*>(x.dk), static_cast<T*>(x.dv));
  }
  return cudaGetLastError();
}

template <typename T, int D>
int add_launch_info(LaunchInfo* out, int n, int cap, DType dt) {
  const LaunchInfo rows[] = {
      {"attn_fwd_kernel", dt, D, FwdCfg<T, D>::NW * kWarp, FwdCfg<T, D>::smem},
      {"attn_bwd_delta_kernel", dt, D, kRowThreads, 0},
      {"attn_bwd_dq_kernel", dt, D, DqCfg<T, D>::NW * kWarp, DqCfg<T, D>::smem},
      {"attn_bwd_dkdv_kernel", dt, D, DkvCfg<T, D>::NW * kWarp, DkvCfg<T, D>::smem},
      {"attn_bwd_diag_kernel", dt, D, kRowThreads, 0},
  };
  for (const LaunchInfo& r : rows) {
    if (n < cap) out[n] = r;
    ++n;
  }
  return n;
}

}  // namespace

cudaError_t thought_attention_fwd(DType dtype, const AttnFwdArgs& args, cudaStream_t stream) {
  if (!attention_head_dim_supported(args.s.D)) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(args.s.B) * args.s.Hq * args.s.L == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return args.s.D == 64 ? fwd_impl<T, 64>(args, stream) : fwd_impl<T, 128>(args, stream);
  });
}

cudaError_t thought_attention_bwd(DType dtype, const AttnBwdArgs& args, cudaStream_t stream) {
  if (!attention_head_dim_supported(args.s.D)) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(args.s.B) * args.s.Hq * args.s.L == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return args.s.D == 64 ? bwd_impl<T, 64>(args, stream) : bwd_impl<T, 128>(args, stream);
  });
}

int thought_attention_launch_table(LaunchInfo* out, int cap) {
  int n = 0;
  n = add_launch_info<float, 64>(out, n, cap, DType::f32);
  n = add_launch_info<float, 128>(out, n, cap, DType::f32);
  n = add_launch_info<__half, 64>(out, n, cap, DType::f16);
  n = add_launch_info<__half, 128>(out, n, cap, DType::f16);
  n = add_launch_info<__nv_bfloat16, 64>(out, n, cap, DType::bf16);
  n = add_launch_info<__nv_bfloat16, 128>(out, n, cap, DType::bf16);
  return n;
}

}  // namespace qstar::cuda
