// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
// and the Gumbel noise of thought sampling, as defined in qstar_kernels/reference/sampling.py:
//
//   key = (seed mod 2^32, seed / 2^32), counter = (v / 4, row, 0, 0); word v % 4 of the output;
//   u = (2 * (word >> 9) + 1) * 2^-24 in (0, 1), exact in float32; G = -log(-log(u)).
//
// Plain inline functions on scalars, so that host and device code share them.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace qstar {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Ten rounds on the counter (c0, c1, c2, c3) with key (k0, k1), in place.
QSTAR_HD_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                   uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The open-interval uniform of one 32-bit word: 23 bits, (2k + 1) / 2^24, exact in float32.
QSTAR_HD_INLINE float philox_word_to_open_uniform(uint32_t x) {
  return static_cast<float>(((x >> 9) << 1) | 1u) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace qstar
