"""Quantization-aware training on Ray Train with DeepSpeed, ending in the quantized checkpoint the engine serves.

    python -m jobs.qat --config configs/jobs/qat.yaml
    ray job submit --working-dir . -- python -m jobs.qat --config configs/jobs/qat.yaml

The recipe's layers train as fake-quant (float weights, rounded on the fly exactly as the recipe will
round them; straight-through gradients), optionally distilling from the unquantized model. Afterwards
the trained weights are quantized by the recipe for real and stored under `out`. Measured in the same
run on the validation split: perplexity of the float model, of the recipe applied without training
(round-to-nearest), of the trained fake-quant model and of the stored checkpoint; the share of the
float-to-RTN gap the training won back; all into the results store with the training curve.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from pydantic import Field, model_validator

from cluster.config import load_config
from cluster.errors import UserError
from cluster.store import Store
from jobs.compress.checkpoint import save_compressed
from jobs.compress.fake_quant import check_qat_recipe, prepare_qat, strip_fake_quant
from jobs.compress.pipeline import write_result
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.data.prepared import open_dataset
from jobs.data.shards import read_tokens
from jobs.eval.perplexity import perplexity
from jobs.models.load import load_causal_lm, model_dir
from jobs.train.job import TrainingJobConfig, check_data_and_out, train_and_keep, training_job_main
from jobs.train.losses import LossConfig
from jobs.train.report import store_training_results
from jobs.train.spec import WorkerSpec


class QATConfig(TrainingJobConfig):
    """`out` is the quantized checkpoint; the Ray Train run is `qat-<out>` unless `run_name` says otherwise."""

    model: str = "smollm2-135m-instruct"
    recipe: str = Field(description="compression recipe YAML whose steps (rtn, dynamic w8a8) QAT trains for")
    distill: LossConfig = Field(default_factory=LossConfig,
                                description="alpha > 0 distills from the unquantized model")
    eval_tokens: int = Field(20480, ge=2, description="validation tokens for the before/after perplexities")
    eval_window: int = Field(512, ge=2)

    @model_validator(mode="after")
    def _distill_has_no_hidden_term(self):
        if self.distill.hidden_mse:
            raise ValueError("distill.hidden_mse is for distilling into a different student; QAT keeps one model")
        return self


def check(config: QATConfig, store: Store) -> tuple[Recipe, Path]:
    """Every problem found before any worker starts."""
    recipe = load_config(Recipe, config.recipe)
    path = model_dir(config.model, store)
    try:
        check_qat_recipe(load_causal_lm(path), recipe)
    except ValueError as exc:
        raise UserError(f"{config.recipe}: {exc}") from None
    check_data_and_out(config, store)
    return recipe, path


def measured_ppl(model: torch.nn.Module, tokens: torch.Tensor, window: int, label: str) -> float:
    ppl = perplexity(model, tokens, window).ppl
    print(f"{label}: perplexity {ppl:.3f}", file=sys.stderr)
    return ppl


def evaluate_and_convert(config: QATConfig, recipe: Recipe, source: Path, trained: Path, store: Store) -> dict:
    tokens = torch.from_numpy(read_tokens(open_dataset(config.data, store), "validation",
                                          config.eval_tokens).astype("int64"))
    ppl = {"fp32": measured_ppl(load_causal_lm(source), tokens, config.eval_window, "float model")}
    untrained = load_causal_lm(source)
    apply_recipe(untrained, recipe, None, progress=False)
    ppl["rtn"] = measured_ppl(untrained, tokens, config.eval_window, "recipe without training")
    model = load_causal_lm(trained)
    prepare_qat(model, recipe)
    ppl["qat_fake_quant"] = measured_ppl(model, tokens, config.eval_window, "trained, fake-quant")
    strip_fake_quant(model)
    report = apply_recipe(model, recipe, None, progress=False)
    recipe_data = recipe.model_dump(mode="json")
    uri = write_result(lambda folder: save_compressed(model, folder, source, recipe_data, report), config.out,
                       store, {"source": config.model, "format": "compressed", "recipe": recipe_data,
                               "trained": "qat"}, config.force)
    ppl["qat_checkpoint"] = measured_ppl(load_causal_lm(model_dir(uri, store)), tokens, config.eval_window,
                                         "stored quantized checkpoint")
    gap = ppl["rtn"] - ppl["fp32"]
    return {"out": uri, **{f"ppl_{k}": v for k, v in ppl.items()},
            "gap_recovered": (ppl["rtn"] - ppl["qat_checkpoint"]) / gap if gap > 0 else None,
            "checkpoint_vs_fake_quant": ppl["qat_checkpoint"] / ppl["qat_fake_quant"] - 1}


def run(config: QATConfig) -> dict:
    store = Store(config.store)
    recipe, source = check(config, store)
    if recipe.calibration is not None:
        raise UserError(f"{config.recipe}: QAT recipes need no calibration data (rtn and dynamic w8a8 only)")
    spec = WorkerSpec(student=config.model, teacher=config.model if config.distill.needs_teacher else None,
                      qat_recipe=recipe.model_dump(mode="json"), loss=config.distill, train=config.train,
                      data=config.data, store=config.store)
    summary, history = train_and_keep(config, spec, config.run_name_for("qat"), store,
                                      lambda trained: evaluate_and_convert(config, recipe, source, trained, store))
    summary["results"] = store_training_results("qat", history, summary, store)
    return summary


main = training_job_main("qat", QATConfig, run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
