"""The one config of a compression search (`python -m jobs.search --config ...`), checked whole
before Ray starts: unknown keys, empty or one-point spaces, bit widths the checkpoint cannot store,
unknown objectives and grids larger than the trial count are all errors here."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config import StrictConfig
from jobs.compress.calibration import CalibrationConfig
from serve_apps.engine.config import EngineConfig

# What a trial can be measured on, and which way is better.
DIRECTION = {"ppl": "min", "linear_bytes": "min", "checkpoint_bytes": "min", "decode_b1": "max", "decode_bN": "max"}
BITS = (2, 3, 4, 8, None)  # None: the layers stay in float
PER_GROUP_KNOBS = ("bits", "group_size", "sparsity")


class EvalConfig(StrictConfig):
    split: str = "validation"
    tokens: int = Field(12288, ge=2, description="tokens of the split every trial's perplexity reads")
    window: int = Field(512, ge=2)
    batch_size: int = Field(4, ge=1, description="windows scored together: a report to Tune after each batch")


class BudgetConfig(StrictConfig):
    """How much worse than the uncompressed model a chosen recipe may be."""

    max_ppl_increase: float = Field(ge=0, description="0.05 with relative: +5 % perplexity; else points of it")
    relative: bool = True

    def limit(self, baseline_ppl: float) -> float:
        return baseline_ppl * (1 + self.max_ppl_increase) if self.relative else baseline_ppl + self.max_ppl_increase

    def describe(self) -> str:
        return f"+{self.max_ppl_increase:.1%}" if self.relative else f"+{self.max_ppl_increase:g}"


class Range(StrictConfig):
    low: float
    high: float
    step: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self

    def values(self) -> list[float]:
        count = int(round((self.high - self.low) / self.step))
        return sorted({round(min(self.low + i * self.step, self.high), 6) for i in range(count + 1)} | {self.high})


class SpaceConfig(StrictConfig):
    """Choices for the fields of the recipe's steps. Module groups are attention and MLP layers in
    `depth_buckets` contiguous buckets of depth, plus the head; `per_group` knobs are drawn for each
    group, the others once per trial."""

    depth_buckets: int = Field(2, ge=1)
    per_group: list[Literal["bits", "group_size", "sparsity"]] = Field(default_factory=lambda: ["bits", "sparsity"])
    bits: list[int | None] = Field(default_factory=lambda: [4, 8, None])
    group_size: list[int | None] = Field(default_factory=lambda: [64, 128, None], description="null: per row")
    quant_method: list[Literal["rtn", "gptq"]] = Field(default_factory=lambda: ["rtn"])
    sparsity: Range = Field(default_factory=lambda: Range(low=0, high=0, step=0.1))
    pattern: list[Literal["unstructured", "2:4"]] = Field(default_factory=lambda: ["unstructured"])
    prune_method: list[Literal["magnitude", "wanda"]] = Field(default_factory=lambda: ["magnitude"])
    lowrank_energy: Range = Field(default_factory=lambda: Range(low=1, high=1, step=0.05),
                                  description="1: off; below 1, float groups are factored by SVD")
    head_bits: list[Literal[4, 8] | None] = Field(default_factory=lambda: [None])

    @field_validator("bits")
    @classmethod
    def _stored_widths(cls, bits):
        for b in bits:
            if b not in BITS:
                raise ValueError(f"{b} is not a width the checkpoint stores; choose among 2, 3, 4, 8 or null")
        return bits

    @field_validator("group_size")
    @classmethod
    def _group_sizes(cls, sizes):
        for g in sizes:
            if g is not None and g < 2:
                raise ValueError(f"group size {g} is below 2")
        return sizes

    @model_validator(mode="after")
    def _choices(self):
        for name in ("bits", "group_size", "quant_method", "pattern", "prune_method", "head_bits"):
            if not getattr(self, name):
                raise ValueError(f"space.{name} has no choices")
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"space.{name} lists a choice twice")
        if not 0 <= self.sparsity.low <= self.sparsity.high <= 0.7:
            raise ValueError("space.sparsity must lie within [0, 0.7]")
        if not 0 < self.lowrank_energy.low <= self.lowrank_energy.high <= 1:
            raise ValueError("space.lowrank_energy must lie within (0, 1]")
        if len(set(self.per_group)) != len(self.per_group):
            raise ValueError("space.per_group lists a knob twice")
        return self


class SearcherConfig(StrictConfig):
    kind: Literal["optuna-tpe", "optuna-nsga2", "random", "grid"] = "optuna-tpe"
    seed: int = 0
    population_size: int = Field(8, ge=2, description="NSGA-II's generation size")
    n_startup_trials: int = Field(8, ge=1, description="TPE's random trials before it models")


class EarlyStopConfig(StrictConfig):
    """budget: stop a trial whose perplexity on the windows read so far is over the budget by more than
    `margin` (after `grace_windows`); asha and median rank trials by that ratio instead."""

    kind: Literal["budget", "asha", "median", "none"] = "budget"
    grace_windows: int = Field(4, ge=1)
    margin: float = Field(0.02, ge=0)
    reduction_factor: float = Field(3, gt=1)
    spare_seeds: bool = Field(True, description="seed recipes always run to the end: the reference points")


class SpeedConfig(StrictConfig):
    batch_n: int = Field(16, ge=2, description="the N of decode_bN")
    prompt_tokens: int = Field(32, ge=1)
    max_tokens: int = Field(64, ge=2)
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(kv_cache_memory_gib=0.5))


class ChooseConfig(StrictConfig):
    minimize: Literal["ppl", "linear_bytes", "checkpoint_bytes"] = "linear_bytes"
    min_decode_b1_vs: str | None = Field(None, description="'fp32' or a seed recipe's name: decode_b1 at least its")
    confirm: int = Field(3, ge=0, description="candidates measured against min_decode_b1_vs in turns, smallest "
                                              "first (0: trust each trial's one figure)")


class Resources(StrictConfig):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


class SensitivitySeeds(StrictConfig):
    """Mixed-precision seeds from each group's sensitivity (jobs/search/sensitivity.py)."""

    tokens: int = Field(4096, ge=2, description="evaluation tokens each probe reads (the first of eval's)")
    shares: list[float] = Field(default_factory=lambda: [0.5], min_length=1,
                                description="one seed per share of the budget its predicted change may use")
    bits: list[Literal[2, 3, 4, 8]] | None = Field(None, description="widths the seeds may give (default: the space's)")

    @field_validator("shares")
    @classmethod
    def _fractions(cls, shares):
        if any(not 0 < s <= 1 for s in shares) or len(set(shares)) != len(shares):
            raise ValueError("shares are distinct fractions of the budget in (0, 1]")
        return shares


class SeedsConfig(StrictConfig):
    recipes: list[str] = Field(default_factory=list, description="uniform recipe files tried first")
    sensitivity: SensitivitySeeds | None = Field(None, description="also seed with sensitivity-ranked mixed widths")

    def count(self) -> int:
        return len(self.recipes) + (len(self.sensitivity.shares) if self.sensitivity else 0)


class SearchConfig(StrictConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the run: runs/search-<name>")
    model: str
    data: str = "shakespeare"
    eval: EvalConfig = Field(default_factory=EvalConfig)
    calibration: CalibrationConfig | None = Field(None, description="for gptq and wanda; stats_from is original")
    budget: BudgetConfig
    objectives: list[str] = Field(default_factory=lambda: ["ppl", "linear_bytes", "decode_b1"], min_length=1)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    num_trials: int = Field(ge=1)
    concurrency: int = Field(1, ge=1)
    resources_per_trial: Resources = Field(default_factory=Resources)
    early_stopping: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    choose: ChooseConfig = Field(default_factory=ChooseConfig)
    max_retries: int = Field(0, ge=0, description="times a failed trial is retried before it is recorded")
    verify: Literal["chosen", "front"] = Field("chosen", description="reapply the chosen recipe, or every front "
                                                                      "recipe, and check each trial's perplexity")
    force: bool = Field(False, description="start afresh, deleting a run of this name")
    store: str | None = None
    ray_address: str | None = None

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, objectives):
        for name in objectives:
            if name not in DIRECTION:
                raise ValueError(f"unknown objective {name!r}; known: {', '.join(DIRECTION)}")
        if len(set(objectives)) != len(objectives):
            raise ValueError("an objective is listed twice")
        return objectives

    @model_validator(mode="after")
    def _consistent(self):
        needs_stats = "gptq" in self.space.quant_method or (
            "wanda" in self.space.prune_method and self.space.sparsity.high > 0)
        if needs_stats and self.calibration is None:
            raise ValueError("the space has gptq or wanda, which need `calibration: {data: ...}`")
        if self.calibration is not None:
            if "stats_from" in self.calibration.model_fields_set and self.calibration.stats_from != "original":
                raise ValueError("calibration.stats_from: a search calibrates every trial on the original model's "
                                 "statistics, collected once; leave it out or set original")
            self.calibration.stats_from = "original"
        if self.seeds.count() > self.num_trials:
            raise ValueError(f"{self.seeds.count()} seeds but num_trials is {self.num_trials}")
        return self

    def measured(self) -> set[str]:
        """Every trial's perplexity and linear bytes; the rest only when asked for."""
        floor = {"decode_b1"} if self.choose.min_decode_b1_vs else set()
        return set(self.objectives) | {"ppl", "linear_bytes"} | floor
