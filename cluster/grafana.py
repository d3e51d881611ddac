"""Grafana dashboard JSON (schemaVersion 39) for a Dashboard, and where it is written: the store
(results/dashboards, replaced each time) and the Grafana folder of a running Ray session, which Ray's
Grafana provisioning config points at, so a Grafana started with it (and the Ray dashboard's Metrics view,
given RAY_GRAFANA_HOST) shows them beside Ray's own."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cluster.dashboard_model import Dashboard, Panel, Variable, selector
from cluster.dashboards import all_dashboards
from cluster.metrics import series
from cluster.store import Store

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_WIDTH, PANEL_HEIGHT, GRID_COLUMNS = 12, 8, 24
TAG = "rayfoundry"
RESULT_NAME = "dashboards"


def dashboard_json(dashboard: Dashboard, datasource: str | None = None) -> dict:
    """`datasource`: the uid of the Prometheus data source chosen when the dashboard opens (else Grafana's
    default one of type prometheus)."""
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description, "tags": [TAG],
        "editable": True, "graphTooltip": 1, "timezone": "browser", "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"}, "schemaVersion": SCHEMA_VERSION, "version": 1,
        "templating": {"list": [_datasource_variable(datasource)] + [_variable(v) for v in dashboard.variables]},
        "panels": [_panel(panel, index) for index, panel in enumerate(dashboard.panels)],
    }


def _datasource_variable(chosen: str | None) -> dict:
    variable = {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
                "hide": 0, "refresh": 1}
    return variable | ({"current": {"text": chosen, "value": chosen}} if chosen else {})


def _variable(variable: Variable) -> dict:
    narrowed = selector(variable.metric, variables=variable.depends_on) if variable.depends_on else \
        series(variable.metric)
    query = f"label_values({narrowed}, {variable.label})"
    return {"type": "query", "name": variable.label, "label": variable.title, "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{variable.label}-values"},
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"text": ["All"], "value": ["$__all"]}}


def _panel(panel: Panel, index: int) -> dict:
    per_row = GRID_COLUMNS // PANEL_WIDTH
    return {
        "id": index + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": (index % per_row) * PANEL_WIDTH, "y": (index // per_row) * PANEL_HEIGHT,
                    "w": PANEL_WIDTH, "h": PANEL_HEIGHT},
        "targets": [{"refId": chr(ord("A") + i), "expr": query.expr, "legendFormat": query.legend,
                     "datasource": DATASOURCE} for i, query in enumerate(panel.queries)],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }


def write_dashboards(dashboards: list[Dashboard], folder: Path) -> list[Path]:
    """One `<uid>.json` per dashboard in `folder`, created if needed."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in dashboards:
        path = folder / f"{dashboard.uid}.json"
        path.write_text(json.dumps(dashboard_json(dashboard), indent=2) + "\n")
        written.append(path)
    return written


def ray_grafana_folder(session: Path) -> Path:
    return session / "metrics" / "grafana" / "dashboards"


def publish(store: Store, session: Path | None) -> list[str]:
    """Write every dashboard to the store and, when `session` has Ray's Grafana folder, there too."""
    dashboards = all_dashboards()
    with tempfile.TemporaryDirectory() as scratch:
        write_dashboards(dashboards, Path(scratch))
        meta = {"source": "dashboards", "titles": [d.title for d in dashboards]}
        places = [store.put_dir("results", RESULT_NAME, Path(scratch), meta, replace=True).uri]
    if session is not None and ray_grafana_folder(session).is_dir():
        write_dashboards(dashboards, ray_grafana_folder(session))
        places.append(str(ray_grafana_folder(session)))
    return places
