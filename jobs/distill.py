"""Knowledge distillation on Ray Train with DeepSpeed: a frozen teacher, a smaller student.

    python -m jobs.distill --config configs/jobs/distill.yaml

The student is a model sharing the teacher's tokenizer, or a copy of the teacher shrunk by a
structured-pruning recipe (fewer layers, heads or neurons) and so initialised from its layers. It
trains on (1 - alpha) CE + alpha T^2 KL(teacher || student) (or reverse KL, plus an optional
hidden-state MSE). With `baseline: true` the same student also trains on cross-entropy alone for the
same steps, so one PNG shows whether the teacher helped. The distilled student is stored under `out`.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pydantic import Field, model_validator

from cluster.config import StrictConfig, load_config
from cluster.errors import UserError
from cluster.store import Store
from jobs.compress.pipeline import calibration_tokens, write_result
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.models.load import has_other_tokenizer, load_causal_lm, model_dir, tokenizer_sha256
from jobs.train.checkpoints import copy_tokenizer
from jobs.train.job import TrainingJobConfig, check_data_and_out, train_and_keep, training_job_main
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


class DistillConfig(TrainingJobConfig):
    """`out` is the distilled student; the Ray Train run is `distill-<out>` unless `run_name` says
    otherwise, and the baseline's is the same name with `-ce`."""

    teacher: str = "smollm2-135m-instruct"
    student: StudentConfig
    loss: LossConfig = Field(default_factory=lambda: LossConfig(alpha=0.5, temperature=1.0))
    baseline: bool = Field(True, description="also train the student on cross-entropy alone, same steps")

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
    check_data_and_out(config, store)


def student_from_teacher(config: DistillConfig, store: Store) -> str:
    """The teacher shrunk by the student recipe, stored as `<out>.init`; returns its store name."""
    teacher = model_dir(config.teacher, store)
    recipe = load_config(Recipe, config.student.recipe)
    model = load_causal_lm(teacher)
    apply_recipe(model, recipe, calibration_tokens(recipe, config.teacher, teacher, store), progress=False)
    name = f"{Path(config.out).name}.init"

    def build(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        copy_tokenizer(teacher, folder)

    write_result(build, name, store, {"source": config.teacher, "student_recipe": recipe.name}, force=True)
    print(f"student: {model.num_parameters():,} parameters "
          f"({model.config.num_hidden_layers} layers), stored as {name}", file=sys.stderr)
    return name


def run(config: DistillConfig) -> dict:
    store = Store(config.store)
    check(config, store)
    student = config.student.model or student_from_teacher(config, store)
    run_name = config.run_name_for("distill")
    spec = WorkerSpec(student=student, teacher=config.teacher, loss=config.loss, train=config.train,
                      data=config.data, store=config.store)

    def store_student(trained: Path) -> dict:
        meta = {"source": student, "teacher": config.teacher, "trained": "distill"}
        return {"out": write_result(lambda folder: shutil.copytree(trained, folder), config.out, store, meta,
                                    config.force)}

    stored, history = train_and_keep(config, spec, run_name, store, store_student)
    curves, summary = {"distilled": history}, {"student": student, **stored}
    if config.baseline:
        plain = spec.model_copy(update={"teacher": None, "loss": LossConfig()})
        curves["cross-entropy only"] = fit(plain, f"{run_name}-ce", store, config.ray_address,
                                           fresh=config.force).return_value or []
    for label, history in curves.items():
        evals = [h["val_ppl"] for h in history if "val_ppl" in h]
        summary[f"final_val_ppl_{label.replace(' ', '_').replace('-', '_')}"] = evals[-1] if evals else None
    summary["results"] = store_training_results("distill", curves, summary, store)
    return summary


main = training_job_main("distill", DistillConfig, run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
