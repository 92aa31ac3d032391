// Python bindings of the CPU kernels (glm4/kernels/cpu.py builds and loads this module).
#include <torch/extension.h>

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias);
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x W^T (+ b) for up to 8 rows of x, fp32, AVX-512 (cpu_gemv.cpp)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query token per sequence against its paged K/V, fp32/bf16, AVX-512 (cpu_attention.cpp)");
}
