"""Everything a search checks and reads before Ray starts: the model's groups, the space, the seeds,
the evaluation and calibration tokens. A config that cannot run fails here, before any trial."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cluster.config import load_config
from cluster.errors import UserError
from cluster.store import Store
from jobs.compress.pipeline import calibration_dataset
from jobs.compress.recipe import Recipe
from jobs.data.prepared import check_tokenized_for, open_dataset
from jobs.data.shards import read_tokens
from jobs.models.load import context_length, load_causal_lm, model_dir
from jobs.search.config import SearchConfig
from jobs.search.render import Candidate, point_from_recipe, render_recipe
from jobs.search.sensitivity import check_seedable
from jobs.search.space import Choices, ModuleGroup, check_searchable, choices, grid_size, module_groups

SAMPLED_CHECKS = 8  # random points rendered and checked against the model besides the seeds


@dataclass
class Prepared:
    model_path: Path
    groups: list[ModuleGroup]
    found: Choices
    seed_points: list[dict]
    seed_names: dict[str, str]  # rendered recipe name -> the seed file's recipe name
    eval_tokens: torch.Tensor


def prepare(config: SearchConfig, store: Store) -> Prepared:
    path = model_dir(config.model, store)
    model = load_causal_lm(path)
    groups = module_groups(model, config.space.depth_buckets)
    found = choices(config.space, groups)
    check_searchable(found)
    if config.searcher.kind == "grid" and grid_size(found) + config.seeds.count() > config.num_trials:
        raise UserError(f"the grid has {grid_size(found)} points (plus {config.seeds.count()} seeds), "
                        f"more than num_trials {config.num_trials}")
    seed_points, seed_names = seeds(config, found, groups, model)
    check_sampled_points(config, found, groups, model)
    check_seedable(config, found, groups)
    reference = config.choose.min_decode_b1_vs
    if reference not in (None, "fp32", *seed_names.values()):
        raise UserError(f"choose.min_decode_b1_vs {reference!r} is neither fp32 nor a seed recipe's name "
                        f"({', '.join(seed_names.values()) or 'no seeds'})")
    if config.calibration is not None:
        calibration_dataset(config.calibration, config.model, path, store)
    return Prepared(path, groups, found, seed_points, seed_names, eval_tokens(config, path, store))


def seeds(config: SearchConfig, found: Choices, groups: list[ModuleGroup],
          model: nn.Module) -> tuple[list[dict], dict[str, str]]:
    points, names = [], {}
    for file in config.seeds.recipes:
        recipe = load_config(Recipe, file)
        point = point_from_recipe(recipe, found, groups)
        rendered = render(config, point, found, groups, model)
        if rendered.name in names:
            raise UserError(f"seed recipes {names[rendered.name]!r} and {recipe.name!r} render alike in this space")
        points.append(point)
        names[rendered.name] = recipe.name
    return points, names


def render(config: SearchConfig, point: dict, found: Choices, groups: list[ModuleGroup],
           model: nn.Module) -> Recipe | None:
    recipe = render_recipe(Candidate.of(point, found, groups), groups, config.calibration, config.name)
    if recipe is not None:
        try:
            recipe.check(model)
        except ValueError as exc:
            raise UserError(f"the space renders a recipe the model cannot take: {exc}") from None
    return recipe


def check_sampled_points(config: SearchConfig, found: Choices, groups: list[ModuleGroup], model: nn.Module) -> None:
    """Render a few random points and the extreme choices of each knob: a group size or a pattern the
    layers cannot take shows now, not as failed trials."""
    rng = random.Random(config.searcher.seed)
    varying = found.varying()
    points = [{} for _ in range(SAMPLED_CHECKS)]
    for point in points:
        for group, knob in varying:
            point.setdefault(group, {})[knob] = rng.choice(found.knobs[(group, knob)])
    for pick in (0, -1):
        extreme: dict[str, dict] = {}
        for group, knob in varying:
            extreme.setdefault(group, {})[knob] = found.knobs[(group, knob)][pick]
        points.append(extreme)
    for point in points:
        render(config, point, found, groups, model)


def eval_tokens(config: SearchConfig, path: Path, store: Store) -> torch.Tensor:
    dataset = open_dataset(config.data, store)
    check_tokenized_for(dataset, path, config.model)
    if config.eval.split not in dataset.manifest["splits"]:
        raise UserError(f"data '{config.data}' has no split {config.eval.split!r}")
    if config.eval.window > context_length(path):
        raise UserError(f"eval.window {config.eval.window} is longer than the model's context {context_length(path)}")
    tokens = read_tokens(dataset, config.eval.split, config.eval.tokens)
    if len(tokens) < config.eval.tokens:
        raise UserError(f"split {config.eval.split!r} of '{config.data}' has {len(tokens)} tokens, "
                        f"fewer than eval.tokens {config.eval.tokens}")
    return torch.from_numpy(tokens.astype("int64"))
