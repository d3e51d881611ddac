"""The search space: module groups, points rendered to ordinary recipes (the shipped uniform recipes
come back as themselves), and configs refused before any trial."""
from __future__ import annotations

import pytest
import torch
import yaml

from cluster.config import load_config
from cluster.store import Store
from jobs.compress.calibration import CalibrationConfig
from jobs.compress.pipeline import calibration_tokens
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.models.load import load_causal_lm
from jobs.search.__main__ import main as search_main
from jobs.search.config import SearchConfig, SpaceConfig
from jobs.search.render import Candidate, fitted_group_size, point_from_recipe, render_recipe
from jobs.search.space import choices, index_patterns, module_groups, split_evenly
from kernels.compressed import CompressedLinear

UNIFORM = ["int8-weight", "int4-rtn-g128", "int4-gptq-g128", "magnitude-50", "wanda-50", "magnitude-2of4",
           "wanda-2of4"]
WIDE_SPACE = SpaceConfig(bits=[4, 8, None], group_size=[32, 128, None], quant_method=["rtn", "gptq"],
                         sparsity={"low": 0, "high": 0.5, "step": 0.25}, pattern=["unstructured", "2:4"],
                         prune_method=["magnitude", "wanda"], head_bits=[8, None])


@pytest.fixture(scope="module")
def shakespeare(smollm2_home):
    return str(smollm2_home / "store" / "datasets" / "shakespeare")


def dense_weights(model) -> dict[str, torch.Tensor]:
    """Every linear's weight as the model computes with it, whatever form stores it."""
    return {name: (m.dense_weight() if isinstance(m, CompressedLinear) else m.weight).detach().float()
            for name, m in model.named_modules() if isinstance(m, (CompressedLinear, torch.nn.Linear))}


def test_index_patterns_and_buckets():
    assert index_patterns((8, 9, 10, 11, 12, 13)) == ["[8-9]", "1[0-3]"]
    assert index_patterns(tuple(range(15, 30))) == ["1[5-9]", "2[0-9]"]
    assert index_patterns((4,)) == ["4"]
    assert split_evenly(range(30), 2) == [list(range(15)), list(range(15, 30))]
    assert split_evenly(range(5), 3) == [[0, 1], [2, 3], [4]]


def test_groups_cover_every_linear_once(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir)
    groups = module_groups(model, 2)
    assert [g.name for g in groups] == ["attn0", "mlp0", "attn1", "mlp1", "head"]
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    owned = [n for g in groups for n in g.in_features]
    assert sorted(owned) == sorted(linears)
    for group in groups:
        recipe = Recipe.model_validate({"name": "r", "steps": [{"method": "rtn", "modules": group.patterns()}]})
        assert set(recipe.steps[0].targets(model)) == set(group.in_features)


@pytest.mark.parametrize("name", UNIFORM)
def test_a_shipped_uniform_recipe_renders_back_to_the_same_weights(name, tiny_llama_dir, shakespeare, tmp_path):
    """Seeds are the shipped recipes: the point read from each must compress exactly as the file does
    (a pruned float layer is stored sparse by the rendering, the same weights in fewer bytes)."""
    calibration = CalibrationConfig(data=shakespeare, samples=4, seq_len=32)
    shipped = load_config(Recipe, f"configs/recipes/{name}.yaml")
    if shipped.calibration is not None:
        shipped = shipped.model_copy(update={"calibration": calibration})
    model = load_causal_lm(tiny_llama_dir)
    groups = module_groups(model, 2)
    found = choices(WIDE_SPACE, groups)
    rendered = render_recipe(Candidate.of(point_from_recipe(shipped, found, groups), found, groups), groups,
                             calibration, "s")
    tokens = calibration_tokens(shipped, str(tiny_llama_dir), tiny_llama_dir, Store(str(tmp_path / "store")))
    by_file, by_search = load_causal_lm(tiny_llama_dir), load_causal_lm(tiny_llama_dir)
    apply_recipe(by_file, shipped, tokens, progress=False)
    apply_recipe(by_search, rendered, tokens, progress=False)
    expected, got = dense_weights(by_file), dense_weights(by_search)
    assert expected.keys() == got.keys()
    for layer in expected:
        assert torch.equal(expected[layer], got[layer]), layer


def test_overrides_carry_bits_and_group_size_together(tiny_llama_dir):
    """Per-group bits plus a group size some layers cannot take: every layer gets its own group's
    bits and the fitted group size (one override per case, since overrides do not stack)."""
    model = load_causal_lm(tiny_llama_dir)
    groups = module_groups(model, 2)
    space = SpaceConfig(bits=[4, 8, None], group_size=[128], per_group=["bits"], head_bits=[8, None])
    found = choices(space, groups)
    point = {"attn0": {"bits": 4}, "mlp0": {"bits": 8}, "attn1": {"bits": None}, "mlp1": {"bits": 4},
             "head": {"bits": 8}}
    candidate = Candidate.of(point, found, groups)
    recipe = render_recipe(candidate, groups, None, "s")
    # described as rendered: attention inputs are 64 wide, the MLP's down projection 128
    assert recipe.description == "attn0 int4-g64; mlp0 int8-g64/128; attn1 float; mlp1 int4-g64/128; head int8"
    apply_recipe(model, recipe, None, progress=False)
    layers = dict(model.named_modules())
    for group in groups:
        bits = point[group.name]["bits"]
        for name, in_features in group.in_features.items():
            layer = layers[name]
            if bits is None:
                assert isinstance(layer, torch.nn.Linear), name
                continue
            assert layer.bits == bits, name
            size = in_features if group.name == "head" else fitted_group_size(128, in_features)
            assert layer.scale.shape[1] == in_features // size, name  # scales per row


def test_points_that_render_alike_share_a_name_and_others_do_not(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir)
    groups = module_groups(model, 2)
    found = choices(WIDE_SPACE, groups)
    base = {g.name: {"bits": 8, "sparsity": 0.0} for g in groups if g.name != "head"}
    point = {**base, "head": {"bits": 8}, "all": {"group_size": None, "quant_method": "rtn",
                                                 "pattern": "unstructured", "prune_method": "magnitude"}}
    same = {**point, "all": {**point["all"], "prune_method": "wanda"}}  # nothing is pruned: no difference
    other = {**point, "mlp1": {"bits": 4, "sparsity": 0.0}}

    def name(p):
        return render_recipe(Candidate.of(p, found, groups), groups, None, "s").name

    assert name(point) == name(same)
    assert name(point) != name(other)


def write_config(tmp_path, tiny_llama_dir, shakespeare, **changes) -> str:
    config = {"name": "bad", "model": str(tiny_llama_dir), "data": shakespeare, "store": str(tmp_path / "store"),
              "eval": {"tokens": 256, "window": 64}, "budget": {"max_ppl_increase": 0.05},
              "space": {"bits": [4, 8]}, "num_trials": 2, **changes}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"space": {"bits": []}}, "space.bits has no choices"),
    ({"space": {"bits": [4, 5]}}, "5 is not a width the checkpoint stores"),
    ({"objectives": ["ppl", "latency"]}, "unknown objective 'latency'"),
    ({"space": {"bits": [8], "group_size": [None]}}, "the space holds one recipe"),
    ({"seeds": {"recipes": ["configs/recipes/int4-rtn-g128.yaml"]}, "space": {"bits": [4, 8], "group_size": [32]}},
     "cannot be expressed in this space"),
    ({"searcher": {"kind": "grid"}, "space": {"bits": [4, 8], "group_size": [32, 64, None]}}, "the grid has"),
    ({"space": {"bits": [4], "quant_method": ["gptq"]}}, "need `calibration"),
    ({"eval": {"tokens": 256, "window": 65}}, "longer than the model's context"),
    ({"choose": {"min_decode_b1_vs": "int8-weight"}}, "neither fp32 nor a seed"),
    ({"seeds": {"sensitivity": {}}, "space": {"bits": [4, 8], "per_group": []}}, "add bits to space.per_group"),
    ({"seeds": {"sensitivity": {"tokens": 512}}, "space": {"bits": [4, None]}}, "is more than eval.tokens 256"),
    ({"seeds": {"sensitivity": {"shares": [1.5]}}}, "distinct fractions of the budget"),
    ({"seeds": {"sensitivity": {"tokens": 128}}}, "add null to space.bits"),
    ({"seeds": {"sensitivity": {"tokens": 128}},
      "space": {"bits": [4, None], "lowrank_energy": {"low": 0.8, "high": 0.9, "step": 0.1}}},
     "needs lowrank_energy 1.0 in the space"),
])
def test_a_bad_config_is_one_line_exit_2_and_no_run(changes, message, tmp_path, tiny_llama_dir, shakespeare,
                                                    capsys):
    assert search_main(["--config", write_config(tmp_path, tiny_llama_dir, shakespeare, **changes)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # not transformers' loading bars
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "store" / "runs").exists()


def test_the_default_configs_parse():
    for path in ("configs/jobs/search.yaml", "configs/jobs/search_smollm2.yaml"):
        assert load_config(SearchConfig, path).num_trials >= 1
