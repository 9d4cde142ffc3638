// The exp of dat's CPU softmax loops (deform_attn, neighborhood_attn), for their kernel headers (common/cpu_isa.h):
// inline, so that it vectorises inside each instruction set's clone of the loops that call it.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace dat {

// exp(x) for x <= ~0 (logit minus running max or logsumexp), written so that loops over it vectorise
// (libm's expf is one call per element): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// Taylor polynomial for e^r (relative error < 2e-7) and 2^n built in the exponent bits. float64 keeps
// libm's exp, for gradcheck-grade accuracy.
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(exponent_bits);
}

inline double exp_vectorisable(double x) { return std::exp(x); }

}  // namespace dat
