"""A Hugging Face folder (plain or compressed) as one of our models, and what its KV cache costs."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from kernels.checkpoint import check_splits, read_weights
from kernels.cpu_linear import prepack_linears
from serve_apps.engine.models.gemma3 import Gemma3ForCausalLM
from serve_apps.engine.models.llama import LlamaForCausalLM, attention_head_dim
from serve_apps.engine.models.weights import tensor_parallel_split
from serve_apps.engine.models.tp_layout import RankShard
from serve_apps.engine.models.parallel import finish_row_parallel

ARCHITECTURES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                 "gemma3_text": Gemma3ForCausalLM}


def load_model(path: Path, dtype: torch.dtype, prepack: bool = False, shard: RankShard | None = None,
               group=None) -> torch.nn.Module:
    """The model with its checkpoint's weights, plain or compressed; `prepack`: CPU linears packed
    (kernels.cpu_linear: faster, 2x weight memory). With a tensor-parallel `shard` (and the `group`
    its collectives run in), only that rank's share, read as such from disk."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"model type {config.model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    with torch.device("cpu"):
        model = ARCHITECTURES[config.model_type](config, shard, group)
    head_dim = attention_head_dim(config)
    model.load_weights(read_weights(path, lambda module: tensor_parallel_split(module, model.shard, head_dim)))
    finish_row_parallel(model)
    model = model.to(dtype).eval()  # tensor by tensor: never a second copy of the whole model
    if prepack:
        prepack_linears(model)
    return model


def check_tensor_parallel(path: Path, config, shards: list[RankShard]) -> None:
    """Every compressed layer splits where the ranks' shares begin (ShardError otherwise), checked
    from the checkpoint's headers before any rank loads anything."""
    head_dim = attention_head_dim(config)
    check_splits(path, lambda module: [part for shard in shards
                                       if (part := tensor_parallel_split(module, shard, head_dim)) is not None])


def kv_block_bytes(config, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """One block's bytes over all layers, for the model's KV heads or a tensor-parallel rank's."""
    num_kv_heads = num_kv_heads or config.num_key_value_heads
    per_token = 2 * config.num_hidden_layers * num_kv_heads * attention_head_dim(config)
    return per_token * block_size * torch.finfo(dtype).bits // 8
