// Decode attention over a paged KV cache on CPU: one query token per sequence reads its keys and
// values straight from the cache blocks its block table lists (no gathered copy).
//
// Layout (kernels/paged_attention.py): k_cache [num_blocks, kv_heads, head_dim, block_size] (keys
// transposed within a block), v_cache [num_blocks, kv_heads, block_size, head_dim]. A block's
// scores for one query head are head_dim multiply-adds of block_size-wide vectors, and its values
// add into the head's output row by row: inner loops the compiler vectorizes without reductions.
// The query heads sharing a KV head are done together, so each cache block is read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

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

// One (sequence, KV head): its `group` query heads against `context_len` cached tokens.
void attend(const float* query, const float* k_cache, const float* v_cache, const int64_t* block_table,
            int64_t context_len, int64_t kv_head, const Shape& s, float scale, float* out) {
  const int64_t group = s.group(), dim = s.head_dim, bs = s.block_size;
  const int64_t num_blocks = (context_len + bs - 1) / bs;
  thread_local std::vector<float> q, scores, acc;
  q.resize(group * dim);
  scores.resize(group * num_blocks * bs);
  acc.assign(group * dim, 0.f);
  const float* query_heads = query + kv_head * group * dim;
  for (int64_t i = 0; i < group * dim; ++i) q[i] = query_heads[i] * scale;
  const int64_t head_offset = kv_head * s.head_stride();

  for (int64_t b = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(k_cache + block_table[b + 1] * s.block_stride() + head_offset, s.head_stride());
    const int64_t count = std::min(bs, context_len - b * bs);
    score_block(q.data(), k_cache + block_table[b] * s.block_stride() + head_offset, group, dim, bs, count,
                scores.data() + b * bs, context_len);
  }
  softmax_rows(scores.data(), group, context_len);
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(v_cache + block_table[b + 1] * s.block_stride() + head_offset, s.head_stride());
    const int64_t count = std::min(bs, context_len - b * bs);
    accumulate_block(scores.data() + b * bs, context_len, v_cache + block_table[b] * s.block_stride() + head_offset,
                     group, dim, count, acc.data());
  }
  std::copy(acc.begin(), acc.end(), out + kv_head * group * dim);
}

}  // namespace

// query [B, Hq, D]; k_cache [num_blocks, Hkv, D, block_size]; v_cache [num_blocks, Hkv, block_size, D];
// block_tables [B, W] int64; context_lens [B] int64. Returns [B, Hq, D].
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32, "decode_attention (cpu) takes float32, got ",
              query.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "the KV cache must be float32");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "block_tables and context_lens must be int64");
  query = query.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const Shape s{query.size(1), k_cache.size(1), query.size(2), k_cache.size(3), block_tables.size(1)};
  TORCH_CHECK(s.num_heads % s.num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.size(2) == s.head_dim && v_cache.size(3) == s.head_dim && v_cache.size(2) == s.block_size,
              "query and KV cache shapes disagree");
  TORCH_CHECK(s.block_size <= 64, "block_size must be at most 64, got ", s.block_size);
  auto out = torch::empty_like(query);
  const int64_t items = query.size(0) * s.num_kv_heads;
  const float *q = query.data_ptr<float>(), *k = k_cache.data_ptr<float>(), *v = v_cache.data_ptr<float>();
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = context_lens.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t seq_stride = s.num_heads * s.head_dim;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.num_kv_heads, g = item % s.num_kv_heads;
      attend(q + b * seq_stride, k, v, tables + b * s.max_blocks, lens[b], g, s, static_cast<float>(scale),
             o + b * seq_stride);
    }
  });
  return out;
}
