"""Generate a random GLM-4 checkpoint (any config, either layout, sharded) plus a tokenizer.

    python -m glm4.tools.make_checkpoint --preset tiny --out /tmp/glm4-tiny
    python -m glm4.tools.make_checkpoint --preset small --layout glm --shards 4 --out /tmp/glm4-small
    python -m glm4.tools.make_checkpoint --preset glm-4-9b --tokenizer ../shared/glm4-tokenizer --out /data/glm4-9b-random

Deterministic: each tensor is drawn from its own generator seeded by (seed, tensor name), so the values do not
depend on the layout or the number of shards, and both layouts of the same seed hold the same model. Shards are
written one at a time, so even the full 9B shape needs only about one shard of memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm4.config import GLM4Config, preset
from glm4.weights import INDEX_FILE, checkpoint_tensor_shapes


def _init_tensor(name: str, shape: tuple[int, ...], config: GLM4Config, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    h = config.hidden_size
    if name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * x
    if name.endswith(".bias"):
        return 0.1 * x
    if "word_embeddings" in name:
        return x
    if "output_layer" in name:
        # Logits with a std of a few units: well-separated greedy choices, so tests of batch invariance are not
        # at the mercy of near-ties in a random model.
        return x * (3.0 / h**0.5)
    return x / shape[1] ** 0.5  # matrices: unit-variance activations


def _original_tensors(config: GLM4Config, seed: int):
    for name, shape in checkpoint_tensor_shapes(config, "chatglm").items():
        yield name, _init_tensor(name, shape, config, seed)


def _to_hf(name: str, t: torch.Tensor, config: GLM4Config):
    """Original-layout tensor -> HF-layout tensor(s) (same values; q|k|v split)."""
    if name == "transformer.embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", t
    elif name == "transformer.output_layer.weight":
        yield "lm_head.weight", t
    elif name == "transformer.encoder.final_layernorm.weight":
        yield "model.norm.weight", t
    else:
        i, rest = name.removeprefix("transformer.encoder.layers.").split(".", 1)
        p = f"model.layers.{i}."
        if rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = t.split([config.q_size, config.kv_size, config.kv_size], dim=0)
            yield from ((p + f"self_attn.{s}_proj.{kind}", x.contiguous()) for s, x in zip("qkv", (q, k, v)))
        else:
            yield p + {"self_attention.dense.weight": "self_attn.o_proj.weight",
                       "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
                       "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}.get(rest, rest), t


def make_checkpoint(out_dir: str | Path, preset_name: str = "tiny", *, config: GLM4Config | None = None,
                    layout: str = "chatglm", seed: int = 0, num_shards: int = 2, dtype: str = "bfloat16",
                    tokenizer_path: str | Path | None = None) -> Path:
    """Write config.json, sharded safetensors + index, generation config and tokenizer.model; return out_dir."""
    config = (config or preset(preset_name)).replace(layout=layout, torch_dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    shapes = checkpoint_tensor_shapes(config, "chatglm")
    total = sum(torch.Size(s).numel() for s in shapes.values()) * torch.empty((), dtype=torch_dtype).element_size()
    budget = total / max(1, num_shards)

    # Group original-layout tensors into shards by cumulative size (like save_pretrained's max_shard_size).
    groups: list[list[str]] = [[]]
    size = 0.0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=torch_dtype).element_size()
        if groups[-1] and size + nbytes > budget and len(groups) < num_shards:
            groups.append([])
            size = 0.0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    n = len(groups)
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            t = _init_tensor(name, shapes[name], config, seed).to(torch_dtype)
            pairs = [(name, t)] if layout == "chatglm" else list(_to_hf(name, t, config))
            for k, v in pairs:
                tensors[k] = v
                weight_map[k] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    for stale in out.glob("model*.safetensors"):
        if stale.name not in set(weight_map.values()):
            stale.unlink()
    if n > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    elif (out / INDEX_FILE).exists():
        (out / INDEX_FILE).unlink()
    (out / "config.json").write_text(json.dumps(config.to_dict(layout), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(config.eos_token_ids), "pad_token_id": config.pad_token_id}, indent=2))
    _write_tokenizer(out, config, tokenizer_path)
    return out


def _write_tokenizer(out: Path, config: GLM4Config, tokenizer_path: str | Path | None) -> None:
    from glm4.tokenizer import load_tokenizer, write_byte_level_tokenizer

    if tokenizer_path is not None:
        src = Path(tokenizer_path)
        src = src / "tokenizer.model" if src.is_dir() else src
        shutil.copyfile(src, out / "tokenizer.model")
    else:
        write_byte_level_tokenizer(out / "tokenizer.model")
    tok = load_tokenizer(out)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size} rows; "
                         "use a larger vocab_size or the byte-level tokenizer")
    # The model's eos/pad ids follow the tokenizer's special ids (151329.. for the real file, 256.. for bytes).
    cfg = json.loads((out / "config.json").read_text())
    cfg["eos_token_id"] = list(tok.stop_token_ids)
    cfg["pad_token_id"] = tok.pad_token_id
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(tok.stop_token_ids), "pad_token_id": tok.pad_token_id}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ChatGLM4Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "padding_side": "left", "model_max_length": config.max_position_embeddings}, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="tiny", help="tiny | small | glm-4-9b")
    p.add_argument("--layout", default="chatglm", choices=["chatglm", "glm"],
                   help="original THUDM names (chatglm) or transformers names (glm)")
    p.add_argument("--shards", type=int, default=2, help="number of safetensors shards (1 = single file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--tokenizer", default=None,
                   help="a real tokenizer.model (or its directory); default: byte-level tokenizer")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a GLM4Config field, e.g. --set num_layers=4")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "." in value or "e" in value else int(value)
    config = preset(args.preset, **overrides)
    out = make_checkpoint(args.out, config=config, layout=args.layout, seed=args.seed, num_shards=args.shards,
                          dtype=args.dtype, tokenizer_path=args.tokenizer)
    print(f"wrote {config.num_parameters():,}-parameter {args.preset} checkpoint ({args.layout} layout) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
