// One whole GLM-4 block for a pure decode step (1 to 8 sequences, one new token each), fp32, AVX-512:
//
//   x = RMSNorm(h); qkv = x Wqkv^T + b; rotary(q, k); cache[slot] = k, v; a = attention over the paged cache;
//   h = h + a Wdense^T; x = RMSNorm(h); [gate; up] = x Wh4h^T; h = h + (silu(gate) * up) W4hh^T
//
// Why: at batch 1 every weight is read once per step, so a step should cost its weight bytes over the memory
// bandwidth. Run op by op, a block is ~15 torch/Python calls and 8 thread-pool fork/joins; on the `small` benchmark
// model that overhead was a third of a decode step (bench/README.md). Here the block is ONE call and ONE OpenMP
// parallel region: the threads split each matmul's output rows statically and meet at a barrier between phases,
// and the tiny per-row ops run on one thread while the others wait. The math is the per-op kernels' (cpu_kernels.h),
// so results match the unfused path, except SiLU (here a vectorised exp; torch's differs in the last ulp).
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <omp.h>

namespace {

inline void split(int64_t n, int t, int nt, int64_t* a, int64_t* b) {
  *a = n * t / nt;
  *b = n * (t + 1) / nt;
}

// silu(g) * u, elementwise over n floats. exp(-|g|) keeps the argument non-positive, so it never overflows:
// sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) otherwise.
inline void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(mk, g + i);
    const __m512 e = glm4k::exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
    const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(out + i, mk, _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_maskz_loadu_ps(mk, u + i)));
  }
}

template <typename Index>
void run_layer(const float* h, float* out, int64_t M, int64_t hidden, const float* ln1, const float* wqkv,
               const float* bqkv, const float* wdense, const float* ln2, const float* wh4h, const float* w4hh,
               int64_t ffn, float* kc, float* vc, const int64_t* slots, const Index* tables, int64_t W,
               const int64_t* lens, const float* cos, const float* sin, int64_t H, int64_t KVH, int64_t D,
               int64_t BS, int64_t rotary_dim, float eps, float scale, float* x, float* qkv, float* attn,
               float* mid, float* act) {
  const int64_t q_size = H * D, kv_size = KVH * D, width = q_size + 2 * kv_size, half = rotary_dim / 2;
  const glm4k::GemvKernel gemv = glm4k::gemv_kernel(M);
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t a, b;
#pragma omp single
    for (int64_t m = 0; m < M; ++m) glm4k::rms_norm_row(h + m * hidden, ln1, x + m * hidden, hidden, eps);
    split(width, t, nt, &a, &b);
    gemv(x, hidden, wqkv, hidden, bqkv, qkv, width, a, b);
#pragma omp barrier
#pragma omp single
    for (int64_t m = 0; m < M; ++m) {
      float* row = qkv + m * width;
      glm4k::rotary_row(row, cos + m * half, sin + m * half, H + KVH, D, rotary_dim);
      std::copy(row + q_size, row + q_size + kv_size, kc + slots[m] * kv_size);
      std::copy(row + q_size + kv_size, row + width, vc + slots[m] * kv_size);
    }
    // q of row m is qkv[m, :q_size], i.e. a (M, H, D) tensor with row stride `width`: attend_task takes a dense
    // (n, H, D) q, so each row's q is addressed through its own base pointer.
    split(M * KVH, t, nt, &a, &b);
    for (int64_t task = a; task < b; ++task) {
      const int64_t m = task / KVH;
      glm4k::attend_task<float, Index>(qkv + m * width, kc, vc, tables + m * W, lens + m, attn + m * q_size, H, KVH,
                                       D, BS, W, scale, task % KVH);
    }
#pragma omp barrier
    split(hidden, t, nt, &a, &b);
    gemv(attn, q_size, wdense, q_size, nullptr, mid, hidden, a, b);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = a; r < b; ++r) mid[m * hidden + r] += h[m * hidden + r];
#pragma omp barrier
#pragma omp single
    for (int64_t m = 0; m < M; ++m) glm4k::rms_norm_row(mid + m * hidden, ln2, x + m * hidden, hidden, eps);
    // Each thread computes the gate rows [a, b) and the matching up rows, then their SwiGLU: no barrier needed
    // between the projection and the activation. Scratch for the projection: out (M x hidden) is too small, so
    // gate and up go to qkv's buffer, sized for it by the caller.
    split(ffn, t, nt, &a, &b);
    float* gate = qkv;
    float* up = qkv + M * ffn;
    gemv(x, hidden, wh4h, hidden, nullptr, gate, ffn, a, b);
    gemv(x, hidden, wh4h + ffn * hidden, hidden, nullptr, up, ffn, a, b);
    for (int64_t m = 0; m < M; ++m) silu_mul(gate + m * ffn + a, up + m * ffn + a, act + m * ffn + a, b - a);
#pragma omp barrier
    split(hidden, t, nt, &a, &b);
    gemv(act, ffn, w4hh, ffn, nullptr, out, hidden, a, b);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = a; r < b; ++r) out[m * hidden + r] += mid[m * hidden + r];
  }
}

void check_f32(const torch::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == at::IntArrayRef(shape),
              "decode_layer: ", name, " must be a contiguous float32 tensor of shape ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

// h: (M, hidden) with 1 <= M <= 8, one new token per sequence; weights as the checkpoint holds them (qkv (width,
// hidden) with optional bias, dense (hidden, H*D), h_to_4h (2*ffn, hidden) = [gate; up], 4h_to_h (hidden, ffn));
// caches (blocks, BS, KVH, D) fp32, written at `slots` (M,); tables (M, W) int32/int64; lens (M,) int64 including
// the new token; cos/sin (M, rotary_dim / 2). Returns the block's output (M, hidden).
torch::Tensor decode_layer(const torch::Tensor& h, const torch::Tensor& ln1, const torch::Tensor& wqkv,
                           const c10::optional<torch::Tensor>& bqkv, const torch::Tensor& wdense,
                           const torch::Tensor& ln2, const torch::Tensor& wh4h, const torch::Tensor& w4hh,
                           torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                           const torch::Tensor& tables, const torch::Tensor& lens, const torch::Tensor& cos,
                           const torch::Tensor& sin, int64_t heads, int64_t kv_heads, int64_t rotary_dim,
                           double eps, double scale) {
  TORCH_CHECK(h.dim() == 2 && k_cache.dim() == 4, "decode_layer: h must be (M, hidden), caches 4-D");
  const int64_t M = h.size(0), hidden = h.size(1), D = k_cache.size(3), BS = k_cache.size(1);
  TORCH_CHECK(M >= 1 && M <= glm4k::kMaxRows, "decode_layer: 1 to ", glm4k::kMaxRows, " sequences, got ", M);
  TORCH_CHECK(k_cache.size(2) == kv_heads && heads % kv_heads == 0 && D % 16 == 0 && rotary_dim % 2 == 0 &&
              rotary_dim <= D, "decode_layer: bad head layout (heads ", heads, ", KV heads ", kv_heads,
              ", head_dim ", D, ", rotary_dim ", rotary_dim, ")");
  const int64_t q_size = heads * D, width = q_size + 2 * kv_heads * D, ffn = w4hh.size(-1);
  check_f32(h, "h", {M, hidden});
  check_f32(ln1, "input_layernorm.weight", {hidden});
  check_f32(wqkv, "query_key_value.weight", {width, hidden});
  if (bqkv.has_value() && bqkv->defined()) check_f32(*bqkv, "query_key_value.bias", {width});
  check_f32(wdense, "dense.weight", {hidden, q_size});
  check_f32(ln2, "post_attention_layernorm.weight", {hidden});
  check_f32(wh4h, "dense_h_to_4h.weight", {2 * ffn, hidden});
  check_f32(w4hh, "dense_4h_to_h.weight", {hidden, ffn});
  check_f32(k_cache, "k_cache", {k_cache.size(0), BS, kv_heads, D});
  check_f32(v_cache, "v_cache", {k_cache.size(0), BS, kv_heads, D});
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == M &&
              lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == M,
              "decode_layer: slot_mapping and context_lens must be contiguous int64 vectors of ", M);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == M && tables.is_contiguous() &&
              (tables.scalar_type() == at::kLong || tables.scalar_type() == at::kInt),
              "decode_layer: block tables must be a contiguous int32/int64 (M, W) tensor");
  check_f32(cos, "cos", {M, rotary_dim / 2});
  check_f32(sin, "sin", {M, rotary_dim / 2});
  auto opts = h.options();
  auto out = torch::empty({M, hidden}, opts);
  auto x = torch::empty({M, hidden}, opts), mid = torch::empty({M, hidden}, opts);
  auto qkv = torch::empty({M * std::max(width, 2 * ffn)}, opts);  // also holds [gate | up] later
  auto attn = torch::empty({M, q_size}, opts), act = torch::empty({M, ffn}, opts);
  const float* b = bqkv.has_value() && bqkv->defined() ? bqkv->data_ptr<float>() : nullptr;
  auto go = [&](auto* table_ptr) {
    run_layer(h.data_ptr<float>(), out.data_ptr<float>(), M, hidden, ln1.data_ptr<float>(), wqkv.data_ptr<float>(),
              b, wdense.data_ptr<float>(), ln2.data_ptr<float>(), wh4h.data_ptr<float>(), w4hh.data_ptr<float>(),
              ffn, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), slots.data_ptr<int64_t>(), table_ptr,
              tables.size(1), lens.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), heads,
              kv_heads, D, BS, rotary_dim, float(eps), float(scale), x.data_ptr<float>(), qkv.data_ptr<float>(),
              attn.data_ptr<float>(), mid.data_ptr<float>(), act.data_ptr<float>());
  };
  if (tables.scalar_type() == at::kLong) go(tables.data_ptr<int64_t>()); else go(tables.data_ptr<int32_t>());
  return out;
}
