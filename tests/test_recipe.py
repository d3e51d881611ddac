"""Recipes and `python -m jobs.compress`: bad input is refused before any work, a good recipe runs."""
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from jobs.compress.__main__ import main as compress_main
from jobs.compress.recipe import Recipe
from jobs.models.load import load_causal_lm
from kernels.quant_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear


def recipe(*steps, **extra) -> dict:
    return {"name": "r", "steps": list(steps), **extra}


@pytest.mark.parametrize("data, message", [
    (recipe({"method": "quantize_everything"}), "does not match any of the expected tags"),
    (recipe({"method": "rtn", "bitz": 8}), "bitz"),
    (recipe({"method": "rtn", "bits": 9}), "bits"),
    (recipe({"method": "rtn", "bits": 4, "group_size": 1}), "group_size"),
    (recipe({"method": "rtn", "overrides": [{"modules": ["lm_head"], "colour": "red"}]}), "colour"),
    (recipe({"method": "rtn", "overrides": [{"modules": ["lm_head"], "bits": 5}]}), "bits"),
    (recipe({"method": "rtn"}, cooking_time=3), "cooking_time"),
    ({"name": "r", "steps": []}, "steps"),
])
def test_bad_recipes_are_refused_when_read(data, message):
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate(data)


@pytest.mark.parametrize("step, message", [
    ({"method": "rtn", "modules": ["*.attention.*"]}, "matches no linear"),
    ({"method": "rtn", "bits": 4, "group_size": 48}, "does not divide"),
    ({"method": "rtn", "exclude": ["*"]}, "no linear layer is left"),
])
def test_recipes_that_do_not_fit_the_model_fail_before_any_change(tiny_llama_dir, step, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate(recipe({"method": "rtn", "bits": 8, "modules": ["*.mlp.*"]}, step)).check(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_cli_refuses_a_bad_recipe_and_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe({"method": "rtn", "bits": 4, "group_size": 48})))
    out = tmp_path / "out"
    assert compress_main(["--model", str(tiny_llama_dir), "--recipe", str(bad), "--out", str(out),
                          "--store", str(tmp_path / "store")]) == 2
    assert "group_size 48 does not divide" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_writes_a_checkpoint_that_loads_like_a_model(tiny_llama_dir, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(recipe(
        {"method": "rtn", "bits": 4, "group_size": 32, "exclude": ["lm_head"],
         "overrides": [{"modules": ["*.down_proj"], "bits": 8, "group_size": None}]})))
    args = ["--model", str(tiny_llama_dir), "--recipe", str(good), "--out", str(tmp_path / "out"),
            "--store", str(tmp_path / "store")]
    assert compress_main(args) == 0
    model = load_causal_lm(tmp_path / "out")
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4WeightOnlyLinear)
    assert compress_main(args) == 2  # an existing result is not replaced without --force


def test_a_step_needing_calibration_requires_data():
    with pytest.raises(ValueError, match="need calibration data"):
        Recipe.model_validate(recipe({"method": "gptq", "bits": 4}))
