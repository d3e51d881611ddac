// Per-token elementwise layers of a decoder, fused: each is a handful of torch ops (and as many
// passes over memory and dispatches) when written in torch, one pass here. float32, CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "vec16.h"

namespace {

void check_float_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [tokens, hidden] with contiguous rows");
}

inline void normalize_row(const float* in, const float* weight, float* out, int64_t hidden, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < hidden; ++i) squares += in[i] * in[i];
  const float inv = 1.f / std::sqrt(squares / hidden + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) out[i] = in[i] * inv * weight[i];
}

}  // namespace

// residual += x, then x = rms_norm(residual) * weight; both in place (the pre-norm decoder's
// "add the sublayer's output, normalize for the next sublayer").
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_float_rows(x, "x");
  check_float_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual differ in shape");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [hidden]");
  const int64_t hidden = x.size(1);
  float *xs = x.data_ptr<float>(), *rs = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float *row = xs + t * x.stride(0), *res = rs + t * residual.stride(0);
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) res[i] += row[i];
      normalize_row(res, w, row, hidden, static_cast<float>(eps));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_float_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [hidden]");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t hidden = x.size(1);
  const float *xs = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) normalize_row(xs + t * x.stride(0), w, os + t * hidden, hidden, eps);
  });
  return out;
}

// Rotary embedding, rotate-half convention, in place on x [tokens, heads, head_dim] (rows may be
// strided, e.g. views into a fused qkv output); cos, sin: [tokens, head_dim / 2].
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 3 && x.stride(2) == 1,
              "x must be float32 [tokens, heads, head_dim] with contiguous heads");
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == tokens && cos.size(1) == half &&
              sin.sizes() == cos.sizes(), "cos and sin must be contiguous [tokens, head_dim / 2]");
  float* xs = x.data_ptr<float>();
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        float* first = xs + t * x.stride(0) + h * x.stride(1);
        float* second = first + half;
        const float *ct = c + t * half, *st = s + t * half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = first[i], b = second[i];
          first[i] = a * ct[i] - b * st[i];
          second[i] = b * ct[i] + a * st[i];
        }
      }
  });
}

// The gated MLP's activation: gate_up [tokens, 2 * inter] (gate | up) -> silu(gate) * up [tokens, inter],
// one pass instead of silu, a temporary, and a multiply.
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_float_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = torch::empty({tokens, inter}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const int64_t vectorized = inter - inter % rayfoundry::kLanes;
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *gate = in + t * stride, *up = gate + inter;
      float* o = os + t * inter;
      for (int64_t i = 0; i < vectorized; i += rayfoundry::kLanes) {
        const rayfoundry::Vec16 g = rayfoundry::load16(gate + i);
        rayfoundry::store16(o + i, g / (1.f + rayfoundry::exp16(-g)) * rayfoundry::load16(up + i));
      }
      for (int64_t i = vectorized; i < inter; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}
