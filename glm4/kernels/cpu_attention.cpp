// Decode attention straight from the paged KV cache on AVX-512 CPUs: one new query token per sequence.
//
// Why: the torch path gathers each sequence's K/V blocks into a dense padded tensor, builds a key mask and calls
// SDPA: ~10 small ops per layer (most of a batch-1 step's non-matmul time) and a copy of every key and value read.
// Here each (sequence, KV head) task reads its keys once to score the G query heads that share them, takes the
// softmax, then reads its values once. Tasks run on torch's thread pool (at::parallel_for).
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

namespace {

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
  glm4k::check_paged_inputs("paged_decode_attention", tp, W, lp, n, BS, kc.size(0));
  at::parallel_for(0, n * KVH, 1, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task)
      glm4k::attend_task<T, Index>(qp, kp, vp, tp, lp, op, H, KVH, D, BS, W, scale, task);
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
