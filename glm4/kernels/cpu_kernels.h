// The inner loops of the CPU kernels (AVX-512, fp32 math), shared by the per-op entry points (cpu_gemv.cpp,
// cpu_attention.cpp, cpu_small_ops.cpp) and the fused decode layer (cpu_decode_layers.cpp). Plain functions over
// raw pointers and index ranges: callers decide how work is split across threads.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace glm4k {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {  // round to nearest even, as torch's fp32 -> bf16 cast does
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// exp(x) for x <= 0: Taylor polynomial on x - n ln2, scaled by 2^n. ~1e-7 relative.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// ---- GEMV: y[m, r] = sum_k x[m, k] * W[r, k] (+ b[r]) for rows r in [r0, r1) ------------------------------------
constexpr int64_t kMaxRows = 8;            // activation rows per call (decode batch sizes); cpu.MAX_ROWS
// Software prefetch 4 KiB ahead of the W row being read, into L2 (T1): on the project's EPYC the LM head GEMV
// reads at ~95-100% of `torch.sum` with T1 against ~85-95% with T0 (which also fills L1 with lines read once).
constexpr int64_t kPrefetchFloats = 1024;

// Two accumulators per activation row break the FMA dependency chain; each 32-float chunk of W is loaded once and
// used MR times. A row's result depends only on that row (same order whatever MR), so batching is invariant.
template <int MR>
void gemv_rows(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t K,
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
      _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetchFloats), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetchFloats + 16), _MM_HINT_T1);
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

using GemvKernel = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                            int64_t);
inline GemvKernel gemv_kernel(int64_t rows) {  // 1 <= rows <= kMaxRows
  static constexpr GemvKernel kernels[kMaxRows] = {gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>,
                                                   gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>};
  return kernels[rows - 1];
}

// ---- small ops, one row at a time -------------------------------------------------------------------------------
// GLM-4 RMSNorm of one row: y = w * (x / sqrt(mean(x^2) + eps)).
inline void rms_norm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), acc);
  float ss = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
  const __m512 iv = _mm512_set1_ps(inv);
  for (i = 0; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), iv)));
  for (; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

// GLM-4's interleaved partial rotary, in place, on the first `heads` heads of one row: dims (2i, 2i+1) of the first
// rotary_dim of each head rotate by the angle whose cos/sin are c[i]/s[i].
inline void rotary_row(float* row, const float* c, const float* s, int64_t heads, int64_t head_dim,
                       int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x = row + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x0 = x[2 * i], x1 = x[2 * i + 1];
      x[2 * i] = x0 * c[i] - x1 * s[i];
      x[2 * i + 1] = x1 * c[i] + x0 * s[i];
    }
  }
}

// ---- paged decode attention ----------------------------------------------------------------------------------------
// The kernels index the caches with these values unchecked; a bad table or length must be an error, not a read or
// write outside the cache. O(n * W): nothing next to the attention itself.
template <typename Index>
void check_paged_inputs(const char* who, const Index* tables, int64_t W, const int64_t* lens, int64_t n,
                        int64_t BS, int64_t blocks) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= W * BS, who, ": context length ", lens[i], " of row ", i,
                " is not in [1, ", W * BS, "] (its block table holds ", W, " blocks of ", BS, ")");
    for (int64_t j = 0; j < (lens[i] + BS - 1) / BS; ++j)
      TORCH_CHECK(tables[i * W + j] >= 0 && tables[i * W + j] < blocks, who, ": block id ", int64_t(tables[i * W + j]),
                  " in row ", i, " of the block tables is not in [0, ", blocks, ")");
  }
}

// One (sequence i, KV head g) task -----------------------------------------------------
// q: (n, H, D); caches (blocks, BS, KVH, D); tables (n, W); lens (n,). Reads the task's keys once to score the G query
// heads that share them, takes the softmax (max-subtracted, so exp never overflows), then reads its values once.
template <typename T, typename Index>
void attend_task(const T* q, const T* kc, const T* vc, const Index* tables, const int64_t* lens, T* out, int64_t H,
                 int64_t KVH, int64_t D, int64_t BS, int64_t W, float scale, int64_t task) {
  const int64_t i = task / KVH, g = task % KVH, G = H / KVH;
  const int64_t L = lens[i];
  const int64_t tok_stride = KVH * D;  // elements between consecutive tokens of a block
  const Index* table = tables + i * W;
  std::vector<float> qf(G * D), scores(G * L), acc(G * D, 0.0f);
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < D; d += 16)
      store16(&qf[h * D + d], _mm512_mul_ps(load16(q + (i * H + g * G + h) * D + d), _mm512_set1_ps(scale)));
  for (int64_t t = 0; t < L; ++t) {
    const T* k = kc + (int64_t(table[t / BS]) * BS + t % BS) * tok_stride + g * D;
    for (int64_t h = 0; h < G; ++h) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) s = _mm512_fmadd_ps(load16(k + d), _mm512_loadu_ps(&qf[h * D + d]), s);
      scores[h * L + t] = _mm512_reduce_add_ps(s);
    }
  }
  std::vector<float> inv_sum(G);
  for (int64_t h = 0; h < G; ++h) {
    float* s = &scores[h * L];
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < L; ++t) m = std::max(m, s[t]);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (t < L) {
      const __mmask16 mk = __mmask16((1u << (L - t)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), mv));
      _mm512_mask_storeu_ps(s + t, mk, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
    }
    inv_sum[h] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  for (int64_t t = 0; t < L; ++t) {
    const T* v = vc + (int64_t(table[t / BS]) * BS + t % BS) * tok_stride + g * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 vv = load16(v + d);
      for (int64_t h = 0; h < G; ++h) {
        float* a = &acc[h * D + d];
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[h * L + t]), vv, _mm512_loadu_ps(a)));
      }
    }
  }
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < D; d += 16)
      store16(out + (i * H + g * G + h) * D + d,
              _mm512_mul_ps(_mm512_loadu_ps(&acc[h * D + d]), _mm512_set1_ps(inv_sum[h])));
}

}  // namespace glm4k
