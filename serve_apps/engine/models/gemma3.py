"""Gemma 3 (text) over the paged KV cache: what differs from the Llama family.

- Embeddings are scaled by sqrt(hidden_size).
- Every RMSNorm multiplies by (1 + weight); we store 1 + weight at load time, so the Llama
  family's fused norm kernels apply unchanged.
- Four norms per layer: the attention and MLP outputs are normalized before their residual add
  (post_attention / post_feedforward), then the sum is normalized for the next sublayer.
- Queries and keys are RMS-normalized per head before the rotary embedding.
- Local layers attend over a sliding window with their own rotary base; every sixth layer (by
  `layer_types`) is global.
- The MLP's gate is GELU (tanh approximation); attention scales by query_pre_attn_scalar^-0.5.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.fused_layers import gelu_tanh_and_mul, rotary
from kernels.paged_attention import paged_attention, write_kv_cache
from serve_apps.engine.models.llama import (MLP, AttentionBatch, LlamaForCausalLM, RMSNorm, Rotary, input_norm,
                                             rope_theta)
from serve_apps.engine.models.weights import fused_linear
from kernels.collectives import SingleGroup
from serve_apps.engine.models.tp_layout import RankShard, single_rank

LOCAL, GLOBAL = "sliding_attention", "full_attention"


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_type: str, shard: RankShard, group):
        super().__init__()
        self.num_heads, self.num_kv_heads = shard.q_heads.size, shard.kv_heads.size
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = fused_linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = config.query_pre_attn_scalar**-0.5
        self.layer_type = layer_type
        self.window = config.sliding_window if layer_type == LOCAL else None
        self.group = group

    def forward(self, x, angles, batch: AttentionBatch, kv_cache):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # per-head norms over head_dim rows (reshape copies the strided views into contiguous rows)
        q = rotary(self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim), *angles)
        k = rotary(self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim), *angles)
        write_kv_cache(k, v.view(-1, self.num_kv_heads, self.head_dim), *kv_cache, batch.slot_mapping)
        out = paged_attention(q, *kv_cache, batch.block_tables, batch.query_lens, batch.context_lens, self.scale,
                              batch.layout, self.window)
        return self.group.all_reduce_(self.o_proj(out.flatten(1)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, shard: RankShard, group):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Gemma3Attention(config, layer_type, shard, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config, shard, group, gelu_tanh_and_mul)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x, residual, angles, batch, kv_cache):
        """As the Llama layer: takes and returns (sublayer output, residual stream), each residual
        add fused into the norm after it; here the outputs are post-normed before they are added."""
        x, residual = input_norm(self.input_layernorm, x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, angles, batch, kv_cache))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config, shard: RankShard | None = None, group=None):
        nn.Module.__init__(self)
        if getattr(config, "attn_logit_softcapping", None):
            raise NotImplementedError("attention logit soft-capping is not supported")
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("bidirectional attention is not supported: the engine generates causally")
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise NotImplementedError(f"hidden_activation {config.hidden_activation!r} is not supported")
        self.config = config
        self.shard, self.group = shard or single_rank(config), group or SingleGroup()
        self.layer_types = list(config.layer_types)
        self.rotary = nn.ModuleDict({kind: Rotary(config.head_dim, rope_theta(config, config.rope_parameters[kind]),
                                                  config.max_position_embeddings) for kind in set(self.layer_types)})
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, kind, self.shard, self.group)
                                    for kind in self.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._vocab_parallel_ends(config)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids, positions, batch: AttentionBatch, kv_caches) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale.to(self.embed_tokens.weight.dtype)
        angles = {kind: rotary.angles(positions) for kind, rotary in self.rotary.items()}
        residual = None
        for layer, kind, kv_cache in zip(self.layers, self.layer_types, kv_caches):
            x, residual = layer(x, residual, angles[kind], batch, kv_cache)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        if self.softcap:  # elementwise: each rank caps its own vocabulary shard
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return self.group.gather_to_first(logits, self.vocab_widths)

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + 1 if name.endswith("norm.weight") else tensor  # we hold (1 + weight)
