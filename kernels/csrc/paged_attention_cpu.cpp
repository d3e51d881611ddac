// Attention over a paged KV cache on CPU for a ragged batch (decodes and prefill chunks together):
// each query token reads its sequence's keys and values straight from the cache blocks its block
// table lists (no gathered copy), up to the position it may see.
//
// Layout (kernels/paged_attention.py): k_cache [num_blocks, kv_heads, head_dim, block_size] (keys
// transposed within a block), v_cache [num_blocks, kv_heads, block_size, head_dim]. A block's
// scores for one query head are head_dim multiply-adds of block_size-wide vectors, and its values
// add into the head's output row by row: inner loops the compiler vectorizes without reductions.
// The query heads sharing a KV head are done together, so each cache block is read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec16.h"

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <vector>

namespace {

using namespace rayfoundry;

struct Shape {
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  int64_t group() const { return num_heads / num_kv_heads; }
  int64_t block_stride() const { return num_kv_heads * head_dim * block_size; }
  int64_t head_stride() const { return head_dim * block_size; }
};

// Blocks are scattered in memory, so the hardware prefetcher cannot see the next one coming.
inline void prefetch(const float* data, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(data + i);
}

// scores[h][t] = q[h] . key[t] for one block: `count` valid tokens of block_size.
inline void score_block(const float* q, const float* keys_t, int64_t group, int64_t dim, int64_t block_size,
                        int64_t count, float* scores, int64_t scores_stride) {
  for (int64_t h = 0; h < group; ++h) {
    float* out = scores + h * scores_stride;
    float acc[64] = {0.f};  // block_size <= 64 (checked by the caller)
    for (int64_t d = 0; d < dim; ++d) {
      const float qd = q[h * dim + d];
      const float* row = keys_t + d * block_size;
#pragma omp simd
      for (int64_t t = 0; t < block_size; ++t) acc[t] += qd * row[t];
    }
    std::copy(acc, acc + count, out);
  }
}

// out[h] += sum_t probs[h][t] * value[t] for one block.
inline void accumulate_block(const float* probs, int64_t probs_stride, const float* values, int64_t group,
                             int64_t dim, int64_t count, float* out) {
  for (int64_t h = 0; h < group; ++h) {
    const float* p = probs + h * probs_stride;
    float* o = out + h * dim;
    for (int64_t t = 0; t < count; ++t) {
      const float pt = p[t];
      const float* v = values + t * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] += pt * v[d];
    }
  }
}

void softmax_rows(float* scores, int64_t rows, int64_t len) {
  for (int64_t h = 0; h < rows; ++h) {
    float* p = scores + h * len;
    const float top = *std::max_element(p, p + len);
    float total = 0.f;
    for (int64_t t = 0; t < len; ++t) total += (p[t] = std::exp(p[t] - top));
    const float inv = 1.f / total;
    for (int64_t t = 0; t < len; ++t) p[t] *= inv;
  }
}

// One (sequence, KV head): its `group` query heads against cached positions [first, context_len).
void attend(const float* query, const float* k_cache, const float* v_cache, const int64_t* block_table,
            int64_t first, int64_t context_len, int64_t kv_head, const Shape& s, float scale, float* out) {
  const int64_t group = s.group(), dim = s.head_dim, bs = s.block_size;
  const int64_t first_block = first / bs, num_blocks = (context_len + bs - 1) / bs;
  const int64_t len = context_len - first_block * bs;  // scores kept from the first block's start
  thread_local std::vector<float> q, scores, acc;
  q.resize(group * dim);
  scores.resize(group * len);
  acc.assign(group * dim, 0.f);
  const float* query_heads = query + kv_head * group * dim;
  for (int64_t i = 0; i < group * dim; ++i) q[i] = query_heads[i] * scale;
  const int64_t head_offset = kv_head * s.head_stride();

  for (int64_t b = first_block; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(k_cache + block_table[b + 1] * s.block_stride() + head_offset, s.head_stride());
    const int64_t count = std::min(bs, context_len - b * bs);
    score_block(q.data(), k_cache + block_table[b] * s.block_stride() + head_offset, group, dim, bs, count,
                scores.data() + (b - first_block) * bs, len);
  }
  for (int64_t h = 0; h < group; ++h)  // before the window: no weight
    std::fill(scores.data() + h * len, scores.data() + h * len + (first - first_block * bs), -INFINITY);
  softmax_rows(scores.data(), group, len);
  for (int64_t b = first_block; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(v_cache + block_table[b + 1] * s.block_stride() + head_offset, s.head_stride());
    const int64_t count = std::min(bs, context_len - b * bs);
    accumulate_block(scores.data() + (b - first_block) * bs, len,
                     v_cache + block_table[b] * s.block_stride() + head_offset, group, dim, count, acc.data());
  }
  std::copy(acc.begin(), acc.end(), out + kv_head * group * dim);
}

// ---- The fast path: 16-token blocks and head_dim a multiple of 16, for a tile of query vectors:
// the query heads sharing one KV head, for one row (a decode) or a few consecutive rows of one
// sequence (a prefill chunk), so each key and value row is read from memory once for all of them.
// 16 floats are one vector (vec16.h). A block's keys are stored transposed, [dim][16]: its scores
// for NQ query vectors are NQ accumulators of dim multiply-adds, no reductions. kMaxQueries is how
// many such accumulators fit in registers beside a key row and a broadcast: 16 AVX2 registers hold
// 6 of them (two registers each), 32 AVX-512 registers 12; more would spill on every multiply-add.
#if defined(__AVX512F__)
constexpr int kMaxQueries = 12;
#else
constexpr int kMaxQueries = 6;
#endif

constexpr int64_t kKeysAhead = 2;  // blocks

struct QueryVec {
  const float* q;
  float* out;
  int64_t first, visible;  // the cached positions [first, visible) it attends to
};

// Scores of NQ query vectors q [NQ][dim] against the keys of P blocks ([dim][16] each): NQ * P
// independent sums, so the multiply-adds do not wait on each other's results.
template <int NQ, int P>
inline void score_blocks(const float* q, const float* const (&keys)[P], int64_t dim, Vec16 (&score)[P][NQ]) {
  Vec16 acc[P][NQ] = {};
  for (int64_t d = 0; d < dim; ++d)
    for (int p = 0; p < P; ++p) {
      const Vec16 k = load16(keys[p] + d * kLanes);
      for (int i = 0; i < NQ; ++i) acc[p][i] += q[i * dim + d] * k;
    }
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < NQ; ++i) score[p][i] = acc[p][i];
}

// acc[i][c..c + 16 C) += sum over rows t of one block's values of weights[i][t] * value[t][c..]: C
// column slices of 16 at once, NQ * C independent sums.
template <int NQ, int C>
inline void accumulate_values(const float* values, const float* weights, int64_t weights_stride, int64_t begin,
                              int64_t end, int64_t dim, int64_t c, float* acc) {
  Vec16 sum[C][NQ];
  for (int j = 0; j < C; ++j)
    for (int i = 0; i < NQ; ++i) sum[j][i] = load16(acc + i * dim + c + j * kLanes);
  for (int64_t t = begin; t < end; ++t)
    for (int j = 0; j < C; ++j) {
      const Vec16 v = load16(values + t * dim + c + j * kLanes);
      for (int i = 0; i < NQ; ++i) sum[j][i] += weights[i * weights_stride + t] * v;
    }
  for (int j = 0; j < C; ++j)
    for (int i = 0; i < NQ; ++i) store16(acc + i * dim + c + j * kLanes, sum[j][i]);
}

template <int NQ>
void attend_tile(const QueryVec* qs, const float* k_cache, const float* v_cache, const int64_t* block_table,
                 int64_t kv_head, const Shape& s, float scale) {
  // Few query vectors leave registers for two blocks (or column slices) at a time.
  constexpr int P = 2 * NQ <= kMaxQueries ? 2 : 1;
  const int64_t dim = s.head_dim, head_offset = kv_head * s.head_stride();
  int64_t lo = qs[0].first, hi = qs[0].visible;
  for (int i = 1; i < NQ; ++i) lo = std::min(lo, qs[i].first), hi = std::max(hi, qs[i].visible);
  const int64_t b0 = lo / kLanes, b1 = (hi + kLanes - 1) / kLanes, len = (b1 - b0) * kLanes;
  thread_local std::vector<float> scratch;
  scratch.resize(NQ * (dim + dim + len));
  float *q = scratch.data(), *acc = q + NQ * dim, *scores = acc + NQ * dim;
  for (int i = 0; i < NQ; ++i)
    for (int64_t d = 0; d < dim; ++d) q[i * dim + d] = qs[i].q[d] * scale;
  auto block = [&](const float* cache, int64_t b) { return cache + block_table[b] * s.block_stride() + head_offset; };

  // Scores; positions a query vector may not see get -inf. Blocks are scattered, so the
  // hardware cannot see the next one coming: keys are asked for kKeysAhead blocks ahead.
  auto keep = [&](int64_t b, Vec16* score) {
    const Vec16 position = iota16() + static_cast<float>(b * kLanes);
    for (int i = 0; i < NQ; ++i) {
      if (b * kLanes < qs[i].first || (b + 1) * kLanes > qs[i].visible) {
        const Mask16 outside = (position < splat16(qs[i].first)) | (position >= splat16(qs[i].visible));
        score[i] = select(outside, splat16(-INFINITY), score[i]);
      }
      store16(scores + i * len + (b - b0) * kLanes, score[i]);
    }
  };
  for (int64_t b = b0; b < std::min(b0 + kKeysAhead, b1); ++b) prefetch(block(k_cache, b), dim * kLanes);
  int64_t b = b0;
  for (; b + P <= b1; b += P) {
    const float* keys[P];
    for (int p = 0; p < P; ++p) {
      keys[p] = block(k_cache, b + p);
      if (b + p + kKeysAhead < b1) prefetch(block(k_cache, b + p + kKeysAhead), dim * kLanes);
    }
    Vec16 score[P][NQ];
    score_blocks<NQ, P>(q, keys, dim, score);
    for (int p = 0; p < P; ++p) keep(b + p, score[p]);
  }
  for (; b < b1; ++b) {
    const float* keys[1] = {block(k_cache, b)};
    Vec16 score[1][NQ];
    score_blocks<NQ, 1>(q, keys, dim, score);
    keep(b, score[0]);
  }
  // Softmax weights, unnormalized (the sum divides once at the end); -inf scores weigh 0.
  float inv_total[NQ];
  for (int i = 0; i < NQ; ++i) {
    float* p = scores + i * len;
    Vec16 top = load16(p);
    for (int64_t t = kLanes; t < len; t += kLanes) top = max16(top, load16(p + t));
    const float m = lane_max(top);
    Vec16 sum = {};
    for (int64_t t = 0; t < len; t += kLanes) {
      const Vec16 x = load16(p + t);
      const Vec16 w = select(x == splat16(-INFINITY), Vec16{}, exp16(x - m));  // exp16 clamps: -inf gives 1e-38
      store16(p + t, w);
      sum += w;
    }
    inv_total[i] = 1.f / lane_sum(sum);
  }
  // Values: out[i] = sum_t weight[i][t] * value[t]. A block's value rows are read once, a
  // column slice at a time, into NQ accumulators kept in this thread's scratch.
  std::fill(acc, acc + NQ * dim, 0.f);
  for (int64_t b = b0; b < b1; ++b) {
    const float* values = block(v_cache, b);
    if (b + 1 < b1) prefetch(block(v_cache, b + 1), dim * kLanes);
    const int64_t begin = std::max<int64_t>(0, lo - b * kLanes), end = std::min(kLanes, hi - b * kLanes);
    const float* weights = scores + (b - b0) * kLanes;
    int64_t c = 0;
    for (; c + P * kLanes <= dim; c += P * kLanes)
      accumulate_values<NQ, P>(values, weights, len, begin, end, dim, c, acc);
    for (; c < dim; c += kLanes) accumulate_values<NQ, 1>(values, weights, len, begin, end, dim, c, acc);
  }
  for (int i = 0; i < NQ; ++i)
    for (int64_t d = 0; d < dim; d += kLanes) store16(qs[i].out + d, load16(acc + i * dim + d) * inv_total[i]);
}

using TileFn = void (*)(const QueryVec*, const float*, const float*, const int64_t*, int64_t, const Shape&, float);

template <int... N>
constexpr std::array<TileFn, sizeof...(N)> tile_kernels(std::integer_sequence<int, N...>) {
  return {attend_tile<N + 1>...};
}
constexpr auto kTileKernels = tile_kernels(std::make_integer_sequence<int, kMaxQueries>{});

bool has_fast_path(const Shape& s) { return s.block_size == kLanes && s.head_dim % kLanes == 0; }

// A unit of work: `rows` consecutive query rows of one sequence, query heads [head, head + heads)
// of one KV head's group.
struct Item {
  int64_t row, rows, kv_head, head, heads;
};

// Tiles of query vectors that fill the registers (kMaxQueries) where the shape allows, else one
// row and one KV head's group at a time.
std::vector<Item> work_items(const int64_t* seqs, int64_t num_rows, const Shape& s) {
  const int64_t group = s.group();
  const bool fast = has_fast_path(s);
  const int64_t heads = fast ? std::min<int64_t>(group, kMaxQueries) : group;
  const int64_t tile_rows = fast ? std::max<int64_t>(1, kMaxQueries / group) : 1;
  std::vector<Item> items;
  for (int64_t row = 0; row < num_rows;) {
    int64_t rows = 1;
    while (rows < tile_rows && row + rows < num_rows && seqs[row + rows] == seqs[row]) ++rows;
    for (int64_t g = 0; g < s.num_kv_heads; ++g)
      for (int64_t h = 0; h < group; h += heads) items.push_back({row, rows, g, h, std::min(heads, group - h)});
    row += rows;
  }
  return items;
}

}  // namespace

// Store new keys and values [T, Hkv, D] (rows may be strided, e.g. views into a fused qkv output)
// at flat cache slots (block * block_size + offset), keys transposed within their block.
void write_kv_cache(torch::Tensor key, torch::Tensor value, torch::Tensor k_cache, torch::Tensor v_cache,
                    torch::Tensor slot_mapping) {
  TORCH_CHECK(key.scalar_type() == torch::kFloat32 && value.scalar_type() == torch::kFloat32 &&
              k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "write_kv_cache (cpu) takes float32");
  TORCH_CHECK(key.dim() == 3 && key.stride(2) == 1 && value.dim() == 3 && value.stride(2) == 1,
              "keys and values must be [tokens, kv_heads, head_dim] with contiguous heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.numel() == key.size(0),
              "slot_mapping must be int64, one slot per token");
  const int64_t tokens = key.size(0), heads = key.size(1), dim = key.size(2), block_size = v_cache.size(2);
  TORCH_CHECK(k_cache.size(1) == heads && k_cache.size(2) == dim && v_cache.size(3) == dim,
              "keys and KV cache shapes disagree");
  slot_mapping = slot_mapping.contiguous();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float *ks = key.data_ptr<float>(), *vs = value.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const int64_t head_stride = dim * block_size, block_stride = heads * head_stride;
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
      for (int64_t h = 0; h < heads; ++h) {
        const float* k = ks + t * key.stride(0) + h * key.stride(1);
        const float* v = vs + t * value.stride(0) + h * value.stride(1);
        float* k_out = kc + block * block_stride + h * head_stride + offset;
        for (int64_t d = 0; d < dim; ++d) k_out[d * block_size] = k[d];
        std::copy(v, v + dim, vc + block * block_stride + h * head_stride + offset * dim);
      }
    }
  });
}

void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);  // norm_rotary_cpu.cpp

// The attention block's step between its qkv projection and attention, in one call: rotary
// embedding on the query and key parts of qkv [T, (Hq + 2 Hkv) * D] (in place), the keys and values
// into their cache slots. Returns the rotated queries, a [T, Hq, D] view into qkv.
torch::Tensor rotary_and_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slot_mapping, int64_t num_heads) {
  const int64_t tokens = qkv.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (num_heads + 2 * kv_heads) * dim,
              "qkv must be [tokens, (heads + 2 kv_heads) * head_dim] with contiguous rows");
  auto q = qkv.narrow(1, 0, num_heads * dim).view({tokens, num_heads, dim});
  auto k = qkv.narrow(1, num_heads * dim, kv_heads * dim).view({tokens, kv_heads, dim});
  auto v = qkv.narrow(1, (num_heads + kv_heads) * dim, kv_heads * dim).view({tokens, kv_heads, dim});
  rotary_(q, cos, sin);
  rotary_(k, cos, sin);
  write_kv_cache(k, v, k_cache, v_cache, slot_mapping);
  return q;
}

// A ragged batch, one query token per row: query [T, Hq, D]; row t belongs to sequence token_seq[t]
// (its block table: a row of block_tables [B, W]) and attends to that sequence's first
// token_visible[t] cached tokens (a decode: its whole context; a prefill token: itself and what
// precedes it), or with a sliding window > 0 only the last `window` of those. k_cache [num_blocks,
// Hkv, D, block_size]; v_cache [num_blocks, Hkv, block_size, D]; indices int64. Returns [T, Hq, D].
torch::Tensor paged_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor token_seq, torch::Tensor token_visible,
                              double scale, int64_t window) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32, "paged_attention (cpu) takes float32, got ",
              query.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "the KV cache must be float32");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && token_seq.scalar_type() == torch::kInt64 &&
              token_visible.scalar_type() == torch::kInt64, "block_tables, token_seq and token_visible must be int64");
  query = query.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  block_tables = block_tables.contiguous();
  token_seq = token_seq.contiguous();
  token_visible = token_visible.contiguous();
  const Shape s{query.size(1), k_cache.size(1), query.size(2), k_cache.size(3), block_tables.size(1)};
  TORCH_CHECK(s.num_heads % s.num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.size(2) == s.head_dim && v_cache.size(3) == s.head_dim && v_cache.size(2) == s.block_size,
              "query and KV cache shapes disagree");
  TORCH_CHECK(s.block_size <= 64, "block_size must be at most 64, got ", s.block_size);
  TORCH_CHECK(token_seq.numel() == query.size(0) && token_visible.numel() == query.size(0),
              "token_seq and token_visible need one entry per query row");
  auto out = torch::empty_like(query);
  const float *q = query.data_ptr<float>(), *k = k_cache.data_ptr<float>(), *v = v_cache.data_ptr<float>();
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *seqs = token_seq.data_ptr<int64_t>();
  const int64_t* visible = token_visible.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t row_stride = s.num_heads * s.head_dim;
  const std::vector<Item> items = work_items(seqs, query.size(0), s);
  const bool fast = has_fast_path(s);
  auto run = [&](const Item& item) {
    const int64_t* table = tables + seqs[item.row] * s.max_blocks;
    QueryVec qs[kMaxQueries];
    int n = 0;
    for (int64_t r = item.row; r < item.row + item.rows; ++r) {
      const int64_t first = window > 0 ? std::max<int64_t>(0, visible[r] - window) : 0;
      if (!fast) {
        attend(q + r * row_stride, k, v, table, first, visible[r], item.kv_head, s, static_cast<float>(scale),
               o + r * row_stride);
        continue;
      }
      for (int64_t h = item.head; h < item.head + item.heads; ++h) {
        const int64_t offset = r * row_stride + (item.kv_head * s.group() + h) * s.head_dim;
        qs[n++] = {q + offset, o + offset, first, visible[r]};
      }
    }
    if (n) kTileKernels[n - 1](qs, k, v, table, item.kv_head, s, static_cast<float>(scale));
  };
  // Items are dealt out in turn, not in halves: a prefill chunk's later tokens see more context,
  // so contiguous ranges would leave one thread with most of the work.
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t i = worker; i < num_items; i += workers) run(items[i]);
  });
  return out;
}
