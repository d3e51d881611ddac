"""`python -m jobs.compare` runs end to end on a tiny model and stores one row per recipe."""
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.compare import main as compare_main


@pytest.fixture
def recipes(tmp_path):
    paths = []
    for name, step in [("int8", {"method": "rtn", "bits": 8}),
                       ("int4", {"method": "rtn", "bits": 4, "group_size": 32, "exclude": ["lm_head"]})]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "steps": [step]}))
        paths.append(str(path))
    return paths


def test_compare_measures_every_recipe_against_the_uncompressed_model(tmp_path, tiny_llama_dir, smollm2_home,
                                                                      recipes):
    store = tmp_path / "store"
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_llama_dir), "recipes": recipes, "store": str(store),
        "data": str(smollm2_home / "store" / "datasets" / "shakespeare"), "tokens": 256, "window": 64,
        "batch_sizes": [1, 4], "prompt_tokens": 8, "max_tokens": 6, "engine": {"num_blocks": 64, "block_size": 4}}))
    assert compare_main(["--config", str(config)]) == 0
    (results,) = (store / "results").iterdir()
    rows = {r["variant"]: r for r in pq.read_table(results / "results.parquet").to_pylist()}
    assert list(rows) == ["fp32", "int8", "int4"]
    assert rows["fp32"]["ppl_change"] == 0 and rows["fp32"]["model_ratio"] == 1
    assert 0.25 <= rows["int8"]["linears_ratio"] <= 0.27  # one byte per weight plus a scale per row
    assert rows["int4"]["linears_ratio"] < 0.16 and rows["int4"]["model_bytes"] < rows["int8"]["model_bytes"]
    assert all(r["decode_tok_s_b1"] > 0 and r["decode_tok_s_b4"] > 0 for r in rows.values())
    assert (store / "models" / f"{tiny_llama_dir.name}.int8" / "compression.json").is_file()
    assert (results / "throughput.png").stat().st_size > 1000
    assert "linears_ratio" in (results / "results.md").read_text()
    assert compare_main(["--config", str(config)]) == 0  # a second run reuses the stored checkpoints
