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

// ---- The fast path: 16-token blocks, head_dim 64, 128 or 256, up to 8 query heads per KV head.
// 16 floats are one vector (vec16.h). With the group size G and head_dim / 16 (C) known at compile time, a block's G score vectors and the
// G x C output accumulators stay in registers: each key row and value row is loaded once and
// used G times, and no accumulator goes back to memory until the sequence is done.
template <int G, int C>
void attend16(const float* query, const float* k_cache, const float* v_cache, const int64_t* block_table,
              int64_t first, int64_t context_len, int64_t kv_head, const Shape& s, float scale, float* out) {
  constexpr int64_t dim = C * kLanes;
  const int64_t first_block = first / kLanes, num_blocks = (context_len + kLanes - 1) / kLanes;
  const int64_t head_offset = kv_head * s.head_stride();
  const int64_t row = (num_blocks - first_block) * kLanes;  // scores kept from the first block's start
  thread_local std::vector<float> score_rows;
  score_rows.resize(G * row);
  float* scores = score_rows.data();
  float q[G][dim];
  const float* query_heads = query + kv_head * G * dim;
  for (int h = 0; h < G; ++h)
    for (int64_t d = 0; d < dim; ++d) q[h][d] = query_heads[h * dim + d] * scale;
  // Position p of block b is lane p - 16 b; lanes outside [first, context_len) take no weight.
  auto outside = [&](int64_t b, int64_t t) { return b * kLanes + t < first || b * kLanes + t >= context_len; };

  // Scores: a block's keys are stored transposed, [dim][16], so row d holds feature d of 16 tokens.
  Vec16 top[G];
  for (int h = 0; h < G; ++h) top[h] = Vec16{} - INFINITY;
  for (int64_t b = first_block; b < num_blocks; ++b) {
    const float* keys = k_cache + block_table[b] * s.block_stride() + head_offset;
    if (b + 1 < num_blocks) prefetch(k_cache + block_table[b + 1] * s.block_stride() + head_offset, dim * kLanes);
    // Two partial sums per head (even and odd features): twice the independent FMA chains.
    Vec16 even[G] = {}, odd[G] = {};
    for (int64_t d = 0; d < dim; d += 2) {
      const Vec16 k0 = load16(keys + d * kLanes), k1 = load16(keys + (d + 1) * kLanes);
      for (int h = 0; h < G; ++h) {
        even[h] += q[h][d] * k0;
        odd[h] += q[h][d + 1] * k1;
      }
    }
    Vec16 score[G];
    for (int h = 0; h < G; ++h) score[h] = even[h] + odd[h];
    if (b == first_block || b == num_blocks - 1)
      for (int64_t t = 0; t < kLanes; ++t)
        if (outside(b, t))
          for (int h = 0; h < G; ++h) score[h][t] = -INFINITY;
    for (int h = 0; h < G; ++h) {
      store16(scores + h * row + (b - first_block) * kLanes, score[h]);
      top[h] = top[h] > score[h] ? top[h] : score[h];
    }
  }
  // Softmax weights, unnormalized (the sum divides once at the end).
  float total[G];
  for (int h = 0; h < G; ++h) {
    const float m = max16(top[h]);
    Vec16 sum = {};
    for (int64_t b = first_block; b < num_blocks; ++b) {
      float* p = scores + h * row + (b - first_block) * kLanes;
      Vec16 w = exp16(load16(p) - m);
      if (b == first_block || b == num_blocks - 1)
        for (int64_t t = 0; t < kLanes; ++t)
          if (outside(b, t)) w[t] = 0.f;
      store16(p, w);
      sum += w;
    }
    total[h] = sum16(sum);
  }
  // Values: out[h] = sum_t weight[h][t] * value[t], a block's values row by row.
  Vec16 acc[G][C] = {};
  for (int64_t b = first_block; b < num_blocks; ++b) {
    const float* values = v_cache + block_table[b] * s.block_stride() + head_offset;
    if (b + 1 < num_blocks) prefetch(v_cache + block_table[b + 1] * s.block_stride() + head_offset, dim * kLanes);
    const int64_t begin = std::max<int64_t>(0, first - b * kLanes);
    const int64_t count = std::min(kLanes, context_len - b * kLanes);
    const float* weights = scores + (b - first_block) * kLanes;
    for (int64_t t = begin; t < count; ++t) {
      const float* v = values + t * dim;
      for (int c = 0; c < C; ++c) {
        const Vec16 value = load16(v + c * kLanes);
        for (int h = 0; h < G; ++h) acc[h][c] += weights[h * row + t] * value;
      }
    }
  }
  float* out_heads = out + kv_head * G * dim;
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) store16(out_heads + h * dim + c * kLanes, acc[h][c] * (1.f / total[h]));
}

using AttendFn = void (*)(const float*, const float*, const float*, const int64_t*, int64_t, int64_t, int64_t,
                          const Shape&, float, float*);

template <int C>
AttendFn fast_for_group(int64_t group) {
  switch (group) {
    case 1: return attend16<1, C>;
    case 2: return attend16<2, C>;
    case 3: return attend16<3, C>;
    case 4: return attend16<4, C>;
    case 5: return attend16<5, C>;
    case 6: return attend16<6, C>;
    case 7: return attend16<7, C>;
    case 8: return attend16<8, C>;
    default: return nullptr;
  }
}

// The specialized kernel for this shape, or the general one.
AttendFn choose_attend(const Shape& s) {
  AttendFn fast = nullptr;
  if (s.block_size == kLanes) {
    if (s.head_dim == 64) fast = fast_for_group<4>(s.group());
    if (s.head_dim == 128) fast = fast_for_group<8>(s.group());
    if (s.head_dim == 256) fast = fast_for_group<16>(s.group());
  }
  return fast ? fast : attend;
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
  const int64_t items = query.size(0) * s.num_kv_heads;
  const float *q = query.data_ptr<float>(), *k = k_cache.data_ptr<float>(), *v = v_cache.data_ptr<float>();
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *seqs = token_seq.data_ptr<int64_t>();
  const int64_t* visible = token_visible.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t row_stride = s.num_heads * s.head_dim;
  const AttendFn attend_one = choose_attend(s);
  // Items are dealt out in turn, not in halves: a prefill chunk's later tokens see more context,
  // so contiguous ranges would leave one thread with most of the work.
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t item = worker; item < items; item += workers) {
        const int64_t t = item / s.num_kv_heads, g = item % s.num_kv_heads;
        const int64_t first = window > 0 ? std::max<int64_t>(0, visible[t] - window) : 0;
        attend_one(q + t * row_stride, k, v, tables + seqs[t] * s.max_blocks, first, visible[t], g, s,
                   static_cast<float>(scale), o + t * row_stride);
      }
  });
  return out;
}
