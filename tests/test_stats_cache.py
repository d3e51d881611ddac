"""Calibration statistics of the original model: merged exactly, stored exactly, collected once and
reused by every compression of the same model and data."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import jobs.compress.pipeline as pipeline
from cluster.cli import _main as rayfoundry
from cluster.store import Store
from jobs.compress.calibration import (
    KINDS, InputStats, collect, collect_partial, sample_stride, stats_from_tensors, stats_to_tensors,
)
from jobs.compress.pipeline import compress_model, read_calibration_tokens
from jobs.compress.recipe import Recipe, apply_recipe, collect_original, stats_to_collect
from jobs.compress.stats_cache import KIND, cache_key, data_identity, ensure_stored, load_or_collect, model_identity
from jobs.data.prepared import open_dataset
from jobs.models.load import model_dir, open_model

CALIBRATION = {"samples": 4, "seq_len": 32, "batch_size": 2, "max_samples": 16}
STEPS = [{"method": "gptq", "bits": 4, "group_size": 32, "modules": ["*.self_attn.*"]},
         {"method": "wanda", "sparsity": 0.5, "modules": ["*.mlp.*"]}]
FIELDS = ("hessian", "sq_norm", "abs_mean", "abs_max", "samples")


@pytest.fixture
def data(smollm2_home) -> str:
    return str(smollm2_home / "store" / "datasets" / "shakespeare")


def recipe(data: str, stats_from: str = "original", steps=STEPS) -> Recipe:
    return Recipe.model_validate({"name": "r", "calibration": {"data": data, **CALIBRATION, "stats_from": stats_from},
                                  "steps": steps})


def linears(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def assert_same_stats(a: dict[str, InputStats], b: dict[str, InputStats]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].tokens, a[name].is_final) == (b[name].tokens, b[name].is_final), name
        for kind in FIELDS:
            x, y = getattr(a[name], kind), getattr(b[name], kind)
            assert (x is None and y is None) or torch.equal(x, y), (name, kind)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_two_halves_merge_into_exactly_one_pass(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batches = [torch.randint(100, 5000, (2, 16)) for _ in range(2)]
    every = sample_stride(batches, 8)
    first = collect_partial(model, linears(model), KINDS, batches[:1], every, progress=False)
    second = collect_partial(model, linears(model), KINDS, batches[1:], every, progress=False)
    merged = {name: first[name].merge(second[name]).finish() for name in first}
    assert_same_stats(merged, collect(model, linears(model), KINDS, batches, max_samples=8, progress=False))
    with pytest.raises(ValueError, match="merge before finish"):
        merged["lm_head"].merge(merged["lm_head"])


def round_trip(stats: dict[str, InputStats], path) -> dict[str, InputStats]:
    save_file(stats_to_tensors(stats), path)
    return stats_from_tensors(load_file(path))


def test_statistics_round_trip_through_safetensors_exactly(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batches = [torch.randint(100, 5000, (2, 16)) for _ in range(2)]
    final = collect(model, linears(model), KINDS, batches, max_samples=8, progress=False)
    assert_same_stats(round_trip(final, tmp_path / "final.safetensors"), final)

    # unfinished statistics come back still mergeable: stored, merged and finished as if never stored
    first, second = (collect_partial(model, linears(model), KINDS, [batch], 4, progress=False) for batch in batches)
    first_back = round_trip(first, tmp_path / "partial.safetensors")
    assert not any(s.is_final for s in first_back.values())
    assert_same_stats({n: first_back[n].merge(second[n]).finish() for n in first},
                      {n: first[n].merge(second[n]).finish() for n in first})


def test_cached_original_statistics_compress_exactly_as_freshly_collected_ones(tiny_llama_dir, data, tmp_path):
    r = recipe(data)
    dataset = open_dataset(data, Store(str(tmp_path / "store")))
    tokens = read_calibration_tokens(dataset, r.calibration)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    apply_recipe(fresh, r, tokens, progress=False)

    store, source = Store(str(tmp_path / "store")), open_model(str(tiny_llama_dir))
    for _ in range(2):  # the first call collects and stores, the second reads the store
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        kinds, layers = stats_to_collect(model, r)
        stats = load_or_collect(store, source, dataset, r.calibration, kinds, layers,
                                lambda: collect_original(model, r, tokens, kinds, layers, progress=False))
        apply_recipe(model, r, tokens, progress=False, stats=stats)
        assert_same_weights(model, fresh)
    assert len(store.list(KIND)) == 1


def test_the_key_follows_the_data_split_and_calibration_settings_only(tiny_llama_dir, data, tmp_path):
    r = recipe(data)
    dataset, model = open_dataset(data, Store(str(tmp_path / "store"))), open_model(str(tiny_llama_dir))
    kinds, layers = ["hessian"], ["model.layers.0.mlp.down_proj"]

    def key(split="train", model_files=None, kinds=kinds, layers=layers, **settings):
        calibration = r.calibration.model_copy(update=settings)
        return cache_key(model_files or model_identity(model), data_identity(dataset, split), calibration,
                         kinds, layers)

    base = key()
    assert key() == base
    assert key(stats_from="sequential") == base
    assert key(data="the same shards under another name") == base
    assert key(kinds=["hessian"], layers=list(reversed(layers))) == base
    changed = [key(split="validation"), key(seq_len=16), key(samples=8), key(batch_size=4), key(max_samples=8),
               key(kinds=["hessian", "sq_norm"]), key(layers=layers + ["lm_head"]),
               key(model_files={**model_identity(model), "config.json": "0" * 64})]
    assert len({base, *changed}) == len(changed) + 1


def test_compress_stores_the_statistics_once_and_reuses_them(tiny_llama_dir, data, tmp_path, monkeypatch, capsys):
    store = Store(str(tmp_path / "store"))
    compress_model(str(tiny_llama_dir), recipe(data), "first", store)
    assert "collected and stored as cache" in capsys.readouterr().out
    (cached,) = store.list(KIND)
    stats_file = tmp_path / "store" / KIND / cached.name / "stats.safetensors"
    stored_at = stats_file.stat().st_mtime_ns

    def must_not_collect(*args, **kwargs):
        raise AssertionError("statistics collected again although stored")

    monkeypatch.setattr(pipeline, "collect_original", must_not_collect)
    compress_model(str(tiny_llama_dir), recipe(data), "second", store)
    assert "reusing stored cache" in capsys.readouterr().out
    assert [a.manifest for a in store.list(KIND)] == [cached.manifest]
    assert stats_file.stat().st_mtime_ns == stored_at
    weights = [store.get("models", name).manifest["files"]["model.safetensors"] for name in ("first", "second")]
    assert weights[0] == weights[1]  # the same checkpoint, bit for bit

    assert rayfoundry(["cache", "list", "--store", store.uri]) == 0
    assert cached.name in capsys.readouterr().out


def test_sequential_recipes_leave_the_store_alone(tiny_llama_dir, data, tmp_path):
    store = Store(str(tmp_path / "store"))
    compress_model(str(tiny_llama_dir), recipe(data, "sequential"), "out", store)
    assert store.list(KIND) == []


def test_original_statistics_are_refused_after_steps_that_change_the_inputs():
    steps = [{"method": "smoothquant"}, {"method": "w8a8", "activations": "static", "exclude": ["lm_head"]}]
    with pytest.raises(ValueError, match="use stats_from: sequential"):
        recipe("d", "original", steps)
    recipe("d", "sequential", steps)


def test_statistics_given_must_cover_every_step(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokens = torch.randint(100, 5000, (4 * 32,))
    with pytest.raises(ValueError, match="lack"):
        apply_recipe(model, recipe("d"), tokens, progress=False,
                     stats=collect(model, linears(model), {"sq_norm"}, [tokens.view(4, 32)], progress=False))
    with pytest.raises(ValueError, match="only with `stats_from: original`"):
        apply_recipe(model, recipe("d", "sequential"), tokens, progress=False, stats={})


def test_statistics_stored_for_more_layers_and_kinds_serve_a_recipe_that_needs_fewer(
        tiny_llama_dir, data, tmp_path, monkeypatch, capsys):
    """As a search stores them for every layer, and `jobs.compress` reapplies one of its recipes."""
    r = recipe(data)
    elsewhere = Store(str(tmp_path / "elsewhere"))
    compress_model(str(tiny_llama_dir), r, "fresh", elsewhere)  # collects exactly what the recipe needs
    store = Store(str(tmp_path / "store"))
    dataset, source = open_dataset(data, store), open_model(str(tiny_llama_dir))
    tokens = read_calibration_tokens(dataset, r.calibration)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    everything = sorted(linears(model))
    ensure_stored(store, source, dataset, r.calibration, KINDS, everything,
                  lambda: collect_original(model, r, tokens, frozenset(KINDS), everything, progress=False))
    monkeypatch.setattr(pipeline, "collect_original", lambda *a, **k: pytest.fail("collected although stored"))
    compress_model(str(tiny_llama_dir), r, "reapplied", store)
    assert "which covers these layers" in capsys.readouterr().out
    ours, theirs = (load_file(model_dir(name, s) / "model.safetensors")
                    for name, s in (("reapplied", store), ("fresh", elsewhere)))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len(store.list(KIND)) == 1
