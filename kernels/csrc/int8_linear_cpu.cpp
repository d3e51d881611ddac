// Weight-only int8 linear for decode-sized batches: y = x @ dequant(W)^T with W's int8 codes and
// one float scale per (output row, group of inputs). At a few rows of x the product is bound by
// reading W; reading a quarter of fp32's bytes and widening in registers is what makes it faster.
// A tile of 4 output rows x up to 4 rows of x keeps 16 independent accumulators in registers,
// so each widened code vector is used 4 times and the FMAs do not wait on each other.
// float32, CPU; AVX-512 where the compiler targets it, a portable loop elsewhere and for tails.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTileN = 4;  // output rows per tile
constexpr int64_t kTileM = 4;  // rows of x per tile

struct Problem {
  const float* x;
  int64_t x_stride;
  const int8_t* codes;
  const float* scales;
  float* y;
  int64_t rows, in, out, groups, group;
};

// One output element, any shape: the reference path for tails and non-AVX-512 builds.
float dot_scaled(const Problem& p, int64_t n, int64_t m) {
  float total = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int8_t* w = p.codes + n * p.in + g * p.group;
    const float* xm = p.x + m * p.x_stride + g * p.group;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < p.group; ++k) acc += xm[k] * static_cast<float>(w[k]);
    total += acc * p.scales[n * p.groups + g];
  }
  return total;
}

#if defined(__AVX512F__)
// Output rows n..n+3 for x rows m..m+MB-1, when the group length is a multiple of 16.
template <int MB>
void tile(const Problem& p, int64_t n, int64_t m) {
  float total[kTileN][MB] = {};
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 acc[kTileN][MB];
    for (int i = 0; i < kTileN; ++i)
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t base = g * p.group;
    for (int64_t k = base; k < base + p.group; k += 16) {
      __m512 xv[MB];
      for (int j = 0; j < MB; ++j) xv[j] = _mm512_loadu_ps(p.x + (m + j) * p.x_stride + k);
      for (int i = 0; i < kTileN; ++i) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.codes + (n + i) * p.in + k))));
        for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_fmadd_ps(xv[j], w, acc[i][j]);
      }
    }
    for (int i = 0; i < kTileN; ++i) {
      const float scale = p.scales[(n + i) * p.groups + g];
      for (int j = 0; j < MB; ++j) total[i][j] += _mm512_reduce_add_ps(acc[i][j]) * scale;
    }
  }
  for (int i = 0; i < kTileN; ++i)
    for (int j = 0; j < MB; ++j) p.y[(m + j) * p.out + n + i] = total[i][j];
}

void tile_any(const Problem& p, int64_t n, int64_t m, int64_t mb) {
  switch (mb) {
    case 1: return tile<1>(p, n, m);
    case 2: return tile<2>(p, n, m);
    case 3: return tile<3>(p, n, m);
    default: return tile<4>(p, n, m);
  }
}
#endif

void rows_range(const Problem& p, int64_t begin, int64_t end) {
  int64_t n = begin;
#if defined(__AVX512F__)
  if (p.group % 16 == 0) {
    for (; n + kTileN <= end; n += kTileN)
      for (int64_t m = 0; m < p.rows; m += kTileM) tile_any(p, n, m, std::min(kTileM, p.rows - m));
  }
#endif
  for (; n < end; ++n)
    for (int64_t m = 0; m < p.rows; ++m) p.y[m * p.out + n] = dot_scaled(p, n, m);
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "x must be float32 [rows, in] with contiguous rows");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.dim() == 2 && codes.is_contiguous(),
              "codes must be contiguous int8 [out, in]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.dim() == 2 && scales.is_contiguous(),
              "scales must be contiguous float32 [out, groups]");
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = scales.size(1);
  TORCH_CHECK(codes.size(1) == in && scales.size(0) == out && groups > 0 && in % groups == 0,
              "shapes: x [rows, in], codes [out, in], scales [out, groups dividing in]");
  auto y = torch::empty({rows, out}, x.options());
  const Problem p{x.data_ptr<float>(), x.stride(0), codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
                  y.data_ptr<float>(), rows, in, out, groups, in / groups};
  // Tiles of output rows per thread, aligned to the tile so only the last range has a tail.
  at::parallel_for(0, (out + kTileN - 1) / kTileN, 8, [&](int64_t begin, int64_t end) {
    rows_range(p, begin * kTileN, std::min(out, end * kTileN));
  });
  return y;
}
