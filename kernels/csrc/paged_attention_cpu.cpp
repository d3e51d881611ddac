// Decode attention over a paged KV cache on CPU: one query token per sequence reads its keys
// and values straight from the cache blocks its block table lists (no gathered copy), with the
// query heads that share a KV head handled together so each cached row is read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Shape {
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
};

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// Blocks are scattered in memory, so the hardware prefetcher cannot see the next one coming.
inline void prefetch_block(const float* block, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(block + i);
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

// One sequence's KV heads [first_kv_head, first_kv_head + kv_heads) against its `context_len`
// cached tokens, walking the block table block by block: each cached row is read once, in
// order, for every query head that uses it.
void attend(const float* query, const float* k_cache, const float* v_cache, const int64_t* block_table,
            int64_t context_len, int64_t first_kv_head, int64_t kv_heads, const Shape& s, float scale,
            float* out) {
  const int64_t group = s.num_heads / s.num_kv_heads, dim = s.head_dim, heads = kv_heads * group;
  const int64_t row_stride = s.num_kv_heads * dim;  // between consecutive tokens of a block
  const int64_t block_stride = s.block_size * row_stride;
  const int64_t num_blocks = (context_len + s.block_size - 1) / s.block_size;
  const float* q = query + first_kv_head * group * dim;  // this item's query heads, contiguous
  thread_local std::vector<float> scores, acc;
  scores.resize(heads * context_len);
  acc.assign(heads * dim, 0.f);

  for (int64_t b = 0, t = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch_block(k_cache + block_table[b + 1] * block_stride, block_stride);
    const float* row = k_cache + block_table[b] * block_stride + first_kv_head * dim;
    for (int64_t end = std::min(t + s.block_size, context_len); t < end; ++t, row += row_stride)
      for (int64_t h = 0; h < heads; ++h)
        scores[h * context_len + t] = scale * dot(q + h * dim, row + (h / group) * dim, dim);
  }
  for (int64_t h = 0; h < heads; ++h) {  // softmax, max-subtracted
    float* p = &scores[h * context_len];
    const float top = *std::max_element(p, p + context_len);
    float total = 0.f;
    for (int64_t t = 0; t < context_len; ++t) total += (p[t] = std::exp(p[t] - top));
    const float inv = 1.f / total;
    for (int64_t t = 0; t < context_len; ++t) p[t] *= inv;
  }
  for (int64_t b = 0, t = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch_block(v_cache + block_table[b + 1] * block_stride, block_stride);
    const float* row = v_cache + block_table[b] * block_stride + first_kv_head * dim;
    for (int64_t end = std::min(t + s.block_size, context_len); t < end; ++t, row += row_stride)
      for (int64_t h = 0; h < heads; ++h) axpy(scores[h * context_len + t], row + (h / group) * dim, &acc[h * dim], dim);
  }
  std::copy(acc.begin(), acc.end(), out + first_kv_head * group * dim);
}

}  // namespace

// query [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, W] int64;
// context_lens [B] int64. Returns [B, Hq, D].
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
  const Shape s{query.size(1), k_cache.size(2), query.size(2), k_cache.size(1), block_tables.size(1)};
  TORCH_CHECK(s.num_heads % s.num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.size(3) == s.head_dim, "head_dim differs between query and cache");
  auto out = torch::empty_like(query);
  // A work item is a whole sequence (its rows read front to back) unless there are too few
  // sequences to keep every thread busy; then it is one KV head of a sequence.
  const int64_t num_seqs = query.size(0);
  const int64_t kv_heads = num_seqs >= 4 * at::get_num_threads() ? s.num_kv_heads : 1;
  const int64_t splits = s.num_kv_heads / kv_heads, items = num_seqs * splits;
  const float *q = query.data_ptr<float>(), *k = k_cache.data_ptr<float>(), *v = v_cache.data_ptr<float>();
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = context_lens.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t seq_stride = s.num_heads * s.head_dim;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / splits, first = (item % splits) * kv_heads;
      attend(q + b * seq_stride, k, v, tables + b * s.max_blocks, lens[b], first, kv_heads, s,
             static_cast<float>(scale), o + b * seq_stride);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (float32, CPU)");
}
