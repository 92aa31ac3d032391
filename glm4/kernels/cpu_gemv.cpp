// Memory-bound fp32 matmul for decode-sized batches on AVX-512 CPUs: y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]).
//
// Why: with a handful of activation rows the cost of a linear is reading W once from DRAM. Library GEMMs
// (oneDNN, MKL) read it at 50-75% of the machine's streaming bandwidth here; this kernel streams W in its
// plain (out_features, in_features) row-major layout, one row at a time, the way a sum kernel would, and reuses
// each loaded chunk of W for every activation row. Rows are split across torch's own thread pool
// (at::parallel_for), so it never competes with a second OpenMP runtime.
//
// Built on first use by glm4/kernels/cpu.py with -mavx512f; only loaded where the CPU reports AVX-512.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

using glm4k::kMaxRows;

// x: (M, K) with M <= kMaxRows and unit stride in K; weight: (N, K) contiguous; bias: (N,) or None.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "gemv: x must be (M, K) and weight (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "gemv: float32 only");
  TORCH_CHECK(weight.is_contiguous() && x.stride(1) == 1, "gemv: weight must be contiguous, x unit-stride in K");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "gemv: x has ", K, " features, weight expects ", weight.size(1));
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "gemv: 1 to ", kMaxRows, " rows, got ", M);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                "gemv: bias must be a contiguous float32 vector of ", N);
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const glm4k::GemvKernel kernel = glm4k::gemv_kernel(M);
  // Chunks of at least ~64 KiB of W keep the per-task overhead negligible while still splitting small matrices.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (K * int64_t(sizeof(float))));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { kernel(xp, ldx, wp, K, b, yp, N, r0, r1); });
  return y;
}

