// 16-float vectors for our CPU kernels: one GCC vector is one AVX-512 register where the compiler
// targets AVX-512 (-march=native), two AVX2 registers elsewhere; the compiler picks the instructions.
#pragma once

#include <algorithm>
#include <cstdint>

namespace rayfoundry {

typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline Vec16 load16(const float* p) {
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, Vec16 v) { __builtin_memcpy(p, &v, sizeof v); }

inline float max16(Vec16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline float sum16(Vec16 v) {
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

// e^x to about 2 ulp over [-87, 88] (clamped outside): x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (error below 2e-7), 2^n put straight into the exponent bits.
inline Vec16 exp16(Vec16 x) {
  const Vec16 lowest = Vec16{} - 87.0f, highest = Vec16{} + 88.0f;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const Vec16 shifter = Vec16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 n = (x * 1.44269504f + shifter) - shifter;
  const Vec16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts, exact products
  Vec16 p = r * (1.f / 720) + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const Int16 bits = (__builtin_convertvector(n, Int16) + 127) << 23;
  Vec16 two_n;
  __builtin_memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

}  // namespace rayfoundry
