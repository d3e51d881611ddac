"""A Hugging Face folder (plain or compressed) as one of our models, and what its KV cache costs."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from kernels.checkpoint import read_weights
from kernels.cpu_linear import prepack_linears
from serve_apps.engine.models.gemma3 import Gemma3ForCausalLM
from serve_apps.engine.models.llama import LlamaForCausalLM, attention_head_dim

ARCHITECTURES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                 "gemma3_text": Gemma3ForCausalLM}


def load_model(path: Path, dtype: torch.dtype, prepack: bool = False) -> torch.nn.Module:
    """The model with its checkpoint's weights, plain or compressed; `prepack`: CPU linears packed
    (kernels.cpu_linear: faster, 2x weight memory)."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"model type {config.model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    with torch.device("cpu"):
        model = ARCHITECTURES[config.model_type](config)
    model.load_weights(read_weights(path))
    model = model.to(dtype).eval()
    if prepack:
        prepack_linears(model)
    return model


def kv_block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * attention_head_dim(config)
    return per_token * block_size * torch.finfo(dtype).bits // 8
