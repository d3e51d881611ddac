"""GGUF file -> plain Hugging Face folder (fp32 safetensors, tokenizer, chat template)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def gguf_to_hf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers dequantizes GGUF weights to fp32 but keeps its GGUF quantizer attached; left
    # there, save_pretrained records a quantization_config and other tools refuse the folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _make_tokenizer_config_portable(out_dir / "tokenizer_config.json", model.config.max_position_embeddings)


def _make_tokenizer_config_portable(path: Path, context_length: int) -> None:
    """Name a tokenizer class every transformers release knows, and bound its length."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = context_length
    path.write_text(json.dumps(config, indent=2) + "\n")
