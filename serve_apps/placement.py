"""Whether a tensor-parallel replica's placement group can be placed on the nodes there are now.

Serve would only warn and wait for room that never comes; `build_app` asks this first and fails
with what is missing. Ray's rules: STRICT_PACK puts every bundle on one node, STRICT_SPREAD each on
a different node, PACK and SPREAD wherever they fit (here: each bundle on some node, the sum on all).
"""
from __future__ import annotations

from collections import Counter


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(resource, 0) >= amount for resource, amount in bundle.items())


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: Counter = Counter()
    for bundle in bundles:
        total.update(bundle)
    return dict(total)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(resources.items()))


def _on_distinct_nodes(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Each bundle on a node of its own: the largest first, each to the smallest free node that fits."""
    free = sorted(nodes, key=lambda node: sum(node.values()))
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        node = next((n for n in free if _fits(bundle, n)), None)
        if node is None:
            return False
        free.remove(node)
    return True


def placement_problem(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> str | None:
    """Why the bundles cannot be placed on `nodes` (each node's resources), or None if they can."""
    need = _total(bundles)
    if strategy == "STRICT_PACK":
        if not any(_fits(need, node) for node in nodes):
            return f"STRICT_PACK needs {_describe(need)} on one node; no node has it"
        return None
    if strategy == "STRICT_SPREAD":
        if not _on_distinct_nodes(bundles, nodes):
            return (f"STRICT_SPREAD needs {len(bundles)} nodes, one per rank ({', '.join(map(_describe, bundles))}); "
                    "the nodes cannot hold them apart")
        return None
    if unplaceable := [b for b in bundles if not any(_fits(b, node) for node in nodes)]:
        return f"{strategy}: no node has {_describe(unplaceable[0])} for one rank"
    if not _fits(need, _total(nodes)):
        return f"{strategy} needs {_describe(need)} in all; the cluster has {_describe(_total(nodes))}"
    return None
