// Python bindings of the CPU kernels (glm4/kernels/cpu.py builds and loads this module).
#include <torch/extension.h>

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias);
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
void rotary_(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
             int64_t head_dim, int64_t rotary_dim);
torch::Tensor argmax_rows(const torch::Tensor& logits);
torch::Tensor decode_layers(const torch::Tensor& h, const std::vector<torch::Tensor>& weights,
                            const std::vector<torch::Tensor>& caches, const torch::Tensor& slots,
                            const torch::Tensor& tables, const torch::Tensor& lens, const torch::Tensor& cos,
                            const torch::Tensor& sin, int64_t heads, int64_t kv_heads, int64_t rotary_dim,
                            double eps, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x W^T (+ b) for up to 8 rows of x, fp32, AVX-512 (cpu_gemv.cpp)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query token per sequence against its paged K/V, fp32/bf16, AVX-512 (cpu_attention.cpp)");
  m.def("rms_norm", &rms_norm, "GLM-4 RMSNorm over fp32 rows (cpu_small_ops.cpp)");
  m.def("rotary_", &rotary_, "interleaved partial rotary embedding of q and k, in place, fp32 (cpu_small_ops.cpp)");
  m.def("argmax_rows", &argmax_rows, "first index of each fp32 row's maximum (cpu_small_ops.cpp)");
  m.def("decode_layers", &decode_layers, "the GLM-4 blocks of a decode step of up to 8 rows, fp32 "
        "(cpu_decode_layers.cpp)");
}
