"""What every Ray Train worker is told: the models, the objective and the settings."""
from __future__ import annotations

from cluster.config import StrictConfig
from jobs.train.config import TrainConfig
from jobs.train.losses import LossConfig


class WorkerSpec(StrictConfig):
    student: str  # the model the student starts from: store name, path or URI
    teacher: str | None = None  # the same; frozen
    qat_recipe: dict | None = None  # a compression recipe whose layers train as fake-quant
    loss: LossConfig
    train: TrainConfig
    data: str  # prepared dataset: its train split is streamed, its validation split measured
    store: str | None = None
