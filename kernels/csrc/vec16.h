// 16-float vectors for our CPU kernels, with the handful of operations they use.
//
// Where the compiler targets AVX-512 (-march=native) a Vec16 is one GCC vector, one register.
// Elsewhere (AVX2) it is a pair of 8-float GCC vectors: GCC lowers a single 64-byte vector to
// register pairs badly, moving each value through the stack and general registers on every
// operation (attention ran 5-10x below memory speed on a Zen 3 EPYC); as a pair of native vectors
// every operation is two register instructions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace rayfoundry {

constexpr int64_t kLanes = 16;

// e^x to about 2 ulp over [-87, 88] (clamped outside): x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (error below 2e-7), 2^n put straight into the exponent bits. V is a
// GCC float vector, I the int32 vector of the same lanes.
template <class V, class I>
inline V exp_lanes(V x) {
  const V lowest = V{} - 87.0f, highest = V{} + 88.0f;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const V shifter = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504f + shifter) - shifter;
  const V r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts, exact products
  V p = r * (1.f / 720) + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V two_n;
  __builtin_memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

#if defined(__AVX512F__)

typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));
typedef Int16 Mask16;  // a comparison's result: -1 where true, 0 where false

inline Vec16 select(Mask16 m, Vec16 a, Vec16 b) { return m ? a : b; }
inline Vec16 exp16(Vec16 x) { return exp_lanes<Vec16, Int16>(x); }
inline Vec16 iota16() { return Vec16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

inline Vec16 load16(const float* p) {
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, Vec16 v) { __builtin_memcpy(p, &v, sizeof v); }

#else

typedef float Half __attribute__((vector_size(32)));
typedef int32_t HalfInt __attribute__((vector_size(32)));

struct Vec16 {
  Half lo, hi;
};
struct Mask16 {
  HalfInt lo, hi;
};

inline Vec16 operator+(Vec16 a, Vec16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline Vec16 operator-(Vec16 a, Vec16 b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline Vec16 operator*(Vec16 a, Vec16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline Vec16 operator/(Vec16 a, Vec16 b) { return {a.lo / b.lo, a.hi / b.hi}; }
inline Vec16 operator+(float s, Vec16 b) { return {s + b.lo, s + b.hi}; }
inline Vec16 operator+(Vec16 a, float s) { return {a.lo + s, a.hi + s}; }
inline Vec16 operator-(Vec16 a, float s) { return {a.lo - s, a.hi - s}; }
inline Vec16 operator*(float s, Vec16 b) { return {s * b.lo, s * b.hi}; }
inline Vec16 operator*(Vec16 a, float s) { return {a.lo * s, a.hi * s}; }
inline Vec16 operator-(Vec16 a) { return {-a.lo, -a.hi}; }
inline Vec16& operator+=(Vec16& a, Vec16 b) { return a = a + b; }
inline Mask16 operator<(Vec16 a, Vec16 b) { return {a.lo < b.lo, a.hi < b.hi}; }
inline Mask16 operator>(Vec16 a, Vec16 b) { return {a.lo > b.lo, a.hi > b.hi}; }
inline Mask16 operator>=(Vec16 a, Vec16 b) { return {a.lo >= b.lo, a.hi >= b.hi}; }
inline Mask16 operator==(Vec16 a, Vec16 b) { return {a.lo == b.lo, a.hi == b.hi}; }
inline Mask16 operator|(Mask16 a, Mask16 b) { return {a.lo | b.lo, a.hi | b.hi}; }

inline Vec16 select(Mask16 m, Vec16 a, Vec16 b) { return {m.lo ? a.lo : b.lo, m.hi ? a.hi : b.hi}; }
inline Vec16 exp16(Vec16 x) { return {exp_lanes<Half, HalfInt>(x.lo), exp_lanes<Half, HalfInt>(x.hi)}; }
inline Vec16 iota16() { return {Half{0, 1, 2, 3, 4, 5, 6, 7}, Half{8, 9, 10, 11, 12, 13, 14, 15}}; }

// Each half on its own: a memcpy of the whole pair went through the stack in 16-byte pieces.
typedef float UnalignedHalf __attribute__((vector_size(32), aligned(4), may_alias));

inline Vec16 load16(const float* p) {
  return {*reinterpret_cast<const UnalignedHalf*>(p), *reinterpret_cast<const UnalignedHalf*>(p + 8)};
}

inline void store16(float* p, Vec16 v) {
  *reinterpret_cast<UnalignedHalf*>(p) = v.lo;
  *reinterpret_cast<UnalignedHalf*>(p + 8) = v.hi;
}

#endif

inline Vec16 splat16(float x) { return Vec16{} + x; }
inline Vec16 max16(Vec16 a, Vec16 b) { return select(a > b, a, b); }

// The largest lane, NaN lanes skipped (-inf if all are NaN); the sum of the lanes.
inline float lane_max(Vec16 v) {
  float lanes[kLanes], best = -INFINITY;
  store16(lanes, v);
  for (float x : lanes) best = x > best ? x : best;
  return best;
}

inline float lane_sum(Vec16 v) {
  float lanes[kLanes], total = 0.f;
  store16(lanes, v);
  for (float x : lanes) total += x;
  return total;
}

}  // namespace rayfoundry
