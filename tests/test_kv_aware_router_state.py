"""The KV-aware router's decision, without Ray: prefix first, unless load is too uneven."""
import pytest

from serve_apps.engine.block_hash import hash_full_blocks
from serve_apps.routing.kv_aware_state import KVAwareRouterState

SYSTEM_A = list(range(100, 164))  # 4 blocks of 16
SYSTEM_B = list(range(500, 564))


def _hashes(tokens):
    return hash_full_blocks(tokens, 16)


def test_longest_cached_prefix_wins():
    state = KVAwareRouterState(max_imbalance=4, seed=0)
    state.report("r1", _hashes(SYSTEM_A)[:2])  # half of A's prefix
    state.report("r2", _hashes(SYSTEM_A))  # all of it
    state.report("r3", _hashes(SYSTEM_B))
    decision = state.choose(_hashes(SYSTEM_A + list(range(20))), {"r1": 0, "r2": 2, "r3": 0})
    assert decision.ranked[0] == "r2" and decision.matched_blocks == 4 and decision.reason == "prefix"
    assert sorted(decision.ranked) == ["r1", "r2", "r3"]


def test_a_cached_prefix_waits_for_its_replica_before_spilling():
    """Serve tries the tiers in order; a replica slow to answer its probe is skipped, so the
    prefix's replica stands alone for a while, and a new prefix may go anywhere at once."""
    state = KVAwareRouterState(seed=0)
    state.report("r1", _hashes(SYSTEM_A))
    state.report("r2", [])
    hit = state.choose(_hashes(SYSTEM_A), {"r1": 0, "r2": 0})
    assert hit.tiers(waited_s=0.0, patience_s=1.0) == [["r1"]]
    assert hit.tiers(waited_s=1.5, patience_s=1.0) == [["r1"], ["r2"]]
    miss = state.choose(_hashes(SYSTEM_B), {"r1": 0, "r2": 0})
    assert miss.reason == "new_prefix" and miss.tiers(waited_s=0.0) == [["r2"], ["r1"]]


def test_a_hit_needs_the_whole_prefix():
    state = KVAwareRouterState(seed=0)
    state.report("r1", _hashes(SYSTEM_B + SYSTEM_A)[4:])  # A's blocks, but after B: other hashes
    assert state.matched_blocks("r1", _hashes(SYSTEM_A)) == 0


def test_imbalance_overrides_the_prefix():
    state = KVAwareRouterState(max_imbalance=4, seed=0)
    state.report("r1", _hashes(SYSTEM_A))
    state.report("r2", [])
    decision = state.choose(_hashes(SYSTEM_A), {"r1": 10, "r2": 1})
    assert decision.ranked[0] == "r2" and decision.reason == "least_loaded"
    assert state.choose(_hashes(SYSTEM_A), {"r1": 5, "r2": 1}).ranked[0] == "r1"  # within the threshold


def test_a_prompt_without_a_full_block_goes_to_the_less_loaded_of_two():
    state = KVAwareRouterState(seed=1)
    loads = {"r1": 3, "r2": 0, "r3": 5}
    picks = {state.choose([], loads).ranked[0] for _ in range(50)}
    assert picks == {"r1", "r2"}  # pairs (r1,r2)->r2, (r1,r3)->r1, (r2,r3)->r2: r3 never wins a pair
    assert state.choose([], loads).reason == "pow2"


def test_a_new_prefix_goes_where_the_fewest_blocks_are_cached():
    state = KVAwareRouterState(max_imbalance=4, seed=0)
    state.report("r1", _hashes(SYSTEM_A))
    state.report("r2", [])
    decision = state.choose(_hashes(SYSTEM_B), {"r1": 0, "r2": 2})
    assert decision.ranked[0] == "r2" and decision.reason == "new_prefix"
    tenants = [list(range(1000 * t, 1000 * t + 64)) for t in range(1, 9)]
    fresh = KVAwareRouterState(seed=0)
    for tokens in tenants:  # eight new prefixes arriving together spread four and four
        replica = fresh.choose(_hashes(tokens), {"r1": 0, "r2": 0}).ranked[0]
        fresh.record_routed(replica, _hashes(tokens))
    held = {r: sum(fresh.matched_blocks(r, _hashes(tokens)) == 4 for tokens in tenants) for r in ("r1", "r2")}
    assert held == {"r1": 4, "r2": 4}


def test_a_burst_follows_its_first_request_before_stats_arrive():
    state = KVAwareRouterState(max_imbalance=8, seed=0)
    loads = {"r1": 0, "r2": 0}
    first = state.choose(_hashes(SYSTEM_A), loads).ranked[0]
    state.record_routed(first, _hashes(SYSTEM_A))
    loads[first] += 1
    for _ in range(5):
        decision = state.choose(_hashes(SYSTEM_A + [7] * 16), loads)
        assert decision.ranked[0] == first and decision.reason == "prefix"
        loads[first] += 1


def test_a_stale_report_does_not_erase_a_recent_route_but_expiry_does():
    state = KVAwareRouterState(seed=0, routed_ttl_s=10)
    state.record_routed("r1", _hashes(SYSTEM_A), now=100.0)
    state.report("r1", [], now=101.0)  # taken before the request's prefill ran
    assert state.matched_blocks("r1", _hashes(SYSTEM_A), now=101.0) == 4
    assert state.matched_blocks("r1", _hashes(SYSTEM_A), now=111.0) == 0  # never confirmed: gone
    state.record_routed("r1", _hashes(SYSTEM_A), now=200.0)
    state.report("r1", _hashes(SYSTEM_A)[:3], now=201.0)  # confirmed, the last block not (yet)
    assert state.matched_blocks("r1", _hashes(SYSTEM_A), now=220.0) == 3


def test_reports_replace_and_forget_removes():
    state = KVAwareRouterState(seed=0)
    state.report("r1", _hashes(SYSTEM_A))
    state.report("r1", [])  # evicted since
    assert state.matched_blocks("r1", _hashes(SYSTEM_A)) == 0
    state.forget("r1")
    with pytest.raises(ValueError, match="no candidate"):
        state.choose(_hashes(SYSTEM_A), {})
    with pytest.raises(ValueError, match="max_imbalance"):
        KVAwareRouterState(max_imbalance=-1)
    with pytest.raises(ValueError, match="routed_ttl_s"):
        KVAwareRouterState(routed_ttl_s=0)
