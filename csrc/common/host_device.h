// How the shared per-element maths in common/ is declared, so that one definition compiles for
// the CPU kernels (g++) and for the device (nvcc):
//   QSTAR_HD          __host__ __device__ under nvcc, nothing otherwise;
//   QSTAR_HD_INLINE   the same, always inlined (hot per-element code in vectorised CPU loops).
#pragma once

#if defined(__CUDACC__)
#define QSTAR_HD __host__ __device__
#define QSTAR_HD_INLINE __host__ __device__ __forceinline__
#else
#define QSTAR_HD
#define QSTAR_HD_INLINE inline __attribute__((always_inline))
#endif
