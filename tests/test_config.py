"""Configs: typed, unknown keys rejected with one line that names the key."""
import pytest

from cluster.config import load_config
from cluster.errors import UserError
from jobs.prepare_data import PrepareDataConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_data_configs_load():
    config = load_config(PrepareDataConfig, "configs/jobs/data_shakespeare.yaml")
    assert config.source.kind == "shakespeare" and config.validation_fraction == 0.05


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: d\ntokenizer: t\nsource: {kind: shakespeare}\nshards: 3\n", "unknown key 'shards'"),
        ("name: d\ntokenizer: t\nsource: {kind: jsonl, paths: [a], feild: x}\n", "unknown key 'source.jsonl.feild'"),
        ("name: d\nsource: {kind: shakespeare}\n", "missing key 'tokenizer'"),
        ("name: d\ntokenizer: t\nsource: {kind: csv}\n", "bad value for 'source'"),
        ("name: d\ntokenizer: t\nsource: {kind: shakespeare}\nvalidation_fraction: 1.5\n",
         "bad value for 'validation_fraction'"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(PrepareDataConfig, write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(PrepareDataConfig, tmp_path / "nope.yaml")
