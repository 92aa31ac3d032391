"""GLM-4-9B in plain PyTorch: the math of ../shared/docs/glm4-spec.md §3, nothing else.

Module attribute names mirror the original THUDM checkpoint (`transformer.encoder.layers.N.self_attention.
query_key_value`, ...), so `model.get_parameter(checkpoint_name)` finds the destination of every tensor.

Two entry points share every layer:
  * `model(input_ids)`: full causal forward over (batch, seq), positions 0..seq-1, no cache -> logits;
  * `model.forward_cached(...)` + `model.compute_logits(...)`: the engine's flattened, paged-KV forward.
Only the attention core differs between them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from glm4.config import GLM4Config
from glm4.layers.attention import AttentionMetadata, DecodeMetadata, causal_attention, paged_attention, write_kv
from glm4.kernels import cpu, hugepages
from glm4.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from glm4.layers.linear import PackableLinear, QKVParallelLinear, RowParallelLinear
from glm4.layers.mlp import MLP
from glm4.layers.norm import RMSNorm
from glm4.layers.rotary import RotaryEmbedding, apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]


class TPArgs:
    """The tensor-parallel placement of a module: rank, world size and process group."""

    def __init__(self, tp_rank: int = 0, tp_size: int = 1, tp_group: dist.ProcessGroup | None = None) -> None:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group

    def kw(self) -> dict:
        return dict(tp_rank=self.tp_rank, tp_size=self.tp_size, tp_group=self.tp_group)


class SelfAttention(nn.Module):
    def __init__(self, config: GLM4Config, tp: TPArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.query_key_value = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                                 config.num_kv_heads, config.add_qkv_bias, dtype=dtype, **tp.kw())
        self.dense = RowParallelLinear(config.q_size, config.hidden_size, dtype=dtype, **tp.kw())
        self.num_heads = self.query_key_value.num_heads  # per rank
        self.num_kv_heads = self.query_key_value.num_kv_heads  # per rank (after replication)
        self.head_dim, self.rotary_dim = config.head_dim, config.rotary_dim
        self.scale = config.head_dim ** -0.5

    def qkv(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (..., tokens, hidden) -> rotated q (..., tokens, heads, head_dim), rotated k and v (kv_heads)."""
        qkv = self.query_key_value(x)
        proj = self.query_key_value
        if qkv.dim() == 2 and qkv.dtype == torch.float32 and qkv.is_cpu and cpu.ready():
            # Engine path on CPU: rotate q and k inside the fresh projection output in one fused call.
            cpu.rotary_(qkv, *cos_sin, self.num_heads + self.num_kv_heads, self.head_dim, self.rotary_dim)
            q, k, v = qkv.split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
            return (q.unflatten(-1, (self.num_heads, self.head_dim)),
                    k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
                    v.unflatten(-1, (self.num_kv_heads, self.head_dim)))
        qk, v = qkv.split([proj.q_size + proj.kv_size, proj.kv_size], dim=-1)
        # q and k heads side by side (..., tokens, heads + kv_heads, head_dim): one rotary pass for both.
        qk = apply_rotary(qk.unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim)), cos_sin,
                          self.rotary_dim)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=-2)
        return q, k, v.unflatten(-1, (self.num_kv_heads, self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: AttentionMetadata | DecodeMetadata | None = None, kv_cache: KVCache | None = None
               ) -> torch.Tensor:
        """Attention core, before the output projection -> (..., tokens, heads * head_dim).

        Without `meta`: causal over (batch, seq). With it: the flattened batch's K/V go to the paged cache first,
        then each token attends to its sequence's cached prefix."""
        if meta is None:
            return causal_attention(q, k, v, self.scale).flatten(-2)
        write_kv(kv_cache[0], kv_cache[1], k, v, meta.slot_mapping)
        return paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, k, v).flatten(-2)


class GLMBlock(nn.Module):
    """Pre-norm residual block: norm, attention (`pre_attention` -> `SelfAttention.attend`), then
    `post_attention` (output projection, residual, norm, MLP, residual)."""

    def __init__(self, config: GLM4Config, tp: TPArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attention = SelfAttention(config, tp, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config.hidden_size, config.ffn_hidden_size, dtype=dtype, **tp.kw())

    def pre_attention(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attention.qkv(self.input_layernorm(h), cos_sin)

    def post_attention(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attention.dense(attn)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata | DecodeMetadata | None = None, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        """Full causal attention over (batch, seq), or over the paged cache when `meta` is given."""
        q, k, v = self.pre_attention(h, cos_sin)
        return self.post_attention(h, self.self_attention.attend(q, k, v, meta, kv_cache))


class Embedding(nn.Module):
    def __init__(self, config: GLM4Config, tp: TPArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, **tp.kw())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)  # no scaling, no position embedding


class Encoder(nn.Module):
    def __init__(self, config: GLM4Config, tp: TPArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, tp, dtype) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


class ChatGLMModel(nn.Module):
    def __init__(self, config: GLM4Config, tp: TPArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.embedding = Embedding(config, tp, dtype)
        # One cos/sin table for all layers (the original checkpoint's `transformer.rotary_pos_emb.inv_freq` is
        # recomputed here, not loaded).
        self.rotary_pos_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.max_position_embeddings)
        self.encoder = Encoder(config, tp, dtype)
        self.output_layer = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype, **tp.kw())


class GLM4ForCausalLM(nn.Module):
    def __init__(self, config: GLM4Config, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = TPArgs(tp_rank, tp_size, tp_group)
        self.transformer = ChatGLMModel(config, self.tp, dtype)
        self._decode_stack: list[torch.Tensor] | None = None  # set by prepare_for_cpu where the kernels apply

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.transformer.encoder.layers[0].self_attention.num_kv_heads

    def prepare_for_cpu(self) -> int:
        """Switch every linear to the fastest CPU kernels this machine has (see `PackableLinear`). Call after
        loading; returns how many layers were switched (0 off-CPU)."""
        linears = [m for m in self.modules() if isinstance(m, PackableLinear)]
        streamable = [m for m in linears if m.streamable()]
        # The streaming layers' weights go into one huge-page arena, back to back in module order, which is the
        # order a decode step reads them (qkv, dense, h_to_4h, 4h_to_h per layer, then the LM head): the step's
        # weight reads become one long stream instead of dozens of short ones (glm4/kernels/hugepages.py).
        arena = hugepages.Arena(hugepages.Arena.size_for([m.weight for m in streamable])) if streamable else None
        switched = sum(m.prepare_for_cpu(arena.take(m.weight.data) if m in streamable else None) for m in linears)
        self._decode_stack = self._fused_decode_weights()
        return switched

    def _fused_decode_weights(self) -> list[torch.Tensor] | None:
        """The arguments of `cpu.decode_layers` (7 per layer) where it can run this model's decode steps: one rank,
        fp32, head_dim a multiple of 16, every block's linears on the streaming kernels. Else None."""
        weights: list[torch.Tensor] = []
        for layer in self.transformer.encoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            linears = [attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h]
            if (self.tp.tp_size != 1 or attn.head_dim % 16 or not all(m.streaming for m in linears)
                    or layer.input_layernorm.weight.dtype != torch.float32):
                return None
            bias = attn.query_key_value.bias
            weights += [layer.input_layernorm.weight, attn.query_key_value.weight,
                        bias if bias is not None else torch.empty(0), attn.dense.weight,
                        layer.post_attention_layernorm.weight, mlp.dense_h_to_4h.weight, mlp.dense_4h_to_h.weight]
        return weights

    def _fuses_decode(self, h: torch.Tensor, meta: AttentionMetadata | DecodeMetadata,
                      kv_caches: list[KVCache]) -> bool:
        """A pure decode step of at most cpu.MAX_ROWS sequences with fp32 caches, on a model prepared for the CPU
        kernels: all blocks run as one kernel call (`cpu.decode_layers`)."""
        return (self._decode_stack is not None and cpu.FUSE_DECODE_LAYERS
                and isinstance(meta, AttentionMetadata) and meta.pure_decode
                and h.dim() == 2 and h.shape[0] <= cpu.MAX_ROWS and kv_caches[0][0].dtype == torch.float32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (batch, seq) -> logits (batch, seq, vocab), full causal forward without a cache."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        t = self.transformer
        h = t.embedding(input_ids)
        cos_sin = t.rotary_pos_emb.cos_sin(torch.arange(input_ids.shape[1], device=input_ids.device), h.dtype)
        for layer in t.encoder.layers:
            h = layer(h, cos_sin)
        return t.output_layer(t.encoder.final_layernorm(h))

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       meta: AttentionMetadata | DecodeMetadata, kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) flattened over the batch -> final-normed hidden (num_tokens, H)."""
        t = self.transformer
        h = t.embedding(input_ids)
        cos_sin = t.rotary_pos_emb.cos_sin(positions, h.dtype)
        if self._fuses_decode(h, meta, kv_caches):
            a = t.encoder.layers[0].self_attention
            h = cpu.decode_layers(h, self._decode_stack, [c for kv in kv_caches for c in kv], meta.slot_mapping,
                                  meta.block_tables, meta.context_lens, *cos_sin, a.num_heads, a.num_kv_heads,
                                  a.rotary_dim, self.config.rms_norm_eps, a.scale)
        else:
            for layer, kv in zip(t.encoder.layers, kv_caches):
                h = layer(h, cos_sin, meta, kv)
        return t.encoder.final_layernorm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) -> fp32 logits (n, vocab): sampling always runs in fp32."""
        return self.transformer.output_layer(hidden).float()
