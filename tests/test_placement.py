"""Whether a tensor-parallel replica's bundles fit the nodes, by Ray's placement strategies."""
import pytest

from serve_apps.app import ServeAppConfig, _deployment_options
from serve_apps.placement import placement_problem

TP2 = [{"CPU": 1}, {"CPU": 1}]
TWO_SMALL_NODES = [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]


def test_strict_pack_needs_one_node_with_the_sum():
    assert placement_problem(TP2, "STRICT_PACK", [{"CPU": 2}]) is None
    assert placement_problem(TP2, "STRICT_PACK", TWO_SMALL_NODES) == "STRICT_PACK needs CPU 2 on one node; no node has it"


def test_spread_and_pack_may_span_nodes_but_not_exceed_them():
    assert placement_problem(TP2, "SPREAD", TWO_SMALL_NODES) is None
    assert placement_problem(TP2, "PACK", TWO_SMALL_NODES) is None
    assert "needs CPU 3 in all" in placement_problem([{"CPU": 1}] * 3, "PACK", TWO_SMALL_NODES)
    assert placement_problem([{"CPU": 2}, {"CPU": 1}], "SPREAD", TWO_SMALL_NODES) == \
        "SPREAD: no node has CPU 2 for one rank"


def test_strict_spread_needs_a_node_per_rank():
    assert placement_problem(TP2, "STRICT_SPREAD", TWO_SMALL_NODES) is None
    assert "needs 3 nodes, one per rank" in placement_problem([{"CPU": 1}] * 3, "STRICT_SPREAD", TWO_SMALL_NODES)
    # a large replica and a small worker fit a large and a small node
    assert placement_problem([{"CPU": 4}, {"CPU": 1}], "STRICT_SPREAD", [{"CPU": 1}, {"CPU": 4}]) is None
    assert placement_problem([{"CPU": 4}, {"CPU": 4}], "STRICT_SPREAD", [{"CPU": 1}, {"CPU": 4}]) is not None


@pytest.mark.parametrize("gpus", [0, 1])
def test_a_tp_replica_asks_serve_for_its_placement_group(gpus):
    config = ServeAppConfig.model_validate({"models": [{
        "model_id": "m", "model": "m", "num_cpus_per_replica": 2,
        "engine": {"tensor_parallel_size": 3, "num_cpus_per_worker": 1, "num_gpus_per_worker": gpus,
                   "placement_strategy": "SPREAD"}}]})
    options = _deployment_options(config.models[0])
    gpu = {"GPU": 1} if gpus else {}
    assert options["placement_group_bundles"] == [{"CPU": 2, **gpu}, {"CPU": 1, **gpu}, {"CPU": 1, **gpu}]
    assert options["placement_group_strategy"] == "SPREAD"
    assert options["ray_actor_options"] == {"num_cpus": 2, **({"num_gpus": 1} if gpus else {})}


def test_one_rank_keeps_serve_s_plain_options():
    config = ServeAppConfig.model_validate({"models": [{"model_id": "m", "model": "m"}]})
    assert "placement_group_bundles" not in _deployment_options(config.models[0])
