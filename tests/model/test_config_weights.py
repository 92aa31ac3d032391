"""Config parsing, the 9B name mapping and parameter count, and every bad-checkpoint case naming its culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm4.config import ConfigError, GLM4Config, preset
from glm4.model import GLM4ForCausalLM
from glm4.tools.make_checkpoint import make_checkpoint
from glm4.weights import CheckpointError, checkpoint_tensor_shapes, load_model, map_checkpoint_name


def test_real_configs_parse(real_tokenizer_dir: Path):
    base = GLM4Config.from_json(real_tokenizer_dir / "glm-4-9b-base" / "config.json")
    assert base == preset("glm-4-9b", torch_dtype="bfloat16", layout="chatglm")
    assert base.rope_theta == 10000.0 and base.rotary_dim == 64 and base.num_kv_heads == 2
    chat = GLM4Config.from_json(real_tokenizer_dir / "glm-4-9b-chat" / "config.json")
    assert chat.rope_theta == 10000.0 * 500 and chat.max_position_embeddings == 131072


def test_hf_config_forms_agree():
    hf = dict(model_type="glm", hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
              num_key_value_heads=2, head_dim=128, intermediate_size=13696, vocab_size=151552,
              max_position_embeddings=8192, rms_norm_eps=1.5625e-07, attention_bias=True, rope_theta=10000.0)
    legacy = GLM4Config.from_dict(hf)
    modern = GLM4Config.from_dict({**{k: v for k, v in hf.items() if k != "rope_theta"},
                                   "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                                       "rope_type": "default"}})
    assert legacy == modern
    assert legacy.replace(layout="chatglm") == preset("glm-4-9b", torch_dtype="bfloat16", layout="chatglm")
    # round trip through both writers
    for layout in ("chatglm", "glm"):
        assert GLM4Config.from_dict(legacy.to_dict(layout)) == legacy.replace(layout=layout)


@pytest.mark.parametrize("data, culprit", [
    ({"model_type": "llama"}, "unknown architecture"),
    ({"model_type": "glm4"}, "glm4"),
    ({"model_type": "chatglm", "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 8,
      "padded_vocab_size": 8}, "num_layers"),
    ({"model_type": "glm", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
      "vocab_size": 8}, "intermediate_size"),
    ({"model_type": "glm", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
      "vocab_size": 8, "intermediate_size": 8, "rope_parameters": {"rope_type": "yarn"}}, "RoPE"),
])
def test_bad_configs_name_the_key(data, culprit):
    with pytest.raises(ConfigError, match=culprit):
        GLM4Config.from_dict(data)


def test_real_index_fully_mapped(real_tokenizer_dir: Path):
    """Every one of the 284 tensors in the real 9B index maps to a parameter, and every parameter is covered."""
    index = json.loads((real_tokenizer_dir / "glm-4-9b-base" / "model.safetensors.index.json").read_text())
    names = list(index["weight_map"])
    assert len(names) == 284
    config = GLM4Config.from_json(real_tokenizer_dir / "glm-4-9b-base" / "config.json")
    with torch.device("meta"):
        model = GLM4ForCausalLM(config, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    targets = {map_checkpoint_name(n)[0] for n in names if map_checkpoint_name(n) is not None}
    assert targets == set(params), (set(params) ^ targets)
    assert set(names) - set(checkpoint_tensor_shapes(config, "chatglm")) == {"transformer.rotary_pos_emb.inv_freq"}


def test_9b_parameter_count_on_meta(real_tokenizer_dir: Path):
    config = GLM4Config.from_json(real_tokenizer_dir / "glm-4-9b-base" / "config.json")
    with torch.device("meta"):
        model = GLM4ForCausalLM(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n == 9_399_951_360 == config.num_parameters()
    index = json.loads((real_tokenizer_dir / "glm-4-9b-base" / "model.safetensors.index.json").read_text())
    assert n * 2 == index["metadata"]["total_size"] - 64  # less the unused bf16 inv_freq [32]


def test_both_layouts_of_same_seed_are_the_same_model(tmp_path: Path):
    a = make_checkpoint(tmp_path / "a", "tiny", layout="chatglm", num_shards=3, dtype="float32")
    b = make_checkpoint(tmp_path / "b", "tiny", layout="glm", num_shards=1, dtype="float32")
    ma, mb = load_model(a), load_model(b)
    ids = torch.randint(0, 272, (2, 9))
    with torch.no_grad():
        assert torch.equal(ma(ids), mb(ids))
    assert len(list(a.glob("*.safetensors"))) == 3 and (a / "model.safetensors.index.json").exists()
    assert (b / "model.safetensors").exists()


def test_dtype_conversion_on_load(tiny_checkpoint: Path):
    m = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


# ---- bad checkpoints: each names the file and the tensor ------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "c", "tiny", num_shards=2, dtype="float32")


def _shard_of(ckpt: Path, tensor: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"][tensor]


def _rewrite(path: Path, fn) -> None:
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


LAYER0_QKV = "transformer.encoder.layers.0.self_attention.query_key_value.weight"


def test_missing_tensor(ckpt: Path):
    shard = _shard_of(ckpt, LAYER0_QKV)
    _rewrite(shard, lambda sd: sd.pop(LAYER0_QKV))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][LAYER0_QKV]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{LAYER0_QKV}'"):
        load_model(ckpt)


def test_tensor_listed_but_absent(ckpt: Path):
    shard = _shard_of(ckpt, LAYER0_QKV)
    _rewrite(shard, lambda sd: sd.pop(LAYER0_QKV))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*{LAYER0_QKV}"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt: Path):
    shard = _shard_of(ckpt, LAYER0_QKV)
    _rewrite(shard, lambda sd: sd.update({"transformer.encoder.layers.7.mlp.extra.weight": torch.zeros(2)}))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.encoder.layers.7.mlp.extra.weight"] = shard.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*unexpected tensor 'transformer.encoder.layers.7"):
        load_model(ckpt)


def test_wrong_shape(ckpt: Path):
    shard = _shard_of(ckpt, LAYER0_QKV)
    _rewrite(shard, lambda sd: sd.update({LAYER0_QKV: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*{LAYER0_QKV}.*shape mismatch"):
        load_model(ckpt)


def test_missing_shard(ckpt: Path):
    shard = _shard_of(ckpt, LAYER0_QKV)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing"):
        load_model(ckpt)


def test_truncated_shard(ckpt: Path):
    shard = _shard_of(ckpt, LAYER0_QKV)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}"):
        load_model(ckpt)


def test_pickle_checkpoint_refused(tmp_path: Path, ckpt: Path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle"):
        load_model(d)


def test_index_pointing_at_pickle_refused(ckpt: Path):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"][LAYER0_QKV] = "model-00001-of-00002.bin"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.bin.*pickle"):
        load_model(ckpt)


def test_not_a_safetensors_file(ckpt: Path):
    shard = _shard_of(ckpt, LAYER0_QKV)
    shard.write_bytes(b"PK\x03\x04 this is a zip archive, not safetensors")
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*safetensors"):
        load_model(ckpt)


def test_mixed_layouts_refused(ckpt: Path):
    norm = "transformer.encoder.final_layernorm.weight"
    shard = _shard_of(ckpt, norm)
    _rewrite(shard, lambda sd: sd.update({"model.norm.weight": sd.pop(norm)}))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][norm]
    index["weight_map"]["model.norm.weight"] = shard.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="mixes"):
        load_model(ckpt)
