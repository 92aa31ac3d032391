"""The engine end to end on a real (tiny, random) GLM-4 checkpoint: correctness against transformers, batch
invariance, preemption, sampling reproducibility, stop conditions, abort and per-request errors."""

from __future__ import annotations

import random

import pytest
import torch

import glm4
from glm4 import SamplingParams
from glm4.tools.make_checkpoint import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def ckpt_hf(tmp_path_factory):
    """tiny preset, HF layout, float32 weights: loadable by transformers and by us."""
    return make_checkpoint(tmp_path_factory.mktemp("eng") / "tiny-hf", "tiny", layout="glm", seed=3,
                           dtype="float32", num_shards=1)


@pytest.fixture(scope="module")
def llm(ckpt_hf):
    return glm4.LLM(ckpt_hf, max_num_seqs=64, max_num_batched_tokens=512, block_size=8)


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_greedy_matches_transformers_generate(ckpt_hf, llm):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GlmForCausalLM.from_pretrained(str(ckpt_hf), dtype=torch.float32).eval()
    prompts = _prompts(8, seed=1, lo=2, hi=120)  # mixed lengths, run as one batch by us
    ours = llm.generate(prompts, GREEDY)
    stop = list(llm.engine.stop_token_ids)
    for p, out in zip(prompts, ours):
        with torch.no_grad():  # transformers runs each prompt alone
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=stop,
                              pad_token_id=stop[0])[0, len(p):].tolist()
        assert out.token_ids == ref, f"prompt of {len(p)} tokens: ours {out.token_ids} vs transformers {ref}"
        assert out.finish_reason == ("stop" if ref[-1] in stop else "length")


def _tokens(outs):
    return [o.token_ids for o in outs]


def test_batch_invariance_alone_pair_and_crowd(ckpt_hf, llm):
    prompts = _prompts(31, seed=2)
    crowd = _tokens(llm.generate(prompts, GREEDY))
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts[:4]]
    pair = _tokens(llm.generate(prompts[:2], GREEDY))
    assert alone == crowd[:4]
    assert pair == crowd[:2]


def test_batch_invariance_prefix_hits_small_chunks_and_preemption(ckpt_hf, llm):
    shared = _prompts(1, seed=9, lo=40, hi=41)[0]
    prompts = [shared + p for p in _prompts(30, seed=4, lo=3, hi=30)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = [llm.generate([p], params)[0].token_ids for p in prompts[:3]]

    # prefix-cache hits: the shared 40-token prefix is cached after the first request
    before = llm.stats()["prefix_cache_hit_tokens"]
    hits = _tokens(llm.generate(prompts, params))
    assert llm.stats()["prefix_cache_hit_tokens"] > before
    assert hits[:3] == reference

    # chunked prefill forced small, no prefix caching
    small = glm4.LLM(ckpt_hf, max_num_seqs=64, max_num_batched_tokens=7, block_size=8,
                     enable_prefix_caching=False)
    assert _tokens(small.generate(prompts[:3], params)) == reference

    # a KV budget so tight that sequences get preempted and recomputed
    per_block = 2 * 2 * 8 * 2 * 16 * 4  # layers * (k, v) * block_size * kv_heads * head_dim * fp32
    tight = glm4.LLM(ckpt_hf, max_num_seqs=64, max_num_batched_tokens=512, block_size=8,
                     kv_cache_memory=40 * per_block)
    assert tight.engine.executor.num_blocks == 40
    out = _tokens(tight.generate(prompts, params))
    assert tight.stats()["num_preemptions"] > 0, "the budget was meant to force preemption"
    assert out == hits


def test_seeded_sampling_reproducible_across_batches(llm):
    prompts = _prompts(12, seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompts[0]], params)[0].token_ids
    crowd = llm.generate(prompts, [params] + [SamplingParams(temperature=0.7, max_tokens=16)] * 11)
    assert crowd[0].token_ids == alone
    other_seed = llm.generate([prompts[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                           ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_n_samples_are_independent(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12,
                                                  ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_every_default_stop_id_ends_generation(llm):
    stop_ids = llm.engine.stop_token_ids
    assert len(stop_ids) == 3
    prompts = _prompts(120, seed=6, lo=2, hi=12)
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    seen = set()
    for p, out in zip(prompts, free):
        hit = next((i for i, t in enumerate(out.token_ids) if t in stop_ids), None)
        if hit is None:
            continue
        stopped = llm.generate([p], SamplingParams(temperature=0, max_tokens=40))[0]
        assert stopped.token_ids == out.token_ids[:hit + 1]
        assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == out.token_ids[hit]
        seen.add(out.token_ids[hit])
    assert seen == set(stop_ids), f"only saw stop ids {seen} in the sample; extend the prompt set"


def test_stop_string_truncates_and_finishes(llm):
    p = [10, 20, 30, 40]
    full = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = full.text
    stop = text[8:10]
    expected = text[:text.find(stop)]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop, "\x00\x00"]))[0]
    assert out.text == expected and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop


def test_min_and_max_tokens(llm):
    out = llm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    out = llm.generate([[1, 2]], SamplingParams(temperature=0, min_tokens=10, max_tokens=12,
                                                stop_token_ids=list(range(256))))[0]
    assert len(out.token_ids) >= 10


def test_logprobs_returned(llm):
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) >= 3
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token


def test_per_request_errors_do_not_stop_the_batch(llm):
    too_long = list(range(200)) * 20  # 4000 tokens > max_position_embeddings 2048
    outs = llm.generate([[1, 2, 3], too_long, [], [999999], [4, 5, 6]],
                        [GREEDY, GREEDY, GREEDY, GREEDY, SamplingParams(top_p=7.0)])
    assert outs[0].error is None and outs[0].finish_reason in ("stop", "length")
    assert "max_model_len" in outs[1].error and outs[1].finish_reason == "error"
    assert "empty" in outs[2].error
    assert "outside the vocabulary" in outs[3].error
    assert "top_p" in outs[4].error


def test_abort_frees_blocks(ckpt_hf):
    engine = glm4.LLMEngine.from_pretrained(ckpt_hf, block_size=8)
    free0 = engine.stats()["kv_blocks_free"]
    engine.add_request("a", list(range(50)), SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_free"] < free0
    assert engine.abort("a")
    final = engine.step()
    assert final[0].finish_reason == "abort" and final[0].finished
    assert engine.stats()["kv_blocks_free"] == free0 and not engine.has_unfinished()


def test_engine_options_validated(ckpt_hf):
    with pytest.raises(TypeError, match="unknown engine option"):
        glm4.LLM(ckpt_hf, max_num_seq=3)
    with pytest.raises(ValueError, match="max_num_seqs"):
        glm4.LLM(ckpt_hf, max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        glm4.LLM(ckpt_hf, kv_cache_memory=10)
    with pytest.raises(ValueError, match="max_model_len"):
        glm4.LLM(ckpt_hf, max_model_len=10**6)
    with pytest.raises(ValueError, match="enforce_eager"):
        glm4.LLM(ckpt_hf, enforce_eager="yes")


def test_text_prompts_and_chat(ckpt_hf, llm):
    a = llm.generate("hello", GREEDY)[0]
    b = llm.generate([llm.tokenizer.encode_prompt("hello")], GREEDY)[0]
    assert a.token_ids == b.token_ids and a.prompt_token_ids[:2] == list(llm.tokenizer.prefix_ids)
    c = llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0]
    assert c.prompt_token_ids == llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    bad = llm.chat([[{"role": "wizard", "content": "hi"}]], GREEDY)[0]
    assert bad.finish_reason == "error" and "role" in bad.error


def test_outputs_report_prefix_cache_hits(llm):
    shared = list(range(1, 65))  # 8 full blocks of 8 tokens
    llm.generate([shared + [70]], GREEDY)
    out = llm.generate([shared + [71, 72]], GREEDY)[0]
    assert out.num_cached_tokens == 64, out.num_cached_tokens


@pytest.mark.parametrize("mode", ["streaming", "all_final_only", "some_final_only"])
def test_final_only_outputs_each_request_once_when_done(ckpt_hf, llm, mode):
    """Batch callers (LLM.generate, the async engine's batch rows and non-streaming HTTP calls) add requests with
    `final_only=True`: no incremental outputs for them, each exactly once, finished, with the same result as the
    streaming outputs' last one. The flag is per request: the others keep streaming."""
    engine = glm4.LLMEngine.from_pretrained(ckpt_hf, block_size=8)
    final_only = {"short": mode != "streaming", "long": mode == "all_final_only", "bad": mode != "streaming"}
    for rid, n in (("short", 3), ("long", 9)):
        engine.add_request(rid, [5, 6, 7], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                           final_only=final_only[rid])
    engine.add_request("bad", [5], SamplingParams(temperature=0, top_p=0.0), final_only=final_only["bad"])  # fails
    seen = []
    while engine.has_unfinished():
        seen += engine.step()
    count = {rid: sum(o.request_id == rid for o in seen) for rid in final_only}
    if mode == "all_final_only":
        assert count == {"short": 1, "long": 1, "bad": 1} and all(o.finished for o in seen)
    elif mode == "some_final_only":
        assert count["short"] == 1 and count["bad"] == 1 and count["long"] == 9  # "long" still streams
    else:
        assert count["short"] == 3 and count["long"] == 9 and count["bad"] == 1
    final = {o.request_id: (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.error) for o in seen if o.finished}
    assert final["short"][1:] == ("length", None) and len(final["short"][0]) == 3
    assert len(final["long"][0]) == 9 and final["bad"][1] == "error"
    reference = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))[0].token_ids
    assert final["long"][0] == reference and final["short"][0] == reference[:3]
    # the timestamps a final-only caller needs for time to first token
    for o in seen:
        if o.finished and o.request_id != "bad":
            assert o.arrival_time <= o.first_token_time
