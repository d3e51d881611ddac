// y = x @ W^T (+ bias) in float32 on CPU, with W packed once into panels of 16 output features:
// panels[p][k][j] = W[16 p + j][k], zero rows padding the last panel. A panel's row k is one
// 64-byte line, so a panel streams from memory front to back, and a tile of rows of x against one
// panel keeps its sums in registers for the whole of k: each weight line loaded is used by every
// row of the tile, each x value broadcast once per panel.
//
// Why not oneDNN's or MKL's GEMM: in a decode step each layer's weights come from DRAM (the model
// does not fit in cache), and at 8-64 rows their GEMMs stall on those reads (oneDNN reached 88
// GFLOP/s at 32 rows on a 2-core Zen 3 with cold weights, 150 with the same weights in cache).
// Here each thread prefetches the panel after the one it is computing, spread over the work of
// the current one, so the next weights arrive while the current ones are used.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <vector>
#include <utility>

#include "vec16.h"

namespace rayfoundry {
namespace {

// Rows of x per tile: their sums, a weight line and a broadcast fill the vector registers
// (AVX2: 6 x 2 + 2 + 1 of 16; AVX-512: 12 + 1 + 1 of 32, leaving room for the loads in flight).
#if defined(__AVX512F__)
constexpr int kTileRows = 12;
#else
constexpr int kTileRows = 6;
#endif
constexpr int64_t kUnroll = 4;  // k steps per prefetch decision; K must be a multiple of 16 anyway
constexpr int64_t kBlockBytes = 256 * 1024;  // of x per row block: within L2 beside the panel being used
constexpr int64_t kUnpackedRows = 48;  // up to this many rows (decode) x is read where it lies

// Lines of the next panel asked for ahead of use, a few per kUnroll k steps, so that over one
// panel's tiles the whole next panel is requested (and never more than one panel ahead).
struct Prefetcher {
  const float* cursor;
  const float* limit;
  int64_t lines_per_step;

  void start_panel(const float* next_panel, const float* next_end) {
    cursor = std::max(cursor, next_panel);
    limit = next_end;
  }
  void step() {
    for (int64_t i = 0; i < lines_per_step && cursor < limit; ++i, cursor += kLanes) __builtin_prefetch(cursor);
  }
};

struct Gemm {
  const float* x;
  int64_t x_stride, rows, in;
  const float* panels;
  const float* bias;  // null: none
  float* y;
  int64_t out;

  const float* panel(int64_t p) const { return panels + p * in * kLanes; }
};

// Rows m..m+MB of y's panel p. `x` is where the tile's rows of x start: rows of the input as given
// (kPacked false), or those rows packed input-major, x[k * MB + i] (kPacked true), one stream.
template <int MB, bool kPacked>
void tile(const Gemm& g, const float* x, int64_t p, int64_t m, Prefetcher& prefetcher) {
  const int64_t n = p * kLanes, columns = std::min(kLanes, g.out - n);
  float first[kLanes] = {};
  if (g.bias) std::copy(g.bias + n, g.bias + n + columns, first);
  Vec16 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = load16(first);
  const float* w = g.panel(p);
  for (int64_t k = 0; k < g.in; k += kUnroll) {
    prefetcher.step();
    for (int64_t u = k; u < k + kUnroll; ++u) {
      const Vec16 line = load16(w + u * kLanes);
      for (int i = 0; i < MB; ++i) acc[i] += (kPacked ? x[u * MB + i] : x[i * g.x_stride + u]) * line;
    }
  }
  float* y = g.y + m * g.out + n;
  if (columns == kLanes) {
    for (int i = 0; i < MB; ++i) store16(y + i * g.out, acc[i]);
    return;
  }
  for (int i = 0; i < MB; ++i) {
    float sums[kLanes];
    store16(sums, acc[i]);
    std::copy(sums, sums + columns, y + i * g.out);
  }
}

using TileFn = void (*)(const Gemm&, const float*, int64_t, int64_t, Prefetcher&);

template <bool kPacked, int... N>
constexpr std::array<TileFn, sizeof...(N)> tiles(std::integer_sequence<int, N...>) {
  return {tile<N + 1, kPacked>...};
}
constexpr auto kRowTiles = tiles<false>(std::make_integer_sequence<int, kTileRows>{});
constexpr auto kPackedTiles = tiles<true>(std::make_integer_sequence<int, kTileRows>{});

// Tiles of equal height (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2): a short tile costs nearly as
// much as a full one.
std::vector<int64_t> tile_heights(int64_t rows) {
  const int64_t count = (rows + kTileRows - 1) / kTileRows, base = rows / count, taller = rows % count;
  std::vector<int64_t> heights(count, base);
  for (int64_t t = 0; t < taller; ++t) ++heights[t];
  return heights;
}

// Each tile's rows of x packed input-major, tile after tile: the many tiles of a prefill then
// each read one stream of x instead of up to kTileRows of them (measured 1.1-1.2x at 128-2,048 rows).
const float* pack_rows(const Gemm& g, int64_t row_begin, const std::vector<int64_t>& heights) {
  thread_local std::vector<float> packed;
  packed.resize(std::accumulate(heights.begin(), heights.end(), int64_t{0}) * g.in);
  float* out = packed.data();
  for (int64_t height : heights) {
    for (int64_t k = 0; k < g.in; ++k)
      for (int64_t i = 0; i < height; ++i) *out++ = g.x[(row_begin + i) * g.x_stride + k];
    row_begin += height;
  }
  return packed.data();
}

// Panels [begin, end) for rows [row_begin, row_end).
void panels_range(const Gemm& g, int64_t begin, int64_t end, int64_t row_begin, int64_t row_end) {
  const std::vector<int64_t> heights = tile_heights(row_end - row_begin);
  const int64_t num_tiles = static_cast<int64_t>(heights.size());
  const bool packed = row_end - row_begin > kUnpackedRows;
  const float* x = packed ? pack_rows(g, row_begin, heights) : nullptr;
  // A panel's K lines spread over its num_tiles * K / kUnroll prefetch steps.
  Prefetcher prefetcher{g.panel(begin + 1), g.panel(begin + 1), (kUnroll + num_tiles - 1) / num_tiles};
  for (int64_t p = begin; p < end; ++p) {
    if (p + 1 < end) prefetcher.start_panel(g.panel(p + 1), g.panel(p + 2));
    for (int64_t t = 0, m = row_begin, offset = 0; t < num_tiles; ++t) {
      const int64_t height = heights[t];
      if (packed)
        kPackedTiles[height - 1](g, x + offset, p, m, prefetcher);
      else
        kRowTiles[height - 1](g, g.x + m * g.x_stride, p, m, prefetcher);
      m += height;
      offset += height * g.in;
    }
  }
}

// Many rows (a prefill) go in blocks whose x stays in L2 while the thread's panels pass by.
void panels_range(const Gemm& g, int64_t begin, int64_t end) {
  const int64_t block = std::max<int64_t>(16 * kTileRows, (kBlockBytes / (g.in * 4)) / kTileRows * kTileRows);
  for (int64_t m = 0; m < g.rows; m += block) panels_range(g, begin, end, m, std::min(g.rows, m + block));
}

}  // namespace
}  // namespace rayfoundry

using namespace rayfoundry;

// weight [out, in] -> panels [ceil(out / 16), in, 16]
torch::Tensor pack_float32_panels(torch::Tensor weight) {
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.dim() == 2, "weight must be float32 [out, in]");
  const int64_t out = weight.size(0), in = weight.size(1), num_panels = (out + kLanes - 1) / kLanes;
  TORCH_CHECK(in % kLanes == 0, "the panel GEMM takes in_features a multiple of 16, got ", in);
  auto padded = torch::zeros({num_panels * kLanes, in}, weight.options());
  padded.narrow(0, 0, out).copy_(weight);
  return padded.view({num_panels, kLanes, in}).transpose(1, 2).contiguous();
}

// x [rows, in] (rows contiguous) @ W^T + bias -> [rows, out]; `panels` from pack_float32_panels(W)
torch::Tensor float32_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t out,
                                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "x must be float32 [rows, in] with contiguous rows");
  TORCH_CHECK(panels.scalar_type() == torch::kFloat32 && panels.dim() == 3 && panels.is_contiguous() &&
                  panels.size(1) == x.size(1) && panels.size(2) == kLanes && panels.size(0) * kLanes >= out &&
                  (panels.size(0) - 1) * kLanes < out,
              "panels must come from pack_float32_panels of an [", out, ", ", x.size(1), "] weight");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == out,
                "bias must be contiguous float32 [", out, "]");
    bias_data = bias->data_ptr<float>();
  }
  auto y = torch::empty({x.size(0), out}, x.options());
  if (x.size(0) == 0) return y;
  const Gemm g{x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), panels.data_ptr<float>(), bias_data,
               y.data_ptr<float>(), out};
  // Contiguous ranges of panels per thread: each streams its share of the weight front to back.
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) { panels_range(g, begin, end); });
  return y;
}
