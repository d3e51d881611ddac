"""`serve_apps.app:build_app`: one typed config -> one LLMServer deployment per model -> the
OpenAI ingress bound to their handles. Used by Serve config files (configs/serve/*.yaml, for
`serve run` / `serve deploy`) and by `rayfoundry serve CONFIG`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from cluster.config import StrictConfig, parse_config
from serve_apps.engine.config import EngineConfig
from serve_apps.ingress import Ingress
from serve_apps.llm_server import LLMServer
from serve_apps.placement import placement_problem
from serve_apps.routing.kv_aware_state import DEFAULT_MAX_IMBALANCE
from serve_apps.routing.routers import ROUTERS

RETRY_AFTER_S = 1  # what a 429 (the model's queue is full) tells clients to wait


class AutoscalingConfig(StrictConfig):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="ongoing requests are averaged over this window")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ModelConfig(StrictConfig):
    model_id: str = Field(description="the name clients send as `model`")
    model: str = Field(description="a stored model's name, a folder or a URI (see cluster.store)")
    engine: EngineConfig = EngineConfig()
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = Field(None, description="replaces num_replicas when set")
    num_cpus_per_replica: float = Field(1.0, gt=0)
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; beyond it requests queue")
    max_queued_requests: int = Field(128, ge=-1, description="beyond it: 429 with Retry-After; -1: no limit")
    router: Literal["kv_aware", "pow2", "round_robin", "ray_prefix"] = "kv_aware"
    max_imbalance: int = Field(DEFAULT_MAX_IMBALANCE, ge=0,
                               description="kv_aware: in-flight requests a cached prefix may cost")
    routing_stats_period_s: float = Field(1.0, gt=0, description="how often replicas report their caches")
    check_placement: bool = Field(True, description="refuse a tensor-parallel replica the cluster's nodes cannot "
                                                    "hold now; off where an autoscaler adds nodes")


class ServeAppConfig(StrictConfig):
    models: list[ModelConfig] = Field(min_length=1)
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; RAYFOUNDRY_API_KEYS adds more")
    ingress_num_cpus: float = Field(0.5, ge=0, description="the HTTP ingress: parsing and tokenizing only")
    ingress_max_ongoing_requests: int = Field(1024, ge=1, description="streams one ingress replica relays")
    max_body_mib: float = Field(4.0, gt=0, description="larger request bodies get 413")

    @model_validator(mode="after")
    def _unique_ids(self):
        ids = [m.model_id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model_id values must be unique, got {ids}")
        return self


def _deployment_options(model: ModelConfig) -> dict:
    options = {"name": f"LLMServer:{model.model_id}", "max_ongoing_requests": model.max_ongoing_requests,
               "max_queued_requests": model.max_queued_requests,
               # A full queue raises BackPressureError in the ingress's handle, with this status and
               # Retry-After, which the ingress answers in OpenAI's error JSON.
               "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
               "ray_actor_options": {"num_cpus": model.num_cpus_per_replica,
                                     **({"num_gpus": model.engine.num_gpus_per_worker}
                                        if model.engine.num_gpus_per_worker else {})},
               "health_check_period_s": 10, "graceful_shutdown_timeout_s": 30,
               **LLMServer.placement(model.engine, model.num_cpus_per_replica)}
    if ROUTERS[model.router] is not None:
        kwargs = {"block_size": model.engine.block_size, "max_imbalance": model.max_imbalance} \
            if model.router == "kv_aware" else {}
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTERS[model.router], request_router_kwargs=kwargs,
            request_routing_stats_period_s=model.routing_stats_period_s)
    if model.autoscaling is None:
        options["num_replicas"] = model.num_replicas
    else:
        scaling = model.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s}
    return options


def _check_placement(model: ModelConfig) -> None:
    """A replica no node set can hold would wait forever in Serve: say what is missing instead."""
    import ray

    placement = LLMServer.placement(model.engine, model.num_cpus_per_replica)
    if not placement or not model.check_placement or not ray.is_initialized():
        return
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    problem = placement_problem(placement["placement_group_bundles"], placement["placement_group_strategy"], nodes)
    if problem is not None:
        raise ValueError(f"model {model.model_id!r}: a replica of tensor_parallel_size "
                         f"{model.engine.tensor_parallel_size} cannot be placed: {problem}. Lower "
                         "tensor_parallel_size or num_cpus_per_worker, use placement_strategy PACK or SPREAD, "
                         "add nodes, or set check_placement: false where an autoscaler adds them")


def build_app(args: dict | ServeAppConfig) -> Application:
    config = args if isinstance(args, ServeAppConfig) else parse_config(ServeAppConfig, args, "serve app config")
    for model in config.models:
        _check_placement(model)
    servers = {m.model_id: serve.deployment(LLMServer).options(**_deployment_options(m))
               .bind(m.model_id, m.model, m.engine)
               for m in config.models}
    ingress = serve.deployment(Ingress).options(
        name="OpenAIIngress", ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=config.ingress_max_ongoing_requests)
    return ingress.bind(servers, {m.model_id: m.model for m in config.models}, config.api_keys,
                        int(config.max_body_mib * 2**20))
