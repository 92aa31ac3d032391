// Decode attention straight from the paged KV cache on AVX-512 CPUs: one new query token per sequence.
//
// Why: the torch path gathers each sequence's K/V blocks into a dense padded tensor, builds a key mask and calls
// SDPA: ~10 small ops per layer (most of a batch-1 step's non-matmul time) and a copy of every key and value read.
// Here each (sequence, KV head) task reads its keys once to score the G query heads that share them, takes the
// softmax, then reads its values once. Tasks run on torch's thread pool (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

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

// exp(x) for x <= 0 (scores minus their max): Taylor polynomial on x - n ln2, scaled by 2^n. ~1e-7 relative.
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

template <typename T, typename Index>
void attend(const T* q, const T* kc, const T* vc, const Index* tables, const int64_t* lens, T* out, int64_t H,
            int64_t KVH, int64_t D, int64_t BS, int64_t W, float scale, int64_t task) {
  const int64_t i = task / KVH, g = task % KVH, G = H / KVH;
  const int64_t L = lens[i];
  const int64_t tok_stride = KVH * D;  // elements between consecutive tokens of a block
  const Index* table = tables + i * W;
  std::vector<float> qf(G * D), scores(G * L), acc(G * D, 0.0f);
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < D; d += 16) store16(&qf[h * D + d], _mm512_mul_ps(load16(q + (i * H + g * G + h) * D + d), _mm512_set1_ps(scale)));
  // Scores: each key row is loaded once and dotted with the G query heads of its group.
  for (int64_t t = 0; t < L; ++t) {
    const T* k = kc + (int64_t(table[t / BS]) * BS + t % BS) * tok_stride + g * D;
    for (int64_t h = 0; h < G; ++h) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) s = _mm512_fmadd_ps(load16(k + d), _mm512_loadu_ps(&qf[h * D + d]), s);
      scores[h * L + t] = _mm512_reduce_add_ps(s);
    }
  }
  // Softmax per head (max-subtracted, so exp never overflows).
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
  // Weighted values: each value row is loaded once for the G heads.
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
      store16(out + (i * H + g * G + h) * D + d, _mm512_mul_ps(_mm512_loadu_ps(&acc[h * D + d]), _mm512_set1_ps(inv_sum[h])));
}

template <typename T, typename Index>
void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& tables,
         const torch::Tensor& lens, torch::Tensor& out, float scale) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), BS = kc.size(1), KVH = kc.size(2);
  const int64_t W = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const Index* tp = tables.data_ptr<Index>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n * KVH, 1, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) attend<T, Index>(qp, kp, vp, tp, lp, op, H, KVH, D, BS, W, scale, task);
  });
}

}  // namespace

// q: (n, H, D); k_cache/v_cache: (num_blocks, block_size, KVH, D) contiguous; block_tables: (n, W) int32/int64;
// context_lens: (n,) int64, each >= 1 and covered by its table row. Returns (n, H, D) in q's dtype.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: q must be (n, H, D) and the caches (blocks, block_size, KVH, D)");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_decode_attention: inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: q and the caches must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(2) % 16 == 0, "paged_decode_attention: head_dim must match "
              "the cache and be a multiple of 16");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "paged_decode_attention: heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0) &&
              context_lens.scalar_type() == at::kLong, "paged_decode_attention: one table row and one int64 "
              "length per query");
  auto out = torch::empty_like(q);
  const float s = static_cast<float>(scale);
  const bool i32 = block_tables.scalar_type() == at::kInt;
  TORCH_CHECK(i32 || block_tables.scalar_type() == at::kLong, "paged_decode_attention: block tables must be int32 "
              "or int64");
  if (q.scalar_type() == at::kFloat) {
    i32 ? run<float, int32_t>(q, k_cache, v_cache, block_tables, context_lens, out, s)
        : run<float, int64_t>(q, k_cache, v_cache, block_tables, context_lens, out, s);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_decode_attention: float32 or bfloat16 only");
    i32 ? run<at::BFloat16, int32_t>(q, k_cache, v_cache, block_tables, context_lens, out, s)
        : run<at::BFloat16, int64_t>(q, k_cache, v_cache, block_tables, context_lens, out, s);
  }
  return out;
}
