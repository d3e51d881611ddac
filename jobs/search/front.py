"""The Pareto front of finished trials, and the one recipe chosen from it."""
from __future__ import annotations

import math

from jobs.search.config import DIRECTION


def cost(row: dict, objective: str) -> float:
    """The objective as a cost, lower better; unmeasured counts as the worst."""
    value = row.get(objective)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    return value if DIRECTION[objective] == "min" else -value


def dominates(a: dict, b: dict, objectives: list[str]) -> bool:
    costs = [(cost(a, o), cost(b, o)) for o in objectives]
    return all(x <= y for x, y in costs) and any(x < y for x, y in costs)


def pareto_front(rows: list[dict], objectives: list[str]) -> list[int]:
    """Indices of the rows no other row dominates (equal rows all stay)."""
    return [i for i, row in enumerate(rows)
            if not any(dominates(other, row, objectives) for j, other in enumerate(rows) if j != i)]


def choose(rows: list[dict], limit: float, minimize: str, min_decode_b1: float | None) -> dict | None:
    """The finished row within the perplexity limit (and at least `min_decode_b1` tokens/s at batch 1)
    with the least `minimize`; ties go to the faster one."""
    fits = [r for r in rows if r["status"] == "complete" and r["ppl"] <= limit
            and (min_decode_b1 is None or (r.get("decode_b1") or 0) >= min_decode_b1)]
    return min(fits, key=lambda r: (cost(r, minimize), -(r.get("decode_b1") or 0)), default=None)


def closest(rows: list[dict]) -> dict | None:
    """The row with the lowest perplexity ratio to the uncompressed model, stopped ones included."""
    measured = [r for r in rows if r.get("ppl_ratio") is not None]
    return min(measured, key=lambda r: r["ppl_ratio"], default=None)
