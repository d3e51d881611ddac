"""What checkpoint tests share: a short prompt, its logits, and the tiny model compressed and saved."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from jobs.compress.checkpoint import save_compressed
from jobs.compress.recipe import Recipe, apply_recipe

IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 3, 64, 8]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def compress_and_save(model_dir: Path, recipe: dict, out: Path):
    """(the model compressed by `recipe` in memory, the folder its checkpoint was written to)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    report = apply_recipe(model, Recipe.model_validate(recipe), None, progress=False)
    save_compressed(model, out, model_dir, recipe, report)
    return model, out
