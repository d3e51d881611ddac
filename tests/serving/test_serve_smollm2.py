"""configs/serve/smollm2.yaml with the real SmolLM2 on a local Ray: the official openai client,
streamed and not, and the README's curl examples as written (on this test's port)."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from conftest import REPO
from serving.conftest import deployed

openai = pytest.importorskip("openai", reason="the openai client is in the test extras")
CONFIG = REPO / "configs" / "serve" / "smollm2.yaml"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_served(serve_cluster):
    """The config file's application, on the shared local Ray (its workers read the test's store)."""
    from serve_apps.app import build_app

    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    with deployed(build_app(app["args"]), app["name"], app["route_prefix"]):
        yield serve_cluster.port


def test_openai_client_streamed_and_whole(smollm2_served):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{smollm2_served}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert "Paris" in whole.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True) if chunk.choices)
    assert streamed == whole.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == completion.choices[0].text and completion.usage.completion_tokens == 8


def _readme_curls() -> list[str]:
    """The curl commands of the README's serving section, continuation lines joined."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Serving", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(curl .*?(?:\\\n.*?)*)$", section, flags=re.M)
    return [command.replace("\\\n", " ") for command in commands]


def test_the_readme_curl_examples_work_as_written(smollm2_served):
    commands = _readme_curls()
    assert len(commands) == 2, commands
    outputs = []
    for command in commands:
        assert "127.0.0.1:8000" in command
        done = subprocess.run(command.replace("127.0.0.1:8000", f"127.0.0.1:{smollm2_served}"), shell=True,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    chat = json.loads(outputs[0])
    assert "Paris" in chat["choices"][0]["message"]["content"]
    events = [line for line in outputs[1].splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-1])
