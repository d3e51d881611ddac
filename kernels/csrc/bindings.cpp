#include <torch/extension.h>

torch::Tensor paged_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor token_seq, torch::Tensor token_visible,
                              double scale, int64_t window);
void write_kv_cache(torch::Tensor key, torch::Tensor value, torch::Tensor k_cache, torch::Tensor v_cache,
                    torch::Tensor slot_mapping);
torch::Tensor rotary_and_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slot_mapping, int64_t num_heads);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor argmax_rows(torch::Tensor logits);
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales);
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales);
torch::Tensor pack_float32_panels(torch::Tensor weight);
torch::Tensor float32_panel_linear(torch::Tensor x, torch::Tensor panels, int64_t out,
                                   c10::optional<torch::Tensor> bias);
int64_t shm_all_reduce_(torch::Tensor segment, torch::Tensor tensor, int64_t rank, double timeout_s);
int64_t shm_abort(torch::Tensor segment, int64_t reason, int64_t rank);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "attention over a paged KV cache for a ragged batch of query rows (float32, CPU)");
  m.def("write_kv_cache", &write_kv_cache, "store new keys and values at their cache slots (float32, CPU)");
  m.def("rotary_and_cache", &rotary_and_cache, "rotary on q and k of a fused qkv, k and v into the cache; returns q");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up from a fused gate_up output (float32, CPU)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = rms_norm(residual) (in place)");
  m.def("rms_norm", &rms_norm, "rms_norm(x) * weight");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding, in place");
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum (float32, CPU)");
  m.def("int8_linear", &int8_linear, "x @ (int8 codes * group scales)^T, for few rows (float32, CPU)");
  m.def("int4_linear", &int4_linear, "x @ (packed int4 codes * group scales)^T, for few rows (float32, CPU)");
  m.def("pack_float32_panels", &pack_float32_panels, "weight [out, in] -> panels [ceil(out / 16), in, 16]");
  m.def("float32_panel_linear", &float32_panel_linear, "x @ weight^T (+ bias) from its panels (float32, CPU)",
        py::arg("x"), py::arg("panels"), py::arg("out"), py::arg("bias") = py::none());
  // The GIL is released while a rank waits for its peers, so another thread can abort the wait.
  m.def("shm_all_reduce_", &shm_all_reduce_, "sum a tensor over the ranks sharing a segment, in place; 0 or the abort word",
        py::call_guard<py::gil_scoped_release>());
  m.def("shm_abort", &shm_abort, "end a shared-memory all-reduce for every rank; returns the abort word in force");
}
