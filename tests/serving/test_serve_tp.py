"""configs/serve/smollm2-tp2.yaml on the local Ray: a replica whose second rank is a Ray actor in
its placement group answers the official openai client exactly as one rank does."""
from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from serving.conftest import deployed

openai = pytest.importorskip("openai", reason="the openai client is in the test extras")
CONFIG = REPO / "configs" / "serve" / "smollm2-tp2.yaml"
MODEL = "smollm2-135m-instruct"
PROMPT = "The three most famous plays of Shakespeare are"


def test_openai_client_against_the_tp2_config_gets_one_rank_s_tokens(serve_cluster, smollm2_dir):
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.engine.config import EngineConfig
    from serve_apps.engine.llm_engine import LLMEngine
    from serve_apps.engine.sampling_params import SamplingParams

    one_rank = LLMEngine(smollm2_dir, EngineConfig(num_blocks=64)).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].text
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    with deployed(build_app(app["args"]), app["name"], app["route_prefix"]):
        status = serve.status().applications[app["name"]].deployments[f"LLMServer:{MODEL}"]
        assert status.status == "HEALTHY"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_cluster.port}/v1", api_key="unused",
                               max_retries=0)
        completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
        assert completion.choices[0].text == one_rank
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
        assert streamed == one_rank
        chat = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content
