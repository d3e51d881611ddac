"""The autoscaling benchmark's numbers: a timeline (nodes, replicas, requests in flight, TTFT) as
Parquet and one PNG, and a summary row of what the loop did."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.store import Store
from jobs.bench.report import png_figure
from jobs.bench.serve_load import RequestResult

SUMMARY_COLUMNS = ["requests", "ok", "http_429", "server_errors", "max_worker_nodes", "worker_nodes_serving",
                   "max_replicas", "ttft_p50_s", "ttft_p99_s", "scale_up_s", "scale_down_s", "nodes_gone_s",
                   "final_replicas", "final_worker_nodes"]


def in_flight(results: list[RequestResult], t: float) -> int:
    return sum(r.start <= t < r.end for r in results)


def timeline_rows(samples: list[dict], results: list[RequestResult], t0: float) -> list[dict]:
    """Samples with time from t0 (the load's start) and the requests in flight at each; a replica state
    absent from a sample counts 0 there."""
    keys = sorted({k for s in samples for k in s if k.startswith("replicas_")})
    return [{**dict.fromkeys(keys, 0), **s, "t": s["t"] - t0, "in_flight": in_flight(results, s["t"])}
            for s in samples]


def request_rows(results: list[RequestResult], replica_node: dict[str, str], t0: float) -> list[dict]:
    return [{"start_s": r.start - t0, "end_s": r.end - t0, "ttft_s": r.ttft, "ok": r.ok, "status": r.status,
             "replica": r.replica, "node": replica_node.get(r.replica, ""), "output_tokens": r.output_tokens,
             "error": r.error[:200]} for r in results]


def summarize(timeline: list[dict], requests: list[dict], load_end_s: float, min_replicas: int) -> dict:
    ok = [r for r in requests if r["ok"]]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    after = [s for s in timeline if s["t"] >= load_end_s]
    idle = next((s for s in after if _at_minimum(s, min_replicas)), None)  # replicas gone: nodes idle from here
    settled = next((s for s in after if _at_minimum(s, min_replicas) and s["worker_nodes"] == 0), None)
    two_nodes = next((s for s in timeline if s["worker_nodes"] >= 2), None)
    return {
        "requests": len(requests), "ok": len(ok), "http_429": sum(r["status"] == 429 for r in requests),
        "server_errors": sum(not r["ok"] and r["status"] != 429 for r in requests),
        "max_worker_nodes": max((s["worker_nodes"] for s in timeline), default=0),
        "worker_nodes_serving": len({r["node"] for r in ok if r["node"]}),
        "max_replicas": max((s.get("replicas_running", 0) for s in timeline), default=0),
        "ttft_p50_s": float(np.percentile(ttfts, 50)) if ttfts else None,
        "ttft_p99_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "scale_up_s": two_nodes["t"] if two_nodes else None,  # from the load's start to 2 worker nodes
        "scale_down_s": settled["t"] - load_end_s if settled else None,  # from the load's end to the minimum
        "nodes_gone_s": settled["t"] - idle["t"] if settled and idle else None,  # from idle nodes to none
        "final_replicas": timeline[-1].get("replicas_running", 0) if timeline else None,
        "final_worker_nodes": timeline[-1]["worker_nodes"] if timeline else None,
    }


def _at_minimum(sample: dict, min_replicas: int) -> bool:
    return sample.get("replicas_running", 0) <= min_replicas and not sample.get("replicas_starting", 0)


def plot(timeline: list[dict], requests: list[dict], load_end_s: float, path: Path, title: str) -> None:
    t = [s["t"] for s in timeline]
    panels = [("worker nodes", [s["worker_nodes"] for s in timeline]),
              ("replicas running", [s.get("replicas_running", 0) for s in timeline]),
              ("requests in flight", [s["in_flight"] for s in timeline])]
    with png_figure(path, (9, 9), ncols=1) as (fig, _):
        fig.clf()
        axes = fig.subplots(4, 1, sharex=True)
        for ax, (label, values) in zip(axes, panels):
            ax.step(t, values, where="post")
            ax.set_ylabel(label, fontsize=9)
        ok = [r for r in requests if r["ok"] and r["ttft_s"] is not None]
        axes[3].scatter([r["start_s"] for r in ok], [r["ttft_s"] for r in ok], s=6)
        axes[3].set_yscale("log")
        axes[3].set_ylabel("TTFT (s), by send time", fontsize=9)
        axes[3].set_xlabel("seconds from the load's start")
        for ax in axes:
            ax.axvline(0, color="C2", lw=0.8)
            ax.axvline(load_end_s, color="C3", lw=0.8)
        axes[0].set_title(title + "\n(green: load starts, red: load ends)", fontsize=10)


def store_autoscale_results(summary: dict, timeline: list[dict], requests: list[dict], load_end_s: float,
                            report: str, title: str, store: Store) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pq.write_table(pa.Table.from_pylist([summary]), out / "results.parquet")
        pq.write_table(pa.Table.from_pylist(timeline), out / "timeline.parquet")
        pq.write_table(pa.Table.from_pylist(requests), out / "requests.parquet")
        (out / "results.md").write_text(report + "\n")
        plot(timeline, requests, load_end_s, out / "autoscale.png", title)
        name = f"bench_autoscale-{time.strftime('%Y%m%d-%H%M%S')}"
        return store.put_dir("results", name, out, {"source": "bench_autoscale"}).uri
