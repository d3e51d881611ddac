"""Quantization-aware training's two ends: swap a recipe's layers for fake-quant ones, and after
training turn them back into plain linears the recipe then quantizes for real.

Only steps with a fake-quant form qualify (`Step.fake_quant_layer`): round-to-nearest weights and
dynamic W8A8, whose quantized layers reproduce the trained rounding exactly. Each layer may be
claimed by one step only, so the trained rounding is the one the checkpoint gets.
"""
from __future__ import annotations

from torch import nn

from jobs.compress.recipe import Recipe
from kernels.fake_quant_linear import FakeQuantLinear


def check_qat_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Every reason `recipe` cannot be trained for on `model`, raised before anything changes."""
    recipe.check(model)
    claimed: dict[str, str] = {}
    for step in recipe.steps:
        for name, linear in step.targets(model).items():
            if name in claimed:
                raise ValueError(f"{name} is quantized by both {claimed[name]} and {step.method}; "
                                 "QAT needs each layer in one step")
            claimed[name] = step.method
            step.for_layer(name).fake_quant_layer(linear)  # raises for methods without a QAT form


def prepare_qat(model: nn.Module, recipe: Recipe) -> int:
    """Swap every layer the recipe quantizes for its fake-quant form, in place; returns how many."""
    check_qat_recipe(model, recipe)
    swapped = 0
    for step in recipe.steps:
        for name, linear in step.targets(model).items():
            model.set_submodule(name, step.for_layer(name).fake_quant_layer(linear))
            swapped += 1
    return swapped


def strip_fake_quant(model: nn.Module) -> int:
    """Put plain linears (the trained float weights) back in place of fake-quant layers; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return len(names)
