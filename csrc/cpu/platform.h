// What the CPU kernels ask of the machine and of the environment, in one place:
//
// * QSTAR_AI: force-inline a row body into the multi-versioned function that calls it;
// * QSTAR_CLONES: compile a row loop once per ISA (avx512f / avx2 / default) with the compiler's
//   function multi-versioning; the loader picks the clone at run time, so no -march is needed;
// * cpu_isa(): the name of the clone that runs here (for the backend_info strings);
// * env_flag(name): the QSTAR_CPU_* switches (set, non-empty and not starting with '0').
#pragma once

#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#define QSTAR_X86 1
#define QSTAR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QSTAR_X86 0
#define QSTAR_CLONES
#endif

#define QSTAR_AI inline __attribute__((always_inline))

namespace qstar::cpu {

inline const char* cpu_isa() {
#if QSTAR_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "default";
#else
  return "generic";
#endif
}

inline bool env_flag(const char* name) {
  const char* s = std::getenv(name);
  return s != nullptr && s[0] != '\0' && s[0] != '0';
}

}  // namespace qstar::cpu
