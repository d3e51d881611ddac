"""Per-layer sensitivity: a row per layer, the model restored exactly, harsher settings cost more."""
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from jobs.compress.layer_sensitivity import layer_sensitivity
from jobs.compress.prune import MagnitudeConfig
from jobs.compress.structured import StructuredConfig
from jobs.compress.weight_only import WeightOnlyConfig
from jobs.sensitivity import main as sensitivity_main

IDS = torch.randint(100, 5000, (2, 32), generator=torch.Generator().manual_seed(0))


def loss(model) -> float:
    with torch.no_grad():
        logits = model(IDS).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).item()


@pytest.fixture
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_each_layer_alone_and_the_model_restored(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    int2 = layer_sensitivity(model, MagnitudeConfig(sparsity=0.9, modules=["*.mlp.*"]), loss, progress=False)
    int8 = layer_sensitivity(model, WeightOnlyConfig(bits=8, modules=["*.mlp.*"]), loss, progress=False)
    assert [r.layer for r in int8] == [f"model.layers.{i}.mlp.{p}" for i in range(2)
                                       for p in ("gate_proj", "up_proj", "down_proj")]
    assert all(r.bytes_after < r.bytes_before for r in int8)
    assert sum(abs(r.delta) for r in int2) > 10 * sum(abs(r.delta) for r in int8)  # 90% pruning costs more
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_group_methods_are_refused(model):
    with pytest.raises(ValueError, match="per-layer method"):
        layer_sensitivity(model, StructuredConfig(target="heads", fraction=0.5), loss)


def test_the_job_prints_and_stores_a_table(tiny_llama_dir, smollm2_home, tmp_path, capsys):
    data = str(smollm2_home / "store" / "datasets" / "shakespeare")
    assert sensitivity_main(["--model", str(tiny_llama_dir), "--data", data, "--tokens", "128", "--window", "64",
                             "--step", "{method: rtn, bits: 4, group_size: 32}", "--layers", "*.self_attn.*",
                             "--store", str(tmp_path / "store")]) == 0
    (results,) = (tmp_path / "store" / "results").iterdir()
    rows = pq.read_table(results / "results.parquet").to_pylist()
    assert len(rows) == 8 and rows == sorted(rows, key=lambda r: -r["delta"])
    assert "delta" in capsys.readouterr().out
    assert sensitivity_main(["--model", str(tiny_llama_dir), "--data", data, "--step", "{method: rtn, bitz: 4}",
                             "--store", str(tmp_path / "store")]) == 2
