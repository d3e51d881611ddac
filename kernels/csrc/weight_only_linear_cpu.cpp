// Linears for decode-sized batches, y = x @ W^T with W as int8 codes or as signed int4 codes two
// per byte (low nibble first, kernels/quant.py:pack_int4), both with one float scale per (output
// row, group of inputs). At a few rows of x the product is bound by reading W: reading a quarter
// (int8) or an eighth (int4) of fp32's bytes and widening codes in registers is what makes them
// faster than float32. A tile of 4 output rows x up to 4 rows of x keeps 16 independent
// accumulators in registers: each weight vector is used up to 4 times and the FMAs do not wait on
// each other. float32, CPU; AVX-512 where the compiler targets it, a portable loop elsewhere and
// for tails.
//
// Int4 has a path of its own (whole groups of 32 codes): widening interleaved nibbles back into
// input order cost more instructions than the multiply-adds they fed (int4 ran at half int8's
// speed). Instead x is split once per call into its even and odd inputs, so a byte's low nibbles
// meet the even inputs and its high nibbles the odd ones, in the order they are stored. A nibble
// holds its code in two's complement; flipping its top bit makes it u = code + 8 in [0, 16), widened
// unsigned, and the offset is applied once per group through the group's sum of x:
// sum x (u - 8) = sum x u - 8 sum x.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTileN = 4;  // output rows per tile
constexpr int64_t kTileM = 4;  // rows of x per tile
constexpr int64_t kAhead = 2 * kTileN;  // codes prefetched this many output rows ahead

// Each format says how many of its storage units hold k codes (`units`), and how often to prefetch.
struct Int8Codes {
  using Byte = int8_t;
  static constexpr int64_t kPrefetchEvery = 64;  // codes: one cache line
  static int64_t units(int64_t codes) { return codes; }
  static float code(const Byte* row, int64_t k) { return static_cast<float>(row[k]); }
#if defined(__AVX512F__)
  static __m512 widen16(const Byte* row, int64_t k) {  // codes k..k+15 as floats
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
  }
#endif
};

struct Int4Codes {
  using Byte = uint8_t;
  static constexpr int64_t kPrefetchEvery = 64;  // codes: half a line, as measured for int8
  static int64_t units(int64_t codes) { return codes / 2; }
  static float code(const Byte* row, int64_t k) {
    const int nibble = (k & 1) ? (row[k >> 1] >> 4) : (row[k >> 1] & 0xF);
    return static_cast<float>(nibble >= 8 ? nibble - 16 : nibble);
  }
#if defined(__AVX512F__)
  static __m512 widen16(const Byte* row, int64_t k) {  // 8 bytes -> codes k..k+15 in input order
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
    const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const __m128i nibbles = _mm_unpacklo_epi8(_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16(raw, 4), mask));
    const __m128i codes = _mm_sub_epi8(_mm_xor_si128(nibbles, eight), eight);  // [0, 16) -> [-8, 8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
  }
#endif
};

template <class Codes>
struct Problem {
  const float* x;
  int64_t x_stride;
  const typename Codes::Byte* codes;
  const float* scales;  // [out, groups]
  float* y;
  int64_t rows, in, out, groups, group;

  const typename Codes::Byte* row(int64_t n) const { return codes + n * Codes::units(in); }
  float scale(int64_t n, int64_t g) const { return scales[n * groups + g]; }
};

// One output element, any shape: the path for tails and builds without AVX-512.
template <class Codes>
float dot_scaled(const Problem<Codes>& p, int64_t n, int64_t m) {
  const auto* w = p.row(n);
  const float* xm = p.x + m * p.x_stride;
  float total = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {
    float acc = 0.f;
    for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) acc += xm[k] * Codes::code(w, k);
    total += acc * p.scale(n, g);
  }
  return total;
}

#if defined(__AVX512F__)
// Output rows n..n+3 for x rows m..m+MB-1; the group length is a multiple of 16. With groups,
// widened codes are scaled in registers so the accumulators run across groups; with one scale
// per row (kPerRow) the scale waits until the single reduction at the end.
template <class Codes, int MB, bool kPerRow>
void tile(const Problem<Codes>& p, int64_t n, int64_t m) {
  __m512 acc[kTileN][MB];
  for (int i = 0; i < kTileN; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 scale[kTileN];
    for (int i = 0; i < kTileN; ++i) scale[i] = _mm512_set1_ps(p.scale(n + i, g));
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 16) {
      // Later tiles' rows follow these in memory: ask for them now, a line per row every
      // kPrefetchEvery codes, so the stream keeps arriving while this tile computes (1.5x at 1 row).
      if (k % Codes::kPrefetchEvery == 0 && n + kAhead + kTileN <= p.out)
        for (int i = 0; i < kTileN; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(p.row(n + kAhead + i) + Codes::units(k)), _MM_HINT_T0);
      __m512 xv[MB];
      for (int j = 0; j < MB; ++j) xv[j] = _mm512_loadu_ps(p.x + (m + j) * p.x_stride + k);
      for (int i = 0; i < kTileN; ++i) {
        __m512 w = Codes::widen16(p.row(n + i), k);
        if constexpr (!kPerRow) w = _mm512_mul_ps(w, scale[i]);
        for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_fmadd_ps(xv[j], w, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < kTileN; ++i) {
    const float scale = kPerRow ? p.scale(n + i, 0) : 1.f;
    for (int j = 0; j < MB; ++j) p.y[(m + j) * p.out + n + i] = _mm512_reduce_add_ps(acc[i][j]) * scale;
  }
}

template <class Codes, bool kPerRow>
void tile_rows(const Problem<Codes>& p, int64_t n, int64_t m, int64_t mb) {
  switch (mb) {
    case 1: return tile<Codes, 1, kPerRow>(p, n, m);
    case 2: return tile<Codes, 2, kPerRow>(p, n, m);
    case 3: return tile<Codes, 3, kPerRow>(p, n, m);
    default: return tile<Codes, 4, kPerRow>(p, n, m);
  }
}

template <class Codes>
void tile_rows(const Problem<Codes>& p, int64_t n, int64_t m, int64_t mb) {
  if (p.groups == 1) return tile_rows<Codes, true>(p, n, m, mb);
  tile_rows<Codes, false>(p, n, m, mb);
}
#endif

#if defined(__AVX512F__)
// x as the int4 path reads it: per row of x, its even inputs, its odd inputs, and its sum over
// each group.
struct SplitX {
  std::vector<float> even, odd, sums;
  int64_t half, groups;

  SplitX(const Problem<Int4Codes>& p) : even(p.rows * p.in / 2), odd(p.rows * p.in / 2),
                                        sums(p.rows * p.groups), half(p.in / 2), groups(p.groups) {
    for (int64_t m = 0; m < p.rows; ++m) {
      const float* xm = p.x + m * p.x_stride;
      for (int64_t i = 0; i < half; ++i) {
        even[m * half + i] = xm[2 * i];
        odd[m * half + i] = xm[2 * i + 1];
      }
      for (int64_t g = 0; g < groups; ++g) {
        float total = 0.f;
        for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) total += xm[k];
        sums[m * groups + g] = total;
      }
    }
  }
};

// Output rows n..n+3 for x rows m..m+MB-1, whole groups of 32 codes (16 bytes) at a time. Each
// group's products gather in `part`, scaled once as the group ends.
template <int MB>
void int4_tile(const Problem<Int4Codes>& p, const SplitX& x, int64_t n, int64_t m) {
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x88));
  const __m512i low = _mm512_set1_epi32(0x0F);
  __m512 acc[kTileN][MB];
  float offset[kTileN][MB] = {};
  for (int i = 0; i < kTileN; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t bytes = p.group / 2;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 part[kTileN][MB];
    for (int i = 0; i < kTileN; ++i)
      for (int j = 0; j < MB; ++j) part[i][j] = _mm512_setzero_ps();
    for (int64_t b = g * bytes; b < (g + 1) * bytes; b += 16) {
      if (b % 32 == 0 && n + kAhead + kTileN <= p.out)  // as in tile(): the next tiles' rows, early
        for (int i = 0; i < kTileN; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(p.row(n + kAhead + i) + b), _MM_HINT_T0);
      __m512 even[MB], odd[MB];
      for (int j = 0; j < MB; ++j) {
        even[j] = _mm512_loadu_ps(x.even.data() + (m + j) * x.half + b);
        odd[j] = _mm512_loadu_ps(x.odd.data() + (m + j) * x.half + b);
      }
      for (int i = 0; i < kTileN; ++i) {
        // 16 bytes widened once to 16 lanes, each lane's two nibbles then split in place.
        const __m512i bytes16 = _mm512_cvtepu8_epi32(
            _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.row(n + i) + b)), flip));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes16, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes16, 4));
        for (int j = 0; j < MB; ++j) part[i][j] = _mm512_fmadd_ps(odd[j], hi, _mm512_fmadd_ps(even[j], lo, part[i][j]));
      }
    }
    for (int i = 0; i < kTileN; ++i) {
      const float scale = p.scale(n + i, g);
      for (int j = 0; j < MB; ++j) {
        acc[i][j] = _mm512_fmadd_ps(part[i][j], _mm512_set1_ps(scale), acc[i][j]);
        offset[i][j] += scale * x.sums[(m + j) * x.groups + g];
      }
    }
  }
  for (int i = 0; i < kTileN; ++i)
    for (int j = 0; j < MB; ++j) p.y[(m + j) * p.out + n + i] = _mm512_reduce_add_ps(acc[i][j]) - 8.f * offset[i][j];
}

constexpr int64_t kInt4TileM = 2;  // rows of x per int4 tile: its partial sums double the registers

bool int4_path(const Problem<Int4Codes>& p) { return p.group % 32 == 0; }

void int4_rows(const Problem<Int4Codes>& p, const SplitX& x, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + kTileN <= end; n += kTileN)
    for (int64_t m = 0; m < p.rows; m += kInt4TileM) {
      if (p.rows - m >= 2) int4_tile<2>(p, x, n, m);
      else int4_tile<1>(p, x, n, m);
    }
  for (; n < end; ++n)
    for (int64_t m = 0; m < p.rows; ++m) p.y[m * p.out + n] = dot_scaled(p, n, m);
}
#endif

template <class Codes>
void output_rows(const Problem<Codes>& p, int64_t begin, int64_t end) {
  int64_t n = begin;
#if defined(__AVX512F__)
  if (p.group % 16 == 0) {
    for (; n + kTileN <= end; n += kTileN)
      for (int64_t m = 0; m < p.rows; m += kTileM) tile_rows(p, n, m, std::min(kTileM, p.rows - m));
  }
#endif
  for (; n < end; ++n)
    for (int64_t m = 0; m < p.rows; ++m) p.y[m * p.out + n] = dot_scaled(p, n, m);
}

template <class Codes>
torch::Tensor run(const Problem<Codes>& p, torch::Tensor y) {
  // Whole tiles of output rows per thread, so only the last range has a tail.
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Codes, Int4Codes>) {
    if (int4_path(p)) {
      const SplitX x(p);
      at::parallel_for(0, (p.out + kTileN - 1) / kTileN, 8, [&](int64_t begin, int64_t end) {
        int4_rows(p, x, begin * kTileN, std::min(p.out, end * kTileN));
      });
      return y;
    }
  }
#endif
  at::parallel_for(0, (p.out + kTileN - 1) / kTileN, 8, [&](int64_t begin, int64_t end) {
    output_rows(p, begin * kTileN, std::min(p.out, end * kTileN));
  });
  return y;
}

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "x must be float32 [rows, in] with contiguous rows");
}

template <class Codes>
torch::Tensor weight_only_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales) {
  check_x(x);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.dim() == 2 && scales.is_contiguous(),
              "scales must be contiguous float32 [out, groups]");
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = scales.size(1);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.size(1) == Codes::units(in),
              "codes must be contiguous [out, bytes per row of ", in, " inputs]");
  TORCH_CHECK(scales.size(0) == out && groups > 0 && in % groups == 0 && (in / groups) % 2 == 0,
              "scales must be [out, groups] with groups of an even length dividing ", in);
  auto y = torch::empty({rows, out}, x.options());
  const Problem<Codes> p{x.data_ptr<float>(), x.stride(0), static_cast<const typename Codes::Byte*>(codes.data_ptr()),
                         scales.data_ptr<float>(), y.data_ptr<float>(), rows, in, out, groups, in / groups};
  return run(p, y);
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(codes.scalar_type() == torch::kInt8, "codes must be int8");
  return weight_only_linear<Int8Codes>(x, codes, scales);
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8, "packed int4 codes must be uint8");
  return weight_only_linear<Int4Codes>(x, packed, scales);
}
