"""GLM4Config: the architecture of a GLM-4 (9B family) checkpoint, parsed from either config.json layout.

Two layouts exist for the same weights (see ../shared/docs/glm4-spec.md §2):
  * "chatglm": the original THUDM remote-code config (`num_layers`, `multi_query_group_num`, `kv_channels`,
    `padded_vocab_size`, `rope_ratio`, `seq_length`, ...);
  * "glm": the transformers-native `GlmForCausalLM` config (`num_hidden_layers`, `num_key_value_heads`,
    `head_dim`, `partial_rotary_factor`, `rope_theta` or `rope_parameters`, ...).
Both are normalised into one frozen dataclass whose field names are layout-neutral.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STOP_IDS = (151329, 151336, 151338)


class ConfigError(ValueError):
    """A config.json that does not describe a supported GLM-4 model."""


@dataclass(frozen=True)
class GLM4Config:
    vocab_size: int  # rows of the embedding / output layer (padded; 151552 for GLM-4-9B)
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # leading dims of each head that get (interleaved) RoPE; GLM-4: head_dim // 2
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    add_qkv_bias: bool = True
    eos_token_ids: tuple[int, ...] = DEFAULT_STOP_IDS
    pad_token_id: int = 151329
    torch_dtype: str = "bfloat16"
    layout: str = "chatglm"  # which config.json layout this came from / is written as

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.layout not in ("chatglm", "glm"):
            raise ConfigError(f"layout must be 'chatglm' or 'glm', got {self.layout!r}")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameters of the model we build (no `rotary_pos_emb.inv_freq`: it is recomputed, not loaded)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size if self.add_qkv_bias else 0)
        layer = 2 * h + qkv + self.q_size * h + h * 2 * f + f * h
        return 2 * self.vocab_size * h + self.num_layers * layer + h

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---- parsing / writing ---------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> "GLM4Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GLM4Config":
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type == "chatglm" or any(a.startswith("ChatGLM") for a in archs):
            return _from_chatglm(d)
        if model_type == "glm" or "GlmForCausalLM" in archs:
            return _from_glm(d)
        if model_type == "glm4" or "Glm4ForCausalLM" in archs:
            raise ConfigError("model_type 'glm4' (GLM-4-0414, sandwich norms) is a different architecture and is "
                              "not supported; this project runs GLM-4-9B ('chatglm' or 'glm' model_type)")
        raise ConfigError(f"unknown architecture: model_type={model_type!r}, architectures={archs!r}; "
                          "expected 'chatglm' (THUDM/glm-4-9b) or 'glm' (THUDM/glm-4-9b-hf)")

    def to_dict(self, layout: str | None = None) -> dict[str, Any]:
        """The config.json content in the given layout (default: the layout it was parsed from)."""
        layout = layout or self.layout
        eos = list(self.eos_token_ids)
        if layout == "chatglm":
            return {
                "architectures": ["ChatGLMModel"], "model_type": "chatglm",
                "add_bias_linear": False, "add_qkv_bias": self.add_qkv_bias,
                "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": self.ffn_hidden_size,
                "hidden_size": self.hidden_size, "kv_channels": self.head_dim,
                "layernorm_epsilon": self.rms_norm_eps, "multi_query_attention": True,
                "multi_query_group_num": self.num_kv_heads, "num_attention_heads": self.num_attention_heads,
                "num_layers": self.num_layers, "original_rope": True, "padded_vocab_size": self.vocab_size,
                "post_layer_norm": True, "rmsnorm": True, "rope_ratio": self.rope_theta / 10000.0,
                "seq_length": self.max_position_embeddings, "tie_word_embeddings": False,
                "torch_dtype": self.torch_dtype, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
            }
        if layout == "glm":
            return {
                "architectures": ["GlmForCausalLM"], "model_type": "glm", "attention_bias": self.add_qkv_bias,
                "head_dim": self.head_dim, "hidden_act": "silu", "hidden_size": self.hidden_size,
                "intermediate_size": self.ffn_hidden_size, "max_position_embeddings": self.max_position_embeddings,
                "num_attention_heads": self.num_attention_heads, "num_hidden_layers": self.num_layers,
                "num_key_value_heads": self.num_kv_heads, "rms_norm_eps": self.rms_norm_eps,
                "partial_rotary_factor": self.rotary_dim / self.head_dim, "rope_theta": self.rope_theta,
                "tie_word_embeddings": False, "vocab_size": self.vocab_size, "torch_dtype": self.torch_dtype,
                "eos_token_id": eos, "pad_token_id": self.pad_token_id,
            }
        raise ConfigError(f"layout must be 'chatglm' or 'glm', got {layout!r}")

    def replace(self, **changes: Any) -> "GLM4Config":
        return dataclasses.replace(self, **changes)


def _require(d: dict[str, Any], key: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"missing required key {key!r}")
    return d[key]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _eos(d: dict[str, Any]) -> tuple[int, ...]:
    eos = d.get("eos_token_id", list(DEFAULT_STOP_IDS))
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _from_chatglm(d: dict[str, Any]) -> GLM4Config:
    heads = int(_require(d, "num_attention_heads"))
    hidden = int(_require(d, "hidden_size"))
    # Unsupported variants are refused rather than silently computed wrong.
    _check(not d.get("add_bias_linear", False), "add_bias_linear=true is not supported (GLM-4 has no dense/MLP bias)")
    _check(d.get("rmsnorm", True), "rmsnorm=false (LayerNorm) is not supported")
    _check(d.get("post_layer_norm", True), "post_layer_norm=false is not supported")
    _check(not d.get("apply_residual_connection_post_layernorm", False),
           "apply_residual_connection_post_layernorm=true is not supported")
    _check(not d.get("tie_word_embeddings", False), "tie_word_embeddings=true is not supported")
    head_dim = int(d.get("kv_channels") or hidden // heads)
    kv_heads = int(_require(d, "multi_query_group_num")) if d.get("multi_query_attention", False) else heads
    return GLM4Config(
        vocab_size=int(_require(d, "padded_vocab_size")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(d, "ffn_hidden_size")),
        num_layers=int(_require(d, "num_layers")),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=head_dim // 2,  # the remote code always rotates kv_channels // 2 dims
        rope_theta=10000.0 * float(d.get("rope_ratio", 1.0)),  # base config has no rope_ratio -> 1
        rms_norm_eps=float(d.get("layernorm_epsilon", 1e-5)),
        max_position_embeddings=int(d.get("seq_length", 2048)),
        add_qkv_bias=bool(d.get("add_qkv_bias", False)),
        eos_token_ids=_eos(d),
        pad_token_id=int(d.get("pad_token_id", 151329)),
        torch_dtype=str(d.get("torch_dtype", "bfloat16")),
        layout="chatglm",
    )


def _from_glm(d: dict[str, Any]) -> GLM4Config:
    heads = int(_require(d, "num_attention_heads"))
    hidden = int(_require(d, "hidden_size"))
    _check(d.get("hidden_act", "silu") == "silu", f"hidden_act={d.get('hidden_act')!r} is not supported (silu only)")
    _check(not d.get("tie_word_embeddings", False), "tie_word_embeddings=true is not supported")
    head_dim = int(d.get("head_dim") or hidden // heads)
    rope = d.get("rope_parameters") or {}
    _check(rope.get("rope_type", "default") == "default" and not d.get("rope_scaling"),
           f"only default RoPE is supported, got rope_parameters={rope!r} rope_scaling={d.get('rope_scaling')!r}")
    partial = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)))
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    return GLM4Config(
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(d, "intermediate_size")),
        num_layers=int(_require(d, "num_hidden_layers")),
        num_attention_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        rope_theta=theta,
        rms_norm_eps=float(d.get("rms_norm_eps", 1.5625e-07)),
        max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
        add_qkv_bias=bool(d.get("attention_bias", True)),
        eos_token_ids=_eos(d),
        pad_token_id=int(d.get("pad_token_id", 151329)),
        torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16"))),
        layout="glm",
    )


_GLM4_9B = dict(vocab_size=151552, hidden_size=4096, ffn_hidden_size=13696, num_layers=40, num_attention_heads=32,
                num_kv_heads=2, head_dim=128, rotary_dim=64, rope_theta=10000.0, rms_norm_eps=1.5625e-07,
                max_position_embeddings=8192)

# Presets for generated checkpoints. `tiny` keeps tests fast (and its vocabulary fits the byte-level fallback
# tokenizer: 256 bytes + 14 specials); `small` is a CPU benchmark model with the real vocabulary size.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=272, hidden_size=128, ffn_hidden_size=256, num_layers=2, num_attention_heads=8,
                 num_kv_heads=2, head_dim=16, rotary_dim=8, rope_theta=10000.0, rms_norm_eps=1.5625e-07,
                 max_position_embeddings=2048),
    "small": dict(vocab_size=151552, hidden_size=512, ffn_hidden_size=1536, num_layers=8, num_attention_heads=8,
                  num_kv_heads=2, head_dim=64, rotary_dim=32, rope_theta=10000.0, rms_norm_eps=1.5625e-07,
                  max_position_embeddings=8192),
    "glm-4-9b": _GLM4_9B,
}


def preset(name: str, **overrides: Any) -> GLM4Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return GLM4Config(**{**PRESETS[name], **overrides})
