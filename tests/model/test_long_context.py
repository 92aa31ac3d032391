"""Long contexts on GLM-4's attention shape (32 query heads over 2 KV heads of 128): greedy tokens after a 16K-token
prompt with GLM-4-9B-Chat's rope_ratio 500 equal transformers', and attention's working memory does not grow with
the context (the old path built a (queries x keys) mask per chunk: 1 GiB at 32K context)."""

from __future__ import annotations

import pytest
import torch

from glm4.kernels import cpu
from glm4.layers.attention import AttentionMetadata, paged_attention
from glm4.peak_memory import PeakMemory

transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128  # GLM-4-9B's attention layout


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A 2-layer GLM of GLM-4's attention shape with GLM-4-9B-Chat's rope (theta 10000 * rope_ratio 500, 128K),
    saved by transformers in the HF `glm` layout."""
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    cfg = GlmConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                    partial_rotary_factor=0.5, rope_theta=10000.0 * 500, max_position_embeddings=131072,
                    rms_norm_eps=1.5625e-07, attention_bias=True, pad_token_id=0, eos_token_id=[1],
                    bos_token_id=None, tie_word_embeddings=False)
    model = GlmForCausalLM(cfg).eval()
    with torch.no_grad():  # make biases and norms matter, and keep attention far from uniform at 16K positions
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "k_proj" in name or "q_proj" in name:
                p.mul_(4.0)
    out = tmp_path_factory.mktemp("long") / "glm-long"
    model.save_pretrained(out, safe_serialization=True)
    return model, out


def test_greedy_tokens_after_16k_prompt_equal_transformers(long_model):
    import glm4

    hf, path = long_model
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, 512, (16 * 1024 + 37,), generator=g)  # not a multiple of the block size
    new = 3
    with glm4.LLM(path, dtype="float32", max_num_batched_tokens=2048, max_model_len=17 * 1024,
                  kv_cache_memory=256 << 20, enforce_eager=True) as llm:
        out = llm.generate([prompt.tolist()], glm4.SamplingParams(temperature=0, max_tokens=new, ignore_eos=True,
                                                                 logprobs=0))[0]
    # One transformers forward over the prompt and our tokens (SDPA, causal): greedy means each of our tokens is
    # the argmax at the position before it.
    with torch.no_grad():
        ids = torch.cat([prompt, torch.tensor(out.token_ids[:-1])])[None]
        logits = hf(ids, logits_to_keep=new).logits[0].float()
    want = logits.argmax(-1).tolist()
    want_lp = [float(lp[t]) for lp, t in zip(torch.log_softmax(logits, -1), want)]
    assert out.token_ids == want
    got_lp = [lp[t] for lp, t in zip(out.outputs[0].logprobs, out.token_ids)]
    assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_chunk_working_memory_independent_of_context(monkeypatch):
    """A 512-token prefill chunk behind a cached context of 2K, 8K and 32K tokens: the peak memory attention holds
    beyond its inputs stays flat (tiles of bounded size). The old path built a 512 x context x 16-head mask
    (256 MiB at 32K), gathered copies of K/V, and SDPA's 2 GiB of scores on top."""
    monkeypatch.setattr(cpu, "can_attend", lambda q, k: False)
    bs, chunk = 16, 512
    peaks = {}
    for ctx in (2048, 8192, 32768):
        nb = ctx // bs
        k_cache = torch.randn(nb, bs, KV_HEADS, HEAD_DIM)
        v_cache = torch.randn(nb, bs, KV_HEADS, HEAD_DIM)
        q = torch.randn(chunk, HEADS, HEAD_DIM)
        meta = AttentionMetadata(slot_mapping=torch.zeros(chunk, dtype=torch.long),
                                 block_tables=torch.randperm(nb)[None], context_lens=torch.tensor([ctx]),
                                 query_lens=[chunk], context_lens_list=[ctx], block_size=bs)
        with PeakMemory("cpu") as pm:
            out = paged_attention(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
        assert torch.isfinite(out).all()
        peaks[ctx] = pm.peak_bytes
        del k_cache, v_cache, q, out
    assert peaks[32768] <= 1.25 * peaks[2048] + (16 << 20), peaks
    assert peaks[32768] < 256 << 20, peaks
