"""Layer level: sharded models in real gloo process groups equal the tp=1 model, and each rank holds ~1/tp.

One spawn of 4 processes covers tp=4 (all of them) and tp=2 (ranks 0 and 1 in a second group), for both
checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm4.config import GLM4Config
from glm4.distributed import get_free_port
from glm4.weights import load_model

from .conftest import LAYOUTS

pytestmark = pytest.mark.slow
WORLD = 4


def _input_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (3, 11), generator=g)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _rank_main(rank: int, ports: tuple[int, int], ckpts: dict[str, str], out_dir: str) -> None:
    from glm4.distributed import destroy_tp_group, init_tp_group

    torch.set_num_threads(1)
    groups = {WORLD: init_tp_group(rank, WORLD, "127.0.0.1", ports[0], "gloo", timeout=120)}
    if rank < 2:  # ranks 0 and 1 also form a tp=2 group, held at the same time as the tp=4 one
        groups[2] = init_tp_group(rank, 2, "127.0.0.1", ports[1], "gloo", timeout=120)
    tensors = {}  # exchanged through safetensors: the project never unpickles, not even its own test data
    for layout, path in ckpts.items():
        for size, tp in groups.items():
            model = load_model(path, dtype=torch.float32, tp_rank=rank, tp_size=size, tp_group=tp.group)
            with torch.inference_mode():
                logits = model(_input_ids(model.config.vocab_size))
            tensors[f"{layout}/{size}/logits"] = logits.contiguous()
            tensors[f"{layout}/{size}/bytes"] = torch.tensor([_param_bytes(model)], dtype=torch.int64)
    save_file(tensors, f"{out_dir}/rank{rank}.safetensors")
    for tp in groups.values():
        destroy_tp_group(tp)


@pytest.fixture(scope="module")
def rank_results(tp_checkpoints, tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp-layers")
    ckpts = {k: str(v) for k, v in tp_checkpoints.items()}
    mp.start_processes(_rank_main, args=((get_free_port(), get_free_port()), ckpts, str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    results: dict[int, dict] = {}
    for r in range(WORLD):
        loaded = load_file(str(out / f"rank{r}.safetensors"))
        results[r] = {}
        for key, value in loaded.items():
            layout, size, what = key.split("/")
            results[r].setdefault((layout, int(size)), {})[what] = int(value) if what == "bytes" else value
    return results


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tp_size", [2, 4])
def test_sharded_logits_equal_tp1(rank_results, tp_checkpoints, layout, tp_size):
    ref_model = load_model(tp_checkpoints[layout], dtype=torch.float32)
    with torch.inference_mode():
        ref = ref_model(_input_ids(ref_model.config.vocab_size))
    for rank in range(tp_size):
        got = rank_results[rank][(layout, tp_size)]["logits"]
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-5, f"tp={tp_size} rank {rank} ({layout}): max |logit diff| {diff:.3g}"


def _expected_rank_bytes(c: GLM4Config, tp: int, elem: int = 4) -> tuple[int, int]:
    """(total parameter bytes of the model, bytes one rank must hold), from the config alone."""
    h, d, L = c.hidden_size, c.head_dim, c.num_layers
    q_rows, kv_rows = c.num_attention_heads * d, c.num_kv_heads * d
    bias = 1 if c.add_qkv_bias else 0
    norms = (2 * L + 1) * h  # replicated on every rank
    split = (2 * c.vocab_size * h  # embedding + LM head (vocabulary-parallel)
             + L * (q_rows * (h + bias)  # query heads
                    + q_rows * h  # attention output (row-parallel)
                    + 2 * c.ffn_hidden_size * h  # gate/up (column-parallel)
                    + c.ffn_hidden_size * h))  # down (row-parallel)
    kv_total = L * 2 * kv_rows * (h + bias)
    kv_heads_per_rank = max(c.num_kv_heads // tp, 1)  # replicated once tp exceeds the KV heads
    kv_rank = L * 2 * kv_heads_per_rank * d * (h + bias)
    return (split + kv_total + norms) * elem, (split // tp + kv_rank + norms) * elem


@pytest.mark.parametrize("tp_size", [2, 4])
def test_per_rank_parameter_bytes(rank_results, tp_checkpoints, tp_size):
    c = GLM4Config.from_json(tp_checkpoints["chatglm"] / "config.json")
    total, expected = _expected_rank_bytes(c, tp_size)
    assert _param_bytes(load_model(tp_checkpoints["chatglm"], dtype=torch.float32)) == total
    for layout in LAYOUTS:
        for rank in range(tp_size):
            got = rank_results[rank][(layout, tp_size)]["bytes"]
            # total/tp plus the replicated norms and (at tp > num_kv_heads) the replicated KV heads
            assert abs(got - expected) <= 0.03 * expected, (layout, rank, got, expected, total / tp_size)
            assert got < total / tp_size * 1.5, "a rank holds far more than its share"


@pytest.mark.parametrize("tp_size", [2, 4, 8])
def test_glm4_9b_shard_is_about_one_tp_th(tp_size):
    """The real GLM-4-9B shape, built on the meta device (no memory, no group): a rank holds total/tp within a
    few percent (norms and, beyond 2 ranks, the 2 KV heads are replicated)."""
    from glm4.config import preset
    from glm4.model import GLM4ForCausalLM

    c = preset("glm-4-9b")
    total, expected = _expected_rank_bytes(c, tp_size)
    for rank in (0, tp_size - 1):
        with torch.device("meta"):
            m = GLM4ForCausalLM(c, tp_rank=rank, tp_size=tp_size, dtype=torch.float32)
        got = _param_bytes(m)
        assert got == expected
        assert got <= total / tp_size * 1.03, (got, total / tp_size)
