// The GEMM of the CPU kernels: the BLAS that torch itself links (MKL on x86-64), found at run time.
//
// The kernels call sgemm_/dgemm_ single-threaded from inside their own OpenMP regions, so they
// look the symbols up with dlsym (no link-time BLAS dependency) and keep MKL on one thread while a
// BlasOneThread guard lives. QSTAR_CPU_NO_BLAS=1 hides the BLAS (gemm() then falls back to
// at::addmm_), which the tests use to run that path. Both kernels multiply through gemm() below.
#pragma once

#include <ATen/ATen.h>
#include <dlfcn.h>

#include <bit>
#include <cstdint>
#include <type_traits>

#include "cpu/platform.h"

namespace qstar::cpu {

// The integer arguments point at 64-bit integers holding small values: on a little-endian machine
// an LP64 BLAS (32-bit ints, torch's MKL) reads the low half, which is the same value, and an
// ILP64 one reads all of it, so either interface works. (Big-endian: plain 32-bit ints, LP64 only.)
using blas_int = std::conditional_t<std::endian::native == std::endian::little, int64_t, int>;
template <typename T>
using gemm_fn = void (*)(const char*, const char*, const blas_int*, const blas_int*, const blas_int*,
                         const T*, const T*, const blas_int*, const T*, const blas_int*, const T*, T*,
                         const blas_int*);
using set_threads_fn = int (*)(int);

struct Blas {
  gemm_fn<float> sgemm = nullptr;
  gemm_fn<double> dgemm = nullptr;
  set_threads_fn set_threads_local = nullptr;
};

// Prefer the symbol of libtorch_cpu itself (the MKL torch was built with, LP64), then whatever the
// default lookup scope of this module offers.
inline void* find_blas_symbol(const char* name) {
  if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
    void* p = dlsym(lib, name);
    dlclose(lib);
    if (p != nullptr) return p;
  }
  return dlsym(RTLD_DEFAULT, name);
}

// Looked up once per process (an inline function's static is shared by every translation unit).
inline const Blas& blas() {
  static const Blas b = [] {
    Blas r;
    if (env_flag("QSTAR_CPU_NO_BLAS")) return r;
    r.sgemm = reinterpret_cast<gemm_fn<float>>(find_blas_symbol("sgemm_"));
    r.dgemm = reinterpret_cast<gemm_fn<double>>(find_blas_symbol("dgemm_"));
    r.set_threads_local =
        reinterpret_cast<set_threads_fn>(find_blas_symbol("MKL_Set_Num_Threads_Local"));
    return r;
  }();
  return b;
}

// Keeps MKL single-threaded on this thread while it lives (the kernels parallelise outside the
// GEMMs), through MKL_Set_Num_Threads_Local, the C entry point (the lowercase name is MKL's Fortran
// one, which takes a pointer). Restoring 0 restores the global setting.
class BlasOneThread {
 public:
  BlasOneThread() : fn_(blas().set_threads_local) {
    if (fn_) prev_ = fn_(1);
  }
  ~BlasOneThread() {
    if (fn_) fn_(prev_);
  }
  BlasOneThread(const BlasOneThread&) = delete;
  BlasOneThread& operator=(const BlasOneThread&) = delete;

 private:
  set_threads_fn fn_;
  int prev_ = 0;
};

// The ATen dtype of the kernels' value type (float32 or float64).
template <typename T>
constexpr at::ScalarType scalar_type_of() {
  return std::is_same_v<T, float> ? at::kFloat : at::kDouble;
}

// Row-major C (M x N) = alpha * op(A) op(B) + beta * C, where op(A) is M x K and op(B) is K x N.
// ta: A is stored K x M (leading dimension lda), else M x K; tb: B is stored N x K, else K x N.
// In order: nothing for an empty C; C = beta * C for K == 0 (0 for beta == 0: C may hold garbage,
// even NaN); sgemm_/dgemm_ when the BLAS was found; else at::addmm_ on from_blob views.
template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        T& c = C[i * ldc + j];
        c = beta == T(0) ? T(0) : beta * c;
      }
    return;
  }
  gemm_fn<T> f = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    f = blas().sgemm;
  } else {
    f = blas().dgemm;
  }
  if (f != nullptr) {
    // Column-major BLAS sees the row-major C as C^T = op(B)^T op(A)^T, an N x M product.
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    const blas_int m = N, n = M, k = K, la = lda, lb = ldb, lc = ldc;
    f(&cb, &ca, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(scalar_type_of<T>());
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {M, K}, {1, lda}, opts)
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {K, N}, {1, ldb}, opts)
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) c.zero_();  // C may hold garbage (even NaN) before a beta = 0 product
  c.addmm_(a, b, beta, alpha);
}

}  // namespace qstar::cpu
