"""Shared fixtures: isolated stores, a tiny random Llama, the real SmolLM2 (converted once)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster import auth

REPO = Path(__file__).resolve().parents[1]
RAYFOUNDRY = [sys.executable, "-c", "import sys; from cluster.cli import main; sys.argv[0] = 'rayfoundry'; main()"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def _same_random_draws_every_run() -> None:
    """Seed torch before each test, so a tolerance that holds once holds on every CI run."""
    torch = sys.modules.get("torch")  # tests that never import torch should not pay for it
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ray_auth_mode_as_before() -> None:
    """Each test ends in the Ray authentication mode it began with. Ray keeps its mode and the token it
    loaded for the whole process, and ray.init() of a new cluster, or of one holding a token, turns token
    mode on for good: a later test's cluster without tokens would never hear back from this process."""
    before = os.environ.get(auth.MODE_VARIABLE)
    yield
    if os.environ.get(auth.MODE_VARIABLE) != before:
        auth.set_process_mode(before)


@contextmanager
def ray_auth_mode(mode: str | None):
    """This process's Ray authentication `mode` inside the block (a test's private cluster: "disabled")."""
    before = os.environ.get(auth.MODE_VARIABLE)
    auth.set_process_mode(mode)
    try:
        yield
    finally:
        auth.set_process_mode(before)


def run(argv: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 900) -> Result:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


def env_with_home(home: Path, jobs_here: bool = True) -> dict[str, str]:
    """The environment for a command against the store in `home`. `jobs_here`: the CLI runs its jobs
    in its own process (RAY_ADDRESS=local), as with no cluster up, so a test behaves the same whether
    or not one is running (CI leaves the quickstart's up); the tests of the way through a cluster
    (test_job_submission.py, test_local_cluster.py) choose their own."""
    env = dict(os.environ)
    env.pop("RAYFOUNDRY_STORE", None)
    env["RAYFOUNDRY_HOME"] = str(home)
    if jobs_here:
        env["RAY_ADDRESS"] = "local"
    else:
        env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def home(tmp_path) -> Path:
    """A fresh, empty RAYFOUNDRY_HOME for one test."""
    return tmp_path / "home"


@pytest.fixture
def cli(home):
    """Run `rayfoundry ...` against the test's own store."""

    def call(*args: str) -> Result:
        return run([*RAYFOUNDRY, *args], env_with_home(home))

    return call


@pytest.fixture
def job(home):
    """Run `python -m jobs.<module> ...` against the test's own store."""

    def call(module: str, *args: str) -> Result:
        return run([sys.executable, "-m", module, *args], env_with_home(home))

    return call


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory) -> Path:
    """A store holding the real SmolLM2-135M-Instruct and the prepared `shakespeare` corpus."""
    home = tmp_path_factory.mktemp("smollm2-home")
    env = env_with_home(home)
    added = run([*RAYFOUNDRY, "models", "add", "smollm2-135m-instruct"], env)
    assert added.returncode == 0, added.stderr
    prepared = run(
        [sys.executable, "-m", "jobs.prepare_data", "--config", "configs/jobs/data_shakespeare.yaml"], env
    )
    assert prepared.returncode == 0, prepared.stderr
    return home


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_home) -> Path:
    return smollm2_home / "store" / "models" / "smollm2-135m-instruct"


def _tiny_llama(out: Path, smollm2_dir: Path, context: int) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and a 64-token context."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, 64)


@pytest.fixture(scope="session")
def tiny_llama_long_dir(tmp_path_factory, smollm2_dir) -> Path:
    """The same with a 4,096-token context: room for generations long enough to interrupt."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama-long"), smollm2_dir, 4096)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime, to show a command changed nothing."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_greedy_with_logprobs(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[tuple[list, list]]:
    """transformers' greedy `generate` on each prompt alone: (tokens, logprob of each), the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            tokens = out.sequences[0, len(ids):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
            results.append((tokens, logprobs))
    return results
