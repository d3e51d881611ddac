"""Benchmark results: a printed table, Parquet, Markdown and a PNG, stored as one result artifact."""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.store import Store


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if value is None:
            return "—"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def png_figure(path: Path, figsize: tuple[float, float], ncols: int = 1):
    """Yields (figure, axes): `ncols` axes side by side (one Axes when 1), drawn off-screen and written
    to `path` as a PNG when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_throughput(rows: list[dict], path: Path, title: str) -> None:
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    width = 0.8 / len(engines)
    with png_figure(path, (max(6, 2.2 * len(scenarios)), 4)) as (_, ax):
        for i, engine in enumerate(engines):
            values = [next((r["tokens_per_s"] for r in rows if r["engine"] == engine and r["scenario"] == s), 0)
                      for s in scenarios]
            ax.bar([x + i * width for x in range(len(scenarios))], values, width, label=engine)
        ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(scenarios))], scenarios)
        ax.set_ylabel("output tokens / s")
        ax.set_title(title)
        ax.legend(fontsize=8)


def store_results(name: str, rows: list[dict], markdown: str, title: str, store: Store,
                  plot=plot_throughput) -> str:
    """`plot(rows, path, title)` draws the artifact's PNG."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pq.write_table(pa.Table.from_pylist(rows), out / "results.parquet")
        (out / "results.md").write_text(markdown + "\n")
        plot(rows, out / "throughput.png", title)
        artifact = store.put_dir("results", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", out, {"source": name})
    return artifact.uri
