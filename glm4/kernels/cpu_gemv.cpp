// Memory-bound fp32 matmul for decode-sized batches on AVX-512 CPUs: y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]).
//
// Why: with a handful of activation rows the cost of a linear is reading W once from DRAM. Library GEMMs
// (oneDNN, MKL) read it at 50-75% of the machine's streaming bandwidth here; this kernel streams W in its
// plain (out_features, in_features) row-major layout, one row at a time, the way a sum kernel would, and reuses
// each loaded chunk of W for every activation row. Rows are split across torch's own thread pool
// (at::parallel_for), so it never competes with a second OpenMP runtime.
//
// Built on first use by glm4/kernels/cpu.py with -mavx512f; only loaded where the CPU reports AVX-512.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kMaxRows = 8;         // activation rows handled per call (decode batch sizes)
constexpr int64_t kPrefetchFloats = 1024;  // software prefetch 4 KiB ahead of the W row being read

// One output row block: rows [r0, r1) of W against MR activation rows. Two accumulators per activation row
// break the FMA dependency chain; each 32-float chunk of W is loaded once and used MR times.
template <int MR>
void rows_kernel(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t K,
                 const float* __restrict bias, float* __restrict y, int64_t ldy, int64_t r0, int64_t r1) {
  const int64_t k_main = K & ~int64_t(31);
  const int64_t tail = K - k_main;
  const __mmask16 m0 = tail >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  const __mmask16 m1 = tail > 16 ? __mmask16((1u << (tail - 16)) - 1) : __mmask16(0);
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * K;
    __m512 acc0[MR], acc1[MR];
    for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_main; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetchFloats), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetchFloats + 16), _MM_HINT_T0);
      const __m512 w0 = _mm512_loadu_ps(wr + k), w1 = _mm512_loadu_ps(wr + k + 16);
      for (int m = 0; m < MR; ++m) {
        acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * ldx + k), acc0[m]);
        acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * ldx + k + 16), acc1[m]);
      }
    }
    if (tail) {
      const __m512 w0 = _mm512_maskz_loadu_ps(m0, wr + k_main), w1 = _mm512_maskz_loadu_ps(m1, wr + k_main + 16);
      for (int m = 0; m < MR; ++m) {
        acc0[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x + m * ldx + k_main), acc0[m]);
        acc1[m] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x + m * ldx + k_main + 16), acc1[m]);
      }
    }
    const float b = bias ? bias[r] : 0.0f;
    for (int m = 0; m < MR; ++m) y[m * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + b;
  }
}

using Kernel = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                        int64_t);
constexpr Kernel kKernels[kMaxRows] = {rows_kernel<1>, rows_kernel<2>, rows_kernel<3>, rows_kernel<4>,
                                       rows_kernel<5>, rows_kernel<6>, rows_kernel<7>, rows_kernel<8>};

}  // namespace

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
  const Kernel kernel = kKernels[M - 1];
  // Chunks of at least ~64 KiB of W keep the per-task overhead negligible while still splitting small matrices.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (K * int64_t(sizeof(float))));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { kernel(xp, ldx, wp, K, b, yp, N, r0, r1); });
  return y;
}

