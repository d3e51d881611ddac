"""The Pareto front and the chosen recipe, on rows made by hand."""
from jobs.search.config import SearchConfig
from jobs.search.confirm import candidates
from jobs.search.front import choose, closest, dominates, pareto_front
from jobs.search.replay import could_change_choice

OBJECTIVES = ["ppl", "linear_bytes", "decode_b1"]


def row(name, ppl, size, speed, status="complete", ratio=None):
    return {"recipe_name": name, "ppl": ppl, "linear_bytes": size, "decode_b1": speed, "status": status,
            "ppl_ratio": ratio if ratio is not None else ppl / 10}


ROWS = [
    row("int8", 10.1, 100, 50),
    row("int4", 10.6, 60, 60),
    row("int4-copy", 10.6, 60, 60),  # equal to int4: neither dominates, both stay
    row("worse-int4", 10.7, 60, 55),  # dominated by int4 on every objective
    row("sparse", 10.3, 80, None),  # speed unmeasured counts as the worst speed
    row("fast-but-big", 10.9, 120, 90),
]


def test_the_front_is_non_dominated_and_complete():
    front = pareto_front(ROWS, OBJECTIVES)
    assert [ROWS[i]["recipe_name"] for i in front] == ["int8", "int4", "int4-copy", "sparse", "fast-but-big"]
    for i in front:
        assert not any(dominates(other, ROWS[i], OBJECTIVES) for other in ROWS)
    for j in set(range(len(ROWS))) - set(front):
        assert any(dominates(ROWS[i], ROWS[j], OBJECTIVES) for i in front)


def test_directions_are_respected():
    assert dominates(row("a", 10, 50, 80), row("b", 10, 50, 70), OBJECTIVES)  # faster is better
    assert not dominates(row("a", 10, 50, 70), row("b", 10, 50, 80), OBJECTIVES)
    assert pareto_front([row("a", 10, 50, 70), row("b", 11, 40, 70)], ["ppl", "linear_bytes"]) == [0, 1]


def test_choose_takes_the_smallest_within_budget_and_above_the_speed_floor():
    assert choose(ROWS, limit=10.65, minimize="linear_bytes", min_decode_b1=None)["recipe_name"] == "int4"
    assert choose(ROWS, limit=10.65, minimize="linear_bytes", min_decode_b1=55)["recipe_name"] == "int4"
    assert choose(ROWS, limit=10.5, minimize="linear_bytes", min_decode_b1=None)["recipe_name"] == "sparse"
    assert choose(ROWS, limit=10.5, minimize="linear_bytes", min_decode_b1=40)["recipe_name"] == "int8"
    stopped = [row("stopped", 10.0, 10, None, status="stopped")]
    assert choose(stopped, limit=11, minimize="linear_bytes", min_decode_b1=None) is None
    assert choose(ROWS, limit=10.0, minimize="ppl", min_decode_b1=None) is None


def test_ties_go_to_the_faster():
    rows = [row("slow", 10, 60, 40), row("fast", 10, 60, 45)]
    assert choose(rows, limit=11, minimize="linear_bytes", min_decode_b1=None)["recipe_name"] == "fast"


def test_closest_counts_stopped_trials():
    rows = [row("a", 20, 10, None, status="stopped", ratio=2.0), row("b", 15, 10, None, ratio=1.5),
            {"recipe_name": "failed", "ppl": None, "ppl_ratio": None, "status": "error"}]
    assert closest(rows)["recipe_name"] == "b"
    assert closest([rows[2]]) is None


def test_speed_candidates_are_within_budget_near_the_reference_smallest_first():
    config = SearchConfig.model_validate({"name": "s", "model": "m", "budget": {"max_ppl_increase": 0.05},
                                          "num_trials": 2, "choose": {"min_decode_b1_vs": "int8"}})
    extra = [ROWS[1], row("slow", 10.5, 40, 30)]
    rows = [{**r, "recipe_yaml": f"name: {r['recipe_name']}", "seed_name": None} for r in ROWS + extra]
    reference = rows[0]
    picked = candidates(config, rows, limit=10.65, reference=reference)
    # 0.8 x 50 = 40 tok/s is the floor: `slow` and `sparse` (unmeasured) are out; int4 twice is one candidate
    assert [r["recipe_name"] for r in picked] == ["int4", "int4-copy", "int8"]
    assert [r["recipe_name"] for r in candidates(config, rows, limit=10.2, reference=reference)] == ["int8"]


def test_only_stopped_trials_no_bigger_than_the_choice_could_change_it():
    stopped = [row("small", 30, 50, None, "stopped"), row("same", 30, 60, None, "stopped"),
               row("big", 11, 70, None, "stopped"), row("unmeasured", 12, None, None, "stopped")]
    chosen = ROWS[1]  # int4: 60 bytes
    names = [r["recipe_name"] for r in could_change_choice(stopped, chosen, "linear_bytes")]
    assert names == ["small", "same", "unmeasured"]  # an unknown value could be anything
    assert could_change_choice(stopped, None, "linear_bytes") == stopped  # nothing chosen: all could be
    assert could_change_choice(stopped, chosen, "ppl") == stopped  # a stopped trial's ppl is not its last
