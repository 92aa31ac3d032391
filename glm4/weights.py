"""Strict, memory-mapped safetensors loading of GLM-4 checkpoints in both published layouts.

* original THUDM layout ("chatglm"): `transformer.encoder.layers.N.self_attention.query_key_value.weight`, ...
* transformers layout ("glm"): `model.layers.N.self_attn.q_proj.weight`, ...
Both are loaded single-file or sharded (`model.safetensors.index.json`). The model is built on the meta device and
materialised empty on the target device, then each tensor is read slice by slice (only this tensor-parallel
rank's rows/columns) and converted to the target dtype on the way, so peak memory is about one copy of the
(per-rank) weights. Every inconsistency raises `CheckpointError` naming the file and the tensor. Nothing is ever
unpickled: `.bin`/`.pt`/`.pth` checkpoints are refused.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from glm4.config import GLM4Config
from glm4.model import GLM4ForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DROPPED = {"transformer.rotary_pos_emb.inv_freq"}  # recomputed, never loaded


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor at fault."""


# ---- name mapping ------------------------------------------------------------------------------------------------

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", None),
    "self_attn.q_proj.weight": ("self_attention.query_key_value.weight", "q"),
    "self_attn.k_proj.weight": ("self_attention.query_key_value.weight", "k"),
    "self_attn.v_proj.weight": ("self_attention.query_key_value.weight", "v"),
    "self_attn.q_proj.bias": ("self_attention.query_key_value.bias", "q"),
    "self_attn.k_proj.bias": ("self_attention.query_key_value.bias", "k"),
    "self_attn.v_proj.bias": ("self_attention.query_key_value.bias", "v"),
    "self_attn.o_proj.weight": ("self_attention.dense.weight", None),
    "mlp.gate_up_proj.weight": ("mlp.dense_h_to_4h.weight", None),
    "mlp.down_proj.weight": ("mlp.dense_4h_to_h.weight", None),
}
_HF_GLOBAL = {
    "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}


def map_checkpoint_name(name: str) -> tuple[str, str | None] | None:
    """Checkpoint tensor name (either layout) -> (model parameter name, shard id), or None if it is dropped.
    Raises KeyError for a name that belongs to neither layout."""
    if name in DROPPED:
        return None
    if name.startswith("transformer."):
        return name, None
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name], None
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_LAYER_MAP:
        target, shard = _HF_LAYER_MAP[m.group(2)]
        return f"transformer.encoder.layers.{m.group(1)}.{target}", shard
    raise KeyError(name)


def checkpoint_tensor_shapes(config: GLM4Config, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete checkpoint of `config` holds in `layout` (without the unused inv_freq)."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    out: dict[str, tuple[int, ...]] = {}
    if layout == "chatglm":
        out["transformer.embedding.word_embeddings.weight"] = (v, h)
        for i in range(config.num_layers):
            p = f"transformer.encoder.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attention.query_key_value.weight"] = (q + 2 * kv, h)
            if config.add_qkv_bias:
                out[p + "self_attention.query_key_value.bias"] = (q + 2 * kv,)
            out[p + "self_attention.dense.weight"] = (h, q)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.dense_h_to_4h.weight"] = (2 * f, h)
            out[p + "mlp.dense_4h_to_h.weight"] = (h, f)
        out["transformer.encoder.final_layernorm.weight"] = (h,)
        out["transformer.output_layer.weight"] = (v, h)
    elif layout == "glm":
        out["model.embed_tokens.weight"] = (v, h)
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            for s, n in (("q", q), ("k", kv), ("v", kv)):
                out[p + f"self_attn.{s}_proj.weight"] = (n, h)
                if config.add_qkv_bias:
                    out[p + f"self_attn.{s}_proj.bias"] = (n,)
            out[p + "self_attn.o_proj.weight"] = (h, q)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate_up_proj.weight"] = (2 * f, h)
            out[p + "mlp.down_proj.weight"] = (h, f)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (v, h)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return out


# ---- files -------------------------------------------------------------------------------------------------------

def checkpoint_files(ckpt_dir: str | Path) -> dict[str, list[str]]:
    """Shard file -> tensor names it must hold (from the index, or the single file's own header)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        files: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            files[file].append(name)
        for file in files:
            _refuse_pickle(d / file)
            if not file.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard {file!r} is not a .safetensors file")
            if not (d / file).is_file():
                raise CheckpointError(f"{d / file}: shard listed in {INDEX_FILE} is missing "
                                      f"(holds e.g. tensor {files[file][0]!r})")
        return dict(files)
    if (d / SINGLE_FILE).is_file():
        return {SINGLE_FILE: _header_keys(d / SINGLE_FILE)}
    for p in sorted(d.iterdir()):
        _refuse_pickle(p)
    raise CheckpointError(f"{d}: no {INDEX_FILE} or {SINGLE_FILE} found")


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: refusing to load a pickle-based checkpoint file (it can execute code); "
                              "convert it to safetensors first")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _header_keys(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


class SafetensorsSource:
    """A lazily sliced tensor of a safetensors file (reads only the requested rows/columns)."""

    def __init__(self, handle, name: str, path: Path) -> None:
        self._slice = handle.get_slice(name)
        self.name, self.path = name, path
        self.shape = tuple(self._slice.get_shape())

    def read(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        r = slice(*rows) if rows else slice(None)
        try:
            if len(self.shape) == 1:
                return self._slice[r]
            return self._slice[r, slice(*cols) if cols else slice(None)]
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.name!r}: {e}") from e


# ---- loading -----------------------------------------------------------------------------------------------------

def _default_loader(param: torch.nn.Parameter, src, shard_id: str | None = None) -> None:
    if tuple(src.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: checkpoint has {list(src.shape)}, model expects {list(param.shape)}")
    with torch.no_grad():
        param.copy_(src.read().to(param.dtype))


def load_weights(model: GLM4ForCausalLM, ckpt_dir: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint; strict in both directions."""
    d = Path(ckpt_dir)
    files = checkpoint_files(d)
    params = dict(model.named_parameters())
    loaded: dict[str, set[str | None]] = defaultdict(set)
    layout_seen: set[str] = set()
    for file, names in files.items():
        path = d / file
        with _open(path) as handle:
            present = set(handle.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path}: tensor {name!r} listed in {INDEX_FILE} is not in this file")
            for name in sorted(present - set(names)):
                raise CheckpointError(f"{path}: unexpected tensor {name!r} (not listed in {INDEX_FILE})")
            for name in names:
                try:
                    mapped = map_checkpoint_name(name)
                except KeyError:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r} (not a GLM-4 tensor name)") from None
                if mapped is None:
                    continue
                layout_seen.add("chatglm" if name.startswith("transformer.") else "glm")
                target, shard = mapped
                if target not in params:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r}: the model "
                                          f"({model.config.num_layers} layers) has no parameter {target!r}")
                module_name, _, attr = target.rpartition(".")
                module = model.get_submodule(module_name)
                loader = getattr(module, "weight_loader", _default_loader)
                try:
                    loader(getattr(module, attr), SafetensorsSource(handle, name, path), shard)
                except CheckpointError:
                    raise
                except ValueError as e:
                    raise CheckpointError(f"{path}: tensor {name!r}: {e}") from e
                loaded[target].add(shard)
    if len(layout_seen) > 1:
        raise CheckpointError(f"{d}: checkpoint mixes the original ('transformer.*') and HF ('model.*') layouts")
    layout = layout_seen.pop() if layout_seen else model.config.layout
    _check_complete(model, loaded, layout, d)


def _check_complete(model: GLM4ForCausalLM, loaded: dict[str, set], layout: str, d: Path) -> None:
    expected: dict[str, set[str | None]] = defaultdict(set)
    names_for: dict[str, list[str]] = defaultdict(list)
    for name in checkpoint_tensor_shapes(model.config, layout):
        target, shard = map_checkpoint_name(name)  # type: ignore[misc]
        expected[target].add(shard)
        names_for[target].append(name)
    for target, shards in expected.items():
        if not shards <= loaded.get(target, set()):
            missing = [n for n in names_for[target]
                       if map_checkpoint_name(n)[1] not in loaded.get(target, set())]  # type: ignore[index]
            raise CheckpointError(f"{d}: missing tensor {missing[0]!r} (needed for parameter {target!r})")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (the checkpoint's own dtype); fp32 on CPU (exact, and fp16 has no fast CPU kernels)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(ckpt_dir: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               tp_rank: int = 0, tp_size: int = 1, tp_group: dist.ProcessGroup | None = None) -> GLM4ForCausalLM:
    """Build GLM-4 from a checkpoint directory (either layout) and return it in eval mode on `device`."""
    config = GLM4Config.from_json(Path(ckpt_dir) / "config.json")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = GLM4ForCausalLM(config, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, dtype=dtype)
    model.to_empty(device=device)
    load_weights(model, ckpt_dir)
    return model.eval()
