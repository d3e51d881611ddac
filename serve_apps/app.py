"""`serve_apps.app:build_app`: one typed config -> one LLMServer deployment per model -> the
OpenAI ingress bound to their handles. Used by Serve config files (configs/serve/*.yaml, for
`serve run` / `serve deploy`) and by `rayfoundry serve CONFIG`.
"""
from __future__ import annotations

from pydantic import Field, model_validator
from ray import serve
from ray.serve import Application

from cluster.config import StrictConfig, parse_config
from serve_apps.engine.llm_engine import EngineConfig
from serve_apps.ingress import Ingress
from serve_apps.llm_server import LLMServer


class AutoscalingConfig(StrictConfig):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

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


class ServeAppConfig(StrictConfig):
    models: list[ModelConfig] = Field(min_length=1)
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; RAYFOUNDRY_API_KEYS adds more")

    @model_validator(mode="after")
    def _unique_ids(self):
        ids = [m.model_id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model_id values must be unique, got {ids}")
        return self


def _deployment_options(model: ModelConfig) -> dict:
    options = {"name": f"LLMServer:{model.model_id}", "max_ongoing_requests": model.max_ongoing_requests,
               "max_queued_requests": model.max_queued_requests,
               "ray_actor_options": {"num_cpus": model.num_cpus_per_replica},
               "health_check_period_s": 10, "graceful_shutdown_timeout_s": 30}
    if model.autoscaling is None:
        options["num_replicas"] = model.num_replicas
    else:
        scaling = model.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s}
    return options


def build_app(args: dict | ServeAppConfig) -> Application:
    config = args if isinstance(args, ServeAppConfig) else parse_config(ServeAppConfig, args, "serve app config")
    servers = {m.model_id: serve.deployment(LLMServer).options(**_deployment_options(m)).bind(m.model, m.engine)
               for m in config.models}
    ingress = serve.deployment(Ingress).options(name="OpenAIIngress")
    return ingress.bind(servers, config.api_keys)
