// The stack of GLM-4 blocks for a pure decode step (1 to 8 sequences, one new token each), fp32, AVX-512. Per block:
//
//   x = RMSNorm(h); qkv = x Wqkv^T + b; rotary(q, k); cache[slot] = k, v; a = attention over the paged cache;
//   h = h + a Wdense^T; x = RMSNorm(h); [gate; up] = x Wh4h^T; h = h + (silu(gate) * up) W4hh^T
//
// Why: at batch 1 every weight is read once per step, so a step should cost its weight bytes over the memory
// bandwidth. Run op by op, a block is ~15 torch/Python calls and 8 thread-pool fork/joins (~40 us per block on
// top of its weight reads, mostly Python). Here all the blocks are ONE call and ONE OpenMP parallel region: the
// threads split each matmul's output rows statically and meet at a barrier between phases; the tiny per-row ops
// are recomputed per thread or split with the attention tasks. The math is the per-op kernels' (cpu_kernels.h), so
// results match the unfused path, except SiLU (here a vectorised exp; torch's differs in the last ulp).
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

// The dimensions of a block and the scratch buffers of a step, shared by every layer of the stack.
struct Step {
  int64_t M, hidden, ffn, H, KVH, D, BS, W, rotary_dim;
  float eps, scale;
  const int64_t* slots;
  const int64_t* lens;
  const float* cos;
  const float* sin;
  float *x, *qkv, *attn, *mid, *act;  // scratch: (threads, M, hidden), (M, max(width, 2 ffn)), (M, H D),
                                      // (M, hidden), (M, ffn)
};

struct LayerWeights {
  const float *ln1, *wqkv, *bqkv, *wdense, *ln2, *wh4h, *w4hh;
  float *kc, *vc;
};

// One block, run by every thread of the enclosing parallel region (its `omp barrier`s bind to that region).
// Reads h (M, hidden), writes out (M, hidden); ends with a barrier, so `out` is complete on return. Five barriers
// per block, one after each matmul that the next phase reads whole: RMSNorm is recomputed by every thread into its
// own scratch (a few hundred floats) instead of one thread computing it between two barriers, and each attention
// task rotates and caches the q/k heads it owns.
template <typename Index>
void layer_body(const Step& s, const LayerWeights& w, const Index* tables, const float* h, float* out) {
  const int64_t M = s.M, hidden = s.hidden, ffn = s.ffn, D = s.D, KVH = s.KVH, H = s.H, G = H / KVH;
  const int64_t q_size = H * D, kv_size = KVH * D, width = q_size + 2 * kv_size, half = s.rotary_dim / 2;
  const glm4k::GemvKernel gemv = glm4k::gemv_kernel(M);
  const int t = omp_get_thread_num(), nt = omp_get_num_threads();
  float* x = s.x + t * M * hidden;  // this thread's normalised input
  int64_t a, b;
  for (int64_t m = 0; m < M; ++m) glm4k::rms_norm_row(h + m * hidden, w.ln1, x + m * hidden, hidden, s.eps);
  split(width, t, nt, &a, &b);
  gemv(x, hidden, w.wqkv, hidden, w.bqkv, s.qkv, width, a, b);
#pragma omp barrier
  // Task (row m, KV head g): rotate the G query heads of the group and its key head, store its key and value at
  // the row's slot, attend. Tasks touch disjoint heads, and a row's new slot lies in a block no other row writes.
  // Row m's q is qkv[m, :q_size] (row stride `width`): attend_task addresses a dense (n, H, D) q, so each task
  // gets its row's base pointers and index 0.
  split(M * KVH, t, nt, &a, &b);
  for (int64_t task = a; task < b; ++task) {
    const int64_t m = task / KVH, g = task % KVH;
    float* row = s.qkv + m * width;
    const float* c = s.cos + m * half;
    const float* sn = s.sin + m * half;
    glm4k::rotary_row(row + g * G * D, c, sn, G, D, s.rotary_dim);
    glm4k::rotary_row(row + q_size + g * D, c, sn, 1, D, s.rotary_dim);
    const float* k = row + q_size + g * D;
    const float* v = k + kv_size;
    std::copy(k, k + D, w.kc + s.slots[m] * kv_size + g * D);
    std::copy(v, v + D, w.vc + s.slots[m] * kv_size + g * D);
    glm4k::attend_task<float, Index>(row, w.kc, w.vc, tables + m * s.W, s.lens + m, s.attn + m * q_size, H, KVH,
                                     D, s.BS, s.W, s.scale, g);
  }
#pragma omp barrier
  split(hidden, t, nt, &a, &b);
  gemv(s.attn, q_size, w.wdense, q_size, nullptr, s.mid, hidden, a, b);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = a; r < b; ++r) s.mid[m * hidden + r] += h[m * hidden + r];
#pragma omp barrier
  for (int64_t m = 0; m < M; ++m) glm4k::rms_norm_row(s.mid + m * hidden, w.ln2, x + m * hidden, hidden, s.eps);
  // Each thread computes the gate rows [a, b) and the matching up rows, then their SwiGLU: no barrier between the
  // projection and the activation. [gate | up] reuses the qkv buffer (sized for both by the caller).
  split(ffn, t, nt, &a, &b);
  float* gate = s.qkv;
  float* up = s.qkv + M * ffn;
  gemv(x, hidden, w.wh4h, hidden, nullptr, gate, ffn, a, b);
  gemv(x, hidden, w.wh4h + ffn * hidden, hidden, nullptr, up, ffn, a, b);
  for (int64_t m = 0; m < M; ++m) silu_mul(gate + m * ffn + a, up + m * ffn + a, s.act + m * ffn + a, b - a);
#pragma omp barrier
  split(hidden, t, nt, &a, &b);
  gemv(s.act, ffn, w.w4hh, ffn, nullptr, out, hidden, a, b);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = a; r < b; ++r) out[m * hidden + r] += s.mid[m * hidden + r];
#pragma omp barrier
}

void check_f32(const torch::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == at::IntArrayRef(shape),
              "decode_layers: ", name, " must be a contiguous float32 tensor of shape ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

// The whole stack of blocks for one pure decode step. h: (M, hidden) with 1 <= M <= 8, one new token per sequence.
// weights: 7 per layer, as the checkpoint holds them: input_layernorm (hidden), query_key_value (width, hidden),
// its bias (width) or an empty tensor, dense (hidden, H*D), post_attention_layernorm (hidden), dense_h_to_4h
// (2 ffn, hidden) = [gate; up], dense_4h_to_h (hidden, ffn). caches: k and v per layer, (blocks, BS, KVH, D) fp32,
// written at `slots` (M,). tables (M, W) int32/int64; lens (M,) int64 including the new token; cos/sin
// (M, rotary_dim / 2). Returns the last block's output (M, hidden).
torch::Tensor decode_layers(const torch::Tensor& h, const std::vector<torch::Tensor>& weights,
                            const std::vector<torch::Tensor>& caches, const torch::Tensor& slots,
                            const torch::Tensor& tables, const torch::Tensor& lens, const torch::Tensor& cos,
                            const torch::Tensor& sin, int64_t heads, int64_t kv_heads, int64_t rotary_dim,
                            double eps, double scale) {
  TORCH_CHECK(h.dim() == 2, "decode_layers: h must be (M, hidden)");
  const int64_t L = int64_t(weights.size()) / 7;
  TORCH_CHECK(L >= 1 && int64_t(weights.size()) == 7 * L && int64_t(caches.size()) == 2 * L,
              "decode_layers: 7 weights and 2 caches per layer, got ", weights.size(), " and ", caches.size());
  TORCH_CHECK(caches[0].dim() == 4, "decode_layers: caches must be (blocks, block_size, KV heads, head_dim)");
  const int64_t M = h.size(0), hidden = h.size(1), D = caches[0].size(3), BS = caches[0].size(1);
  TORCH_CHECK(M >= 1 && M <= glm4k::kMaxRows, "decode_layers: 1 to ", glm4k::kMaxRows, " sequences, got ", M);
  TORCH_CHECK(caches[0].size(2) == kv_heads && heads % kv_heads == 0 && D % 16 == 0 && rotary_dim % 2 == 0 &&
              rotary_dim <= D, "decode_layers: bad head layout (heads ", heads, ", KV heads ", kv_heads,
              ", head_dim ", D, ", rotary_dim ", rotary_dim, ")");
  const int64_t q_size = heads * D, width = q_size + 2 * kv_heads * D, ffn = weights[6].size(-1);
  const int64_t blocks = caches[0].size(0);
  check_f32(h, "h", {M, hidden});
  std::vector<LayerWeights> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* w = &weights[7 * l];
    const std::string at = "layer " + std::to_string(l) + " ";
    check_f32(w[0], (at + "input_layernorm.weight").c_str(), {hidden});
    check_f32(w[1], (at + "query_key_value.weight").c_str(), {width, hidden});
    if (w[2].numel()) check_f32(w[2], (at + "query_key_value.bias").c_str(), {width});
    check_f32(w[3], (at + "dense.weight").c_str(), {hidden, q_size});
    check_f32(w[4], (at + "post_attention_layernorm.weight").c_str(), {hidden});
    check_f32(w[5], (at + "dense_h_to_4h.weight").c_str(), {2 * ffn, hidden});
    check_f32(w[6], (at + "dense_4h_to_h.weight").c_str(), {hidden, ffn});
    check_f32(caches[2 * l], (at + "k_cache").c_str(), {blocks, BS, kv_heads, D});
    check_f32(caches[2 * l + 1], (at + "v_cache").c_str(), {blocks, BS, kv_heads, D});
    layers[l] = {w[0].data_ptr<float>(), w[1].data_ptr<float>(), w[2].numel() ? w[2].data_ptr<float>() : nullptr,
                 w[3].data_ptr<float>(), w[4].data_ptr<float>(), w[5].data_ptr<float>(), w[6].data_ptr<float>(),
                 caches[2 * l].data_ptr<float>(), caches[2 * l + 1].data_ptr<float>()};
  }
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == M &&
              lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == M,
              "decode_layers: slot_mapping and context_lens must be contiguous int64 vectors of ", M);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == M && tables.is_contiguous() &&
              (tables.scalar_type() == at::kLong || tables.scalar_type() == at::kInt),
              "decode_layers: block tables must be a contiguous int32/int64 (M, W) tensor");
  check_f32(cos, "cos", {M, rotary_dim / 2});
  check_f32(sin, "sin", {M, rotary_dim / 2});
  auto opts = h.options();
  const int threads = at::get_num_threads();
  auto x = torch::empty({threads, M, hidden}, opts), mid = torch::empty({M, hidden}, opts);
  auto qkv = torch::empty({M * std::max(width, 2 * ffn)}, opts);
  auto attn = torch::empty({M, q_size}, opts), act = torch::empty({M, ffn}, opts);
  torch::Tensor bufs[2] = {torch::empty({M, hidden}, opts), torch::empty({M, hidden}, opts)};
  Step s{M, hidden, ffn, heads, kv_heads, D, BS, tables.size(1), rotary_dim, float(eps), float(scale),
         slots.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
         x.data_ptr<float>(), qkv.data_ptr<float>(), attn.data_ptr<float>(), mid.data_ptr<float>(),
         act.data_ptr<float>()};
  const float* h0 = h.data_ptr<float>();
  float* out[2] = {bufs[0].data_ptr<float>(), bufs[1].data_ptr<float>()};
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(sp[m] >= 0 && sp[m] < blocks * BS, "decode_layers: slot ", sp[m], " of row ", m,
                " is outside the cache's ", blocks * BS, " slots");
  auto run = [&](auto* table_ptr) {
    glm4k::check_paged_inputs("decode_layers", table_ptr, tables.size(1), s.lens, M, BS, blocks);
    // One parallel region for the whole stack: layer l reads the previous layer's output buffer and writes the
    // other one (each layer ends with a barrier).
#pragma omp parallel num_threads(threads)
    for (int64_t l = 0; l < L; ++l) layer_body(s, layers[l], table_ptr, l == 0 ? h0 : out[(l + 1) % 2], out[l % 2]);
  };
  if (tables.scalar_type() == at::kLong) run(tables.data_ptr<int64_t>()); else run(tables.data_ptr<int32_t>());
  return bufs[(L - 1) % 2];
}
