"""The Grafana dashboards: valid for Grafana's dashboard model, and built only from cluster/metrics.py."""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import replace

import pytest

from cluster import metrics
from cluster.dashboards import all_dashboards
from cluster.grafana import dashboard_json
from cluster.grafana import publish
from cluster.store import Store

EXPORTED = metrics.ENGINE_METRICS + metrics.ROUTER_METRICS + metrics.TRAIN_METRICS + metrics.SEARCH_METRICS
KNOWN = EXPORTED + metrics.RAY_METRICS
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\{([^}]*)\}")
GROUPING = re.compile(r"by \(([^)]*)\)")


def _series_names(spec: metrics.MetricSpec) -> set[str]:
    suffixes = ("_bucket", "_count", "_sum") if spec.kind == "histogram" else ("",)
    return {metrics.series(spec, suffix) for suffix in suffixes}


def _not_kept(ours, kept, path: str = "") -> list[str]:
    """What we wrote that the model dropped or changed."""
    if isinstance(ours, dict):
        if not isinstance(kept, dict):
            return [f"{path}: became {kept!r}"]
        return [miss for key, value in ours.items()
                for miss in ([f"{path}.{key}: dropped"] if key not in kept else _not_kept(value, kept[key],
                                                                                           f"{path}.{key}"))]
    if isinstance(ours, list):
        if not isinstance(kept, list) or len(kept) != len(ours):
            return [f"{path}: became {kept!r}"]
        return [miss for i, (a, b) in enumerate(zip(ours, kept)) for miss in _not_kept(a, b, f"{path}[{i}]")]
    return [] if ours == kept else [f"{path}: {ours!r} became {kept!r}"]


def test_every_dashboard_is_valid_for_grafanas_dashboard_model():
    """Read by grafana-foundation-sdk's Dashboard model and written back, every field we set survives
    unchanged: no key the model does not know, no value of the wrong shape."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()  # the Prometheus query model, for the panels' targets
    for dashboard, datasource in itertools.product(all_dashboards(), (None, "rayfoundry-prometheus")):
        ours = dashboard_json(dashboard, datasource)  # as written at `up`, and as pushed
        kept = json.loads(json.dumps(Dashboard.from_json(ours), cls=JSONEncoder))
        assert _not_kept(ours, kept) == [], dashboard.uid
        assert [p["type"] for p in kept["panels"]] == ["timeseries"] * len(dashboard.panels)
        assert all(target["expr"] for panel in kept["panels"] for target in panel["targets"])


def test_the_model_check_catches_what_grafana_would_not_know():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    ours = dashboard_json(all_dashboards()[0])
    ours["panels"][0]["gridPosition"] = ours["panels"][0].pop("gridPos")
    kept = json.loads(json.dumps(Dashboard.from_json(ours), cls=JSONEncoder))
    assert _not_kept(ours, kept) == [".panels[0].gridPosition: dropped"]


def test_every_query_names_only_metrics_and_labels_from_cluster_metrics():
    by_name = {name: spec for spec in KNOWN for name in _series_names(spec)}
    for dashboard in all_dashboards():
        for query in dashboard.queries():
            selected = SELECTOR.findall(query.expr)
            assert selected, query.expr
            labels = {"le"}
            for name, matchers in selected:
                assert name in by_name, f"{dashboard.uid}: {name} is not in cluster/metrics.py"
                tags = set(by_name[name].tag_keys)
                used = {term.split("=")[0] for term in matchers.split(",") if term}
                assert used <= tags, f"{name} has no label {used - tags}"
                labels |= tags
            for grouping in GROUPING.findall(query.expr):
                assert {g.strip() for g in grouping.split(",")} <= labels, query.expr
        for variable in dashboard.variables:
            assert variable.label in variable.metric.tag_keys


def test_every_metric_we_export_has_a_panel():
    shown = {name for d in all_dashboards() for q in d.queries() for name, _ in SELECTOR.findall(q.expr)}
    assert [spec.name for spec in EXPORTED if not _series_names(spec) & shown] == []


def test_renaming_a_metric_in_cluster_metrics_renames_it_in_the_dashboards(monkeypatch):
    renamed = replace(metrics.TIME_TO_FIRST_TOKEN, name="rayfoundry_engine_first_token_seconds")
    monkeypatch.setattr(metrics, "TIME_TO_FIRST_TOKEN", renamed)
    text = json.dumps([dashboard_json(d) for d in all_dashboards()])
    assert "ray_rayfoundry_engine_first_token_seconds_bucket" in text
    assert "time_to_first_token" not in text


def test_ray_metrics_cannot_be_exported_again():
    with pytest.raises(ValueError, match="exported by Ray itself"):
        metrics.ray_metric(metrics.NODE_CPU_COUNT)


def test_publish_keeps_the_dashboards_in_the_store_replacing_the_last(tmp_path):
    store = Store(str(tmp_path / "store"))
    assert publish(store, None) == publish(store, None)  # the second replaces the first
    artifact = store.get("results", "dashboards")
    uids = sorted(json.loads((tmp_path / "store" / "results" / "dashboards" / name).read_text())["uid"]
                  for name in artifact.manifest["files"])
    assert uids == sorted(d.uid for d in all_dashboards())
