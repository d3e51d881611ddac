"""The training settings QAT and distillation share: workers, DeepSpeed ZeRO, schedule, data, checkpoints."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config import StrictConfig


class ZeroConfig(StrictConfig):
    stage: int = Field(0, description="ZeRO stage 0-3: 1 shards optimizer state, 2 also gradients, 3 also "
                                      "parameters (our model parallelism)")
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_accumulation: int = Field(1, ge=1)
    gradient_clipping: float = Field(1.0, ge=0, description="max gradient norm; 0 turns clipping off")

    @model_validator(mode="after")
    def _known_stage(self):
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage {self.stage} does not exist; use 0, 1, 2 or 3")
        return self


class TrainConfig(StrictConfig):
    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each worker reserves; a fraction shares a "
                                   "core (torch then runs one thread)")
    use_gpu: bool = False
    steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch: int = Field(2, ge=1, description="sequences per worker per forward")
    seq_len: int = Field(256, ge=8)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    train_embeddings: bool = Field(True, description="false freezes the token embeddings (and a tied lm_head)")
    eval_every: int = Field(50, ge=1, description="steps between perplexity measurements")
    eval_tokens: int = Field(4096, ge=2, description="validation tokens per periodic measurement")
    eval_window: int = Field(512, ge=2)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from the last checkpoint")
    seed: int = 0
    zero: ZeroConfig = Field(default_factory=ZeroConfig)

    def deepspeed_config(self) -> dict:
        """DeepSpeed's JSON config for these settings (torch's AdamW, so nothing compiles on CPU)."""
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.zero.gradient_accumulation,
            "gradient_clipping": self.zero.gradient_clipping,
            "optimizer": {"type": "AdamW", "params": {
                "lr": self.lr, "weight_decay": self.weight_decay, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": self.lr, "warmup_num_steps": max(1, self.warmup_steps)}},
            "zero_optimization": {"stage": self.zero.stage},
            "bf16": {"enabled": self.zero.precision == "bf16"},
            "steps_per_print": 10**9,  # progress goes through Ray Train's reports instead
            "wall_clock_breakdown": False,
        }
