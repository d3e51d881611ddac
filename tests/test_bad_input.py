"""Bad input: one clear line naming the problem, exit code 2, and the store left as it was."""
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import RAYFOUNDRY, env_with_home, run, tree_snapshot

CORPUS = "".join(f"To be or not to be, line {i}.\n" for i in range(400))


@pytest.fixture(scope="module")
def populated(tmp_path_factory, tiny_llama_dir):
    """A store with a tiny model (64-token context) and a small prepared corpus."""
    home = tmp_path_factory.mktemp("home")
    files = tmp_path_factory.mktemp("files")
    (files / "corpus.txt").write_text(CORPUS)
    (files / "empty.txt").write_text("\n \n")
    (files / "d.jsonl").write_text('{"body": "text"}\n')
    pq.write_table(pa.table({"content": ["text"]}), files / "d.parquet")
    config = files / "data.yaml"
    config.write_text(f"name: corpus\ntokenizer: tiny\nsource: {{kind: txt, paths: ['{files}/corpus.txt']}}\n")
    env = env_with_home(home)
    assert run([*RAYFOUNDRY, "models", "add", str(tiny_llama_dir), "--name", "tiny"], env).returncode == 0
    prepared = run([sys.executable, "-m", "jobs.prepare_data", "--config", str(config)], env)
    assert prepared.returncode == 0, prepared.stderr
    return home, files


def data_config(files, source: str, extra: str = "") -> str:
    path = files / f"bad-{abs(hash(source + extra))}.yaml"
    path.write_text(f"name: bad\ntokenizer: tiny\nsource: {source}\n{extra}")
    return str(path)


CASES = {
    "unknown model name": (
        lambda f: [*RAYFOUNDRY, "models", "add", "no-such-model"], "unknown model 'no-such-model'"),
    "missing model path": (
        lambda f: [*RAYFOUNDRY, "models", "add", str(f / "no" / "such")], "no such path"),
    "missing model for eval": (
        lambda f: [*RAYFOUNDRY, "eval", "ppl", "--model", str(f / "gone"), "--data", "corpus"],
        "no such model folder"),
    "empty corpus": (
        lambda f: [sys.executable, "-m", "jobs.prepare_data", "--config",
                   data_config(f, f"{{kind: txt, paths: ['{f}/empty.txt']}}")], "the corpus is empty"),
    "jsonl field missing": (
        lambda f: [sys.executable, "-m", "jobs.prepare_data", "--config",
                   data_config(f, f"{{kind: jsonl, paths: ['{f}/d.jsonl'], field: text}}")],
        "d.jsonl:1: no field 'text' (it has: body)"),
    "parquet column missing": (
        lambda f: [sys.executable, "-m", "jobs.prepare_data", "--config",
                   data_config(f, f"{{kind: parquet, paths: ['{f}/d.parquet'], column: text}}")],
        "no column 'text' (it has: content)"),
    "window larger than context": (
        lambda f: [*RAYFOUNDRY, "eval", "ppl", "--model", "tiny", "--data", "corpus", "--tokens", "512",
                   "--window", "128"], "--window 128 is larger than the model's context of 64 tokens"),
    "unknown config key": (
        lambda f: [sys.executable, "-m", "jobs.prepare_data", "--config",
                   data_config(f, "{kind: shakespeare}", "shard_size: 10\n")], "unknown key 'shard_size'"),
    "unknown dataset": (
        lambda f: [*RAYFOUNDRY, "eval", "ppl", "--model", "tiny", "--data", "nope"], "no dataset named 'nope'"),
    "more tokens than the split has": (
        lambda f: [*RAYFOUNDRY, "eval", "ppl", "--model", "tiny", "--data", "corpus", "--tokens", "10000000",
                   "--window", "64"], "has only"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(populated, case):
    home, files = populated
    argv, message = CASES[case]
    before = tree_snapshot(home)
    result = run(argv(files), env_with_home(home))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and ": error: " in lines[0]
    assert tree_snapshot(home) == before
