"""The serving benchmark's numbers: one row per router policy, kv_aware's ratios, a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.store import Store
from jobs.bench.report import png_figure, store_results
from jobs.bench.serve_load import RequestResult

PERCENTILES = (50, 90, 99)
COLUMNS = ["policy", "requests", "ok", "seconds", "output_tokens_per_s", "requests_per_s", "prefix_hit_rate",
           *[f"ttft_p{p}_s" for p in PERCENTILES], *[f"itl_p{p}_s" for p in PERCENTILES],
           *[f"e2e_p{p}_s" for p in PERCENTILES], "replicas_used", "replicas_per_prefix"]


def _percentiles(name: str, values: list[float]) -> dict:
    if not values:
        return {f"{name}_p{p}_s": None for p in PERCENTILES}
    return {f"{name}_p{p}_s": float(np.percentile(values, p)) for p in PERCENTILES}


def summarize(policy: str, results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "policy": policy, "requests": len(results), "ok": len(ok), "seconds": wall_s,
        "output_tokens": sum(r.output_tokens for r in ok), "prompt_tokens": prompt,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s, "requests_per_s": len(ok) / wall_s,
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        **_percentiles("ttft", [r.ttft for r in ok if r.ttft is not None]),
        **_percentiles("itl", [gap for r in ok for gap in r.inter_token_latencies]),
        **_percentiles("e2e", [r.end - r.start for r in ok]),
        "replicas_used": len({r.replica for r in ok}),
        "replicas_per_prefix": _replicas_per_prefix(ok),
        "errors": "; ".join(sorted({r.error for r in results if r.error}))[:500],
    }


def _replicas_per_prefix(results: list[RequestResult]) -> float:
    """How many replicas served each distinct first message, on average (1: perfect affinity)."""
    by_prefix: dict[str, set[str]] = {}
    for r in results:
        by_prefix.setdefault(r.first_message, set()).add(r.replica)
    return sum(map(len, by_prefix.values())) / len(by_prefix) if by_prefix else 0.0


def ratios(rows: list[dict], ours: str = "kv_aware") -> list[dict]:
    """kv_aware ÷ each other policy: hit rate and throughput higher is better, TTFT p50 lower."""
    mine = next((r for r in rows if r["policy"] == ours), None)
    if mine is None:
        return []
    out = []
    for peer in (r for r in rows if r["policy"] != ours):
        for measure in ("prefix_hit_rate", "output_tokens_per_s"):
            out.append({"measure": f"{measure}, kv_aware ÷ peer", "peer": peer["policy"],
                        "ratio": mine[measure] / peer[measure] if peer[measure] else float("inf")})
        if mine["ttft_p50_s"] and peer["ttft_p50_s"]:
            out.append({"measure": "ttft_p50_s, peer ÷ kv_aware", "peer": peer["policy"],
                        "ratio": peer["ttft_p50_s"] / mine["ttft_p50_s"]})
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    policies = [r["policy"] for r in rows]
    panels = [("output_tokens_per_s", "output tokens / s"), ("prefix_hit_rate", "prefix hit rate"),
              ("ttft_p50_s", "TTFT p50 (s)"), ("e2e_p90_s", "end-to-end p90 (s)")]
    with png_figure(path, (4 * len(panels), 3.6), ncols=len(panels)) as (fig, axes):
        for ax, (key, label) in zip(axes, panels):
            ax.bar(policies, [r[key] or 0 for r in rows],
                   color=["C0" if p == "kv_aware" else "C7" for p in policies])
            ax.set_title(label, fontsize=10)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.suptitle(title, fontsize=10)


def store_serve_results(rows: list[dict], report: str, title: str, store: Store) -> str:
    return store_results("bench_serve", rows, report, title, store, plot=plot)
