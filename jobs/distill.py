"""Knowledge distillation on Ray Train with DeepSpeed: a frozen teacher, a smaller student.

    python -m jobs.distill --config configs/jobs/distill.yaml

The student is a model sharing the teacher's tokenizer, or a copy of the teacher shrunk by a
structured-pruning recipe (fewer layers, heads or neurons) and so initialised from its layers. It
trains on (1 - alpha) CE + alpha T^2 KL(teacher || student) (or reverse KL, plus an optional
hidden-state MSE). With `baseline: true` the same student also trains on cross-entropy alone for the
same steps, so one PNG shows whether the teacher helped. The distilled student is stored under `out`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pydantic import Field, model_validator

from cluster.config import StrictConfig, load_config
from cluster.errors import UserError, reports_user_errors
from cluster.store import Store
from jobs.compress.pipeline import calibration_tokens, check_out_free, write_result
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.data.prepared import open_dataset
from jobs.models.load import has_other_tokenizer, load_causal_lm, model_dir, tokenizer_sha256
from jobs.train.checkpoints import TOKENIZER_FILES, model_folder, scratch_dir
from jobs.train.config import TrainConfig
from jobs.train.losses import LossConfig
from jobs.train.report import store_training_results
from jobs.train.run import fit
from jobs.train.spec import WorkerSpec


class StudentConfig(StrictConfig):
    model: str | None = Field(None, description="a stored model sharing the teacher's tokenizer")
    recipe: str | None = Field(None, description="a structured-pruning recipe applied to a copy of the teacher")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.model is None) == (self.recipe is None):
            raise ValueError("give the student as exactly one of `model` or `recipe`")
        return self


class DistillConfig(StrictConfig):
    teacher: str = "smollm2-135m-instruct"
    student: StudentConfig
    data: str = "shakespeare"
    out: str = Field(description="model store name or URI of the distilled student")
    force: bool = Field(False, description="replace an existing `out` and start the training runs afresh")
    loss: LossConfig = Field(default_factory=lambda: LossConfig(alpha=0.5, temperature=1.0))
    baseline: bool = Field(True, description="also train the student on cross-entropy alone, same steps")
    train: TrainConfig = Field(default_factory=TrainConfig)
    run_name: str | None = None
    store: str | None = None
    ray_address: str | None = None

    @model_validator(mode="after")
    def _needs_a_teacher_term(self):
        if not self.loss.needs_teacher:
            raise ValueError("loss.alpha or loss.hidden_mse must be above 0 to distill (alpha 0 is plain training)")
        return self


def check(config: DistillConfig, store: Store) -> None:
    """Every problem found before any worker starts."""
    teacher = model_dir(config.teacher, store)
    if config.student.model is not None:
        student = model_dir(config.student.model, store)
        if has_other_tokenizer(student, tokenizer_sha256(teacher)):
            raise UserError(f"student {config.student.model} has another tokenizer than teacher {config.teacher}; "
                            "distillation compares their next-token distributions, so they must share one")
    else:
        recipe = load_config(Recipe, config.student.recipe)
        if any(step.method != "structured" for step in recipe.steps):
            raise UserError(f"{config.student.recipe}: a student recipe shrinks the teacher with `structured` "
                            "steps only (quantized or sparse students train through QAT)")
    open_dataset(config.data, store)
    check_out_free(config.out, store, config.force)


def student_from_teacher(config: DistillConfig, store: Store) -> str:
    """The teacher shrunk by the student recipe, stored as `<out>.init`; returns its store name."""
    teacher = model_dir(config.teacher, store)
    recipe = load_config(Recipe, config.student.recipe)
    model = load_causal_lm(teacher)
    apply_recipe(model, recipe, calibration_tokens(recipe, config.teacher, teacher, store), progress=False)
    name = f"{Path(config.out).name}.init"

    def build(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        for file in TOKENIZER_FILES:
            if (teacher / file).is_file():
                shutil.copy2(teacher / file, folder / file)

    write_result(build, name, store, {"source": config.teacher, "student_recipe": recipe.name}, force=True)
    print(f"student: {model.num_parameters():,} parameters "
          f"({model.config.num_hidden_layers} layers), stored as {name}", file=sys.stderr)
    return name


def run(config: DistillConfig) -> dict:
    store = Store(config.store)
    check(config, store)
    student = config.student.model or student_from_teacher(config, store)
    run_name = config.run_name or f"distill-{Path(config.out).name}"
    spec = WorkerSpec(student=student, teacher=config.teacher, loss=config.loss, train=config.train,
                      data=config.data, store=config.store)
    curves, summary = {}, {"student": student}
    result = fit(spec, run_name, store, config.ray_address, fresh=config.force)
    curves["distilled"] = result.return_value or []
    scratch = scratch_dir()
    try:
        trained = model_folder(result.checkpoint, scratch)
        summary["out"] = write_result(lambda folder: shutil.copytree(trained, folder), config.out, store,
                                      {"source": student, "teacher": config.teacher, "trained": "distill"},
                                      config.force)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if config.baseline:
        plain = spec.model_copy(update={"teacher": None, "loss": LossConfig()})
        curves["cross-entropy only"] = fit(plain, f"{run_name}-ce", store, config.ray_address,
                                                fresh=config.force).return_value or []
    for label, history in curves.items():
        evals = [h["val_ppl"] for h in history if "val_ppl" in h]
        summary[f"final_val_ppl_{label.replace(' ', '_').replace('-', '_')}"] = evals[-1] if evals else None
    summary["results"] = store_training_results("distill", curves, summary, store)
    return summary


@reports_user_errors("python -m jobs.distill")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.distill", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="distillation job YAML (see configs/jobs/distill.yaml)")
    summary = run(load_config(DistillConfig, parser.parse_args(argv).config))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
