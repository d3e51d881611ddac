"""Training results into the results store: the metric history as Parquet, the summary as JSON, and a
PNG of loss and validation perplexity over steps (one line per run when several are compared)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.store import Store
from jobs.bench.report import png_figure


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    with png_figure(path, (11, 4), ncols=2) as (fig, (loss, ppl)):
        for label, history in curves.items():
            loss.plot([h["step"] for h in history], [h["loss"] for h in history], label=label, linewidth=1)
            evals = [h for h in history if "val_ppl" in h]
            ppl.plot([h["step"] for h in evals], [h["val_ppl"] for h in evals], marker="o", label=label)
        loss.set_xlabel("step")
        loss.set_ylabel("training loss")
        ppl.set_xlabel("step")
        ppl.set_ylabel("validation perplexity")
        for axis in (loss, ppl):
            axis.legend(fontsize=8)
        fig.suptitle(title)


def store_training_results(name: str, history: list[dict] | dict[str, list[dict]], summary: dict,
                           store: Store) -> str:
    """`history`: one run's metrics per step, or {run label: its metrics}; returns the artifact's URI."""
    curves = history if isinstance(history, dict) else {name: history}
    rows = [{"run": label, **h} for label, runs in curves.items() for h in runs]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pq.write_table(pa.Table.from_pylist(rows), out / "history.parquet")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(curves, out / "curves.png", name)
        artifact = store.put_dir("results", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", out, {"source": name})
    return artifact.uri
