"""`rayfoundry dashboards render`: every panel of every dashboard drawn from Prometheus's query_range,
one PNG sheet per dashboard, for when there is no Grafana. Template variables take Grafana's "All"."""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import prometheus
from cluster.dashboard_model import Dashboard, Panel, Query
from cluster.errors import UserError

POINTS = 240  # per series: enough for a smooth line, few enough for a quick query
MIN_STEP_S = 1.0
COLUMNS = 2
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
AXIS_LABEL = {"s": "seconds", "reqps": "per second", "percentunit": "fraction", "percent": "percent",
              "bytes": "bytes", "short": ""}  # Grafana's unit ids, as words


@dataclass(frozen=True)
class Sheet:
    path: Path
    panels: int
    without_data: tuple[str, ...]  # panel titles none of whose queries returned a point


def seconds_of(duration: str) -> float:
    """'15m' -> 900.0, as Prometheus writes durations (s, m, h, d)."""
    match = DURATION.match(duration.strip())
    if match is None:
        raise UserError(f"--since takes a duration such as 30s, 15m, 2h or 1d, not {duration!r}")
    return float(match.group(1)) * SECONDS[match.group(2)]


def all_values(dashboard: Dashboard, expr: str) -> str:
    for variable in dashboard.variables:
        expr = expr.replace(f"${variable.label}", ".*")
    return expr


def legend(query: Query, labels: dict[str, str]) -> str:
    text = LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), query.legend).strip()
    return text or ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


def render(dashboards: list[Dashboard], url: str, since_s: float, out: Path, end: float | None = None) -> list[Sheet]:
    out.mkdir(parents=True, exist_ok=True)
    end = time.time() if end is None else end
    step = max(MIN_STEP_S, since_s / POINTS)
    return [_sheet(d, url, end - since_s, end, step, out) for d in dashboards]


def _sheet(dashboard: Dashboard, url: str, start: float, end: float, step: float, out: Path) -> Sheet:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(dashboard.panels) / COLUMNS)
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(7 * COLUMNS, 3.2 * rows), squeeze=False)
    empty = [panel.title for panel, ax in zip(dashboard.panels, axes.flat)
             if not _draw(ax, dashboard, panel, url, start, end, step)]
    for ax in axes.flat[len(dashboard.panels):]:
        ax.set_visible(False)
    figure.suptitle(f"{dashboard.title}: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(start))} to "
                    f"{time.strftime('%H:%M:%S', time.gmtime(end))} UTC", fontsize=13)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / figure.get_figheight()))  # room for the title
    path = out / f"{dashboard.uid}.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Sheet(path, len(dashboard.panels), tuple(empty))


def _draw(ax, dashboard: Dashboard, panel: Panel, url: str, start: float, end: float, step: float) -> bool:
    """Plot the panel's series against minutes before `end`; False when no query had data."""
    drawn = False
    for query in panel.queries:
        for series in prometheus.query_range(url, all_values(dashboard, query.expr), start, end, step):
            points = [(float(t), float(v)) for t, v in series["values"] if math.isfinite(float(v))]
            if points:
                ax.plot([(t - end) / 60 for t, _ in points], [v for _, v in points],
                        label=legend(query, series["metric"]), linewidth=1.2)
                drawn = True
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("minutes before the end", fontsize=8)
    ax.set_ylabel(AXIS_LABEL.get(panel.unit, panel.unit), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    return drawn
