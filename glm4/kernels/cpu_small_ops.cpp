// The small per-layer ops of a decode step, fused, for AVX-512 CPUs (fp32): RMSNorm, in-place rotary embedding
// of q and k, and row-wise argmax over the vocabulary.
//
// Why: at batch 1 each of these is a chain of 5-10 tiny torch ops (RMSNorm alone is pow, mean, add, rsqrt, mul,
// mul) costing 15-30 us of dispatch each time, and torch's argmax over 151552 logits runs scalar (~250 us).
// Together they were ~1 ms of a ~14 ms decode step of the `small` benchmark model.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

// x: (rows, n) fp32 with unit stride in n; weight: (n,) -> weight * x / sqrt(mean(x^2) + eps), as GLM-4 computes.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat, "rms_norm: fp32 (rows, n) input");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == at::kFloat,
              "rms_norm: weight must be a contiguous fp32 vector of ", x.size(1));
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  auto y = torch::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) glm4k::rms_norm_row(xp + r * ld, wp, yp + r * n, n, float(eps));
  });
  return y;
}

// qkv: (tokens, width) fp32, unit stride in width; cos/sin: (tokens, rotary_dim / 2). Rotates, in place, the first
// rotary_dim dims of the first `heads` heads of size head_dim in each row, pairing adjacent dims (2i, 2i+1).
void rotary_(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
             int64_t head_dim, int64_t rotary_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.scalar_type() == at::kFloat, "rotary_: fp32 (tokens, "
              "width) input");
  TORCH_CHECK(heads * head_dim <= qkv.size(1) && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "rotary_: heads x head_dim exceeds the row, or bad rotary_dim");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat && cos.numel() == qkv.size(0) * (rotary_dim / 2) &&
              sin.numel() == cos.numel(), "rotary_: cos/sin must be contiguous fp32 (tokens, rotary_dim / 2)");
  const int64_t tokens = qkv.size(0), ld = qkv.stride(0), half = rotary_dim / 2;
  float* p = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, tokens, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      glm4k::rotary_row(p + t * ld, cp + t * half, sp + t * half, heads, head_dim, rotary_dim);
  });
}

// logits: (rows, n) fp32, unit stride in n -> (rows,) int64 index of each row's maximum, the first one on ties
// (torch.argmax's choice; a NaN counts as the maximum, as there).
torch::Tensor argmax_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kFloat &&
              logits.size(1) > 0, "argmax_rows: fp32 (rows, n) input with n > 0");
  const int64_t rows = logits.size(0), n = logits.size(1), ld = logits.stride(0);
  auto out = torch::empty({rows}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = lp + r * ld;
      // Pass 1: the maximum (vector max over 16 lanes), noting NaNs; pass 2: the first position that holds it.
      // Like torch.argmax, a NaN counts as the maximum.
      __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __mmask16 nan = 0;
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mv = _mm512_max_ps(mv, v);
      }
      float m = _mm512_reduce_max_ps(mv);
      bool has_nan = nan != 0;
      for (; i < n; ++i) {
        has_nan |= std::isnan(x[i]);
        m = std::max(m, x[i]);
      }
      int64_t found = 0;
      if (has_nan) {
        for (i = 0; i < n; ++i) if (std::isnan(x[i])) { found = i; break; }
      } else {
        const __m512 target = _mm512_set1_ps(m);
        for (i = 0; i + 16 <= n; i += 16) {
          const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
          if (hit) { found = i + __builtin_ctz(unsigned(hit)); break; }
        }
        if (i + 16 > n) {
          for (; i < n; ++i) if (x[i] == m) { found = i; break; }
        }
      }
      op[r] = found;
    }
  });
  return out;
}
