"""The Llama family (Llama, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Tokens of all sequences in a step are one flat [T] batch; only attention needs to know where
one sequence ends (the AttentionBatch). q/k/v and gate/up projections are fused into one
matmul each: on a CPU, fewer larger matmuls run measurably faster than many small ones.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.fused_layers import add_rms_norm, rms_norm, silu_and_mul
from kernels.paged_attention import paged_attention, rotary_and_cache
from serve_apps.engine.models.weights import WeightLoader, fused_linear
from kernels.collectives import SingleGroup
from serve_apps.engine.models.tp_layout import RankShard, even_spans, single_rank


@dataclass
class AttentionBatch:
    """Where each sequence's tokens are, in the batch and in the cache."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks]
    query_lens: list[int]
    context_lens: list[int]
    token_seq: torch.Tensor  # [T] the sequence each new token belongs to
    token_visible: torch.Tensor  # [T] cached tokens it attends to: its position + 1

    @property
    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_seq, self.token_visible


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x); with a residual: (rms_norm(residual + x), residual + x), fused."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def input_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's opening: (norm(residual + x), residual + x), the add fused into the norm;
    the first layer, with no residual stream yet, starts it at x."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


def attention_head_dim(config) -> int:
    """The config's head_dim, or hidden_size / heads where it gives none (older Llama configs)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention (as Hugging Face's Llama)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim / 2] for a step's positions: looked up once per step."""
        return self.cos[positions], self.sin[positions]


class Attention(nn.Module):
    """This rank's KV groups (all of them at tp=1): q/k/v column-parallel, o_proj row-parallel, its
    partial sums all-reduced here."""

    def __init__(self, config, qkv_bias: bool, shard: RankShard, group):
        super().__init__()
        self.num_heads, self.num_kv_heads = shard.q_heads.size, shard.kv_heads.size
        self.head_dim = attention_head_dim(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = fused_linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.group = group

    def forward(self, x, angles, batch: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]):
        q = rotary_and_cache(self.qkv_proj(x), *angles, *kv_cache, batch.slot_mapping, self.num_heads)
        out = paged_attention(q, *kv_cache, batch.block_tables, batch.query_lens, batch.context_lens, self.scale,
                              batch.layout)
        return self.group.all_reduce_(self.o_proj(out.flatten(1)))


class MLP(nn.Module):
    """down(act(gate) * up), gate and up in one matmul; `act_and_mul` (kernels.fused_layers) takes
    their fused output. Under tensor parallelism each rank holds a slice of the intermediate rows
    (gate/up column-parallel, down row-parallel) and the partial sums are all-reduced here."""

    def __init__(self, config, shard: RankShard, group,
                 act_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul):
        super().__init__()
        inter = shard.mlp.size
        self.gate_up_proj = fused_linear(config.hidden_size, [inter, inter], bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.act_and_mul = act_and_mul
        self.group = group

    def forward(self, x):
        return self.group.all_reduce_(self.down_proj(self.act_and_mul(self.gate_up_proj(x))))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding; a token outside them looks up zeros, and the all-reduce
    leaves each token the one rank's row that holds it (a sum of one row and zeros: exact)."""

    def __init__(self, shard: RankShard, hidden_size: int, group):
        super().__init__(shard.vocab.size, hidden_size)
        self.start, self.group = shard.vocab.start, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        embedded = super().forward(local.masked_fill(outside, 0))
        return self.group.all_reduce_(embedded.masked_fill_(outside[:, None], 0))


class DecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, shard: RankShard, group):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qkv_bias, shard, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, shard, group)

    def forward(self, x, residual, angles, batch, kv_cache):
        """Pre-norm residual block, with each residual add fused into the norm after it:
        takes and returns (sublayer output, residual stream); the first layer gets residual None."""
        x, residual = input_norm(self.input_layernorm, x, residual)
        x = self.self_attn(x, angles, batch, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


def rope_theta(config, params: dict | None = None) -> float:
    """The rotary base of `params` (default: the config's rope_parameters); only plain RoPE is built."""
    params = params if params is not None else (getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported yet (only 'default')")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class LlamaForCausalLM(nn.Module):
    """The whole model, or one tensor-parallel rank's share of it (`shard`, its collectives `group`)."""

    def __init__(self, config, shard: RankShard | None = None, group=None):
        super().__init__()
        self.config = config
        self.shard, self.group = shard or single_rank(config), group or SingleGroup()
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.rotary = Rotary(attention_head_dim(config), rope_theta(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(config, qkv_bias, self.shard, self.group)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._vocab_parallel_ends(config)

    def _vocab_parallel_ends(self, config) -> None:
        """Embedding and LM head over this rank's vocabulary rows (tied: one tensor, as at tp=1)."""
        self.embed_tokens = VocabParallelEmbedding(self.shard, config.hidden_size, self.group)
        self.lm_head = nn.Linear(config.hidden_size, self.shard.vocab.size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.vocab_widths = [span.size for span in even_spans(config.vocab_size, self.shard.size)]

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank caches."""
        return self.shard.kv_heads.size

    def forward(self, input_ids, positions, batch: AttentionBatch, kv_caches) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        angles = self.rotary.angles(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, angles, batch, kv_cache)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under tensor parallelism on rank 0 only (None elsewhere)."""
        return self.group.gather_to_first(self.lm_head(hidden), self.vocab_widths)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | nn.Module]]) -> None:
        """Our weights from a checkpoint's (kernels.checkpoint.read_weights): plain tensors and
        compressed layers, under Hugging Face's names."""
        loader = WeightLoader(self)
        for hf_name, weight in weights:
            name = hf_name.removeprefix("model.")
            if isinstance(weight, nn.Module):
                loader.load_layer(name, weight)
            elif not (self.config.tie_word_embeddings and name == "lm_head.weight"):
                loader.load_tensor(name, self.checkpoint_tensor(name, weight))
        loader.finish()

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor as our parameter `name` holds it (models that store weights
        differently from Hugging Face convert here)."""
        return tensor
