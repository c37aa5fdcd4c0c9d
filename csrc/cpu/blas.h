// The BLAS that torch itself links (MKL on x86-64), found at run time, for the CPU kernels.
//
// The kernels call sgemm_/dgemm_ single-threaded from inside their own OpenMP regions, so they
// look the symbols up with dlsym (no link-time BLAS dependency) and keep MKL on one thread while a
// BlasOneThread guard lives. QSTAR_CPU_NO_BLAS=1 hides the BLAS (the kernels then fall back to
// at::addmm), which the tests use to run that path.
#pragma once

#include <dlfcn.h>

#include <bit>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

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
    const char* off = std::getenv("QSTAR_CPU_NO_BLAS");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return r;
    r.sgemm = reinterpret_cast<gemm_fn<float>>(find_blas_symbol("sgemm_"));
    r.dgemm = reinterpret_cast<gemm_fn<double>>(find_blas_symbol("dgemm_"));
    r.set_threads_local =
        reinterpret_cast<set_threads_fn>(find_blas_symbol("MKL_Set_Num_Threads_Local"));
    return r;
  }();
  return b;
}

// Keeps MKL single-threaded on this thread while it lives (the kernels parallelise outside the
// GEMMs). Restoring 0 restores the global setting.
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

}  // namespace qstar::cpu
