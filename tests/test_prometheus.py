"""Our Prometheus: started on loopback from a session's discovery file, queried, stopped by its PID.
The cluster's own Prometheus (`rayfoundry up`) scraping Ray is in test_local_cluster.py."""
from __future__ import annotations

import json
import os
import time

import pytest

from cluster import prometheus
from cluster.errors import UserError
from conftest import free_port

pytestmark = pytest.mark.skipif(prometheus.binary() is None, reason=prometheus.INSTALL_HINT)


@pytest.fixture
def session(tmp_path):
    """A session folder whose discovery file lists one target: the Prometheus below itself."""
    return tmp_path / "session"


@pytest.fixture
def ours(session):
    instance = prometheus.Prometheus(session / "rayfoundry" / "prometheus", port=free_port())
    session.mkdir()
    target = f"{prometheus.HOST}:{instance.port}"
    (session / prometheus.SERVICE_DISCOVERY_FILE).write_text(json.dumps([{"labels": {"job": "ray"},
                                                                          "targets": [target]}]))
    yield instance
    prometheus.stop(instance)


def test_it_scrapes_what_the_discovery_file_lists_and_stops_by_its_pid(ours, session):
    started = prometheus.start(ours, session, interval_s=1)
    assert prometheus.pid(ours) == started
    deadline = time.monotonic() + 30
    while not (up := prometheus.query(ours.url, 'up{job="ray"}')) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [sample["value"][1] for sample in up] == ["1"]
    assert prometheus.status(ours) | {"pid": None} == {"installed": True, "running": True, "url": ours.url,
                                                       "pid": None, "targets_up": 1, "targets": 1}
    assert prometheus.stop(ours)
    assert not os.path.exists(f"/proc/{started}") and prometheus.pid(ours) is None
    assert not prometheus.stop(ours)  # nothing left to stop


def test_a_recorded_pid_that_is_not_our_prometheus_is_never_signalled(ours, session):
    ours.folder.mkdir(parents=True)
    ours.config_path.write_text(prometheus.config_text(session))
    ours.pid_path.write_text(str(os.getpid()))  # this test's own process
    assert prometheus.pid(ours) is None
    assert not prometheus.stop(ours)


def test_a_second_prometheus_on_a_taken_port_and_a_bad_query_are_clear_errors(ours, session):
    prometheus.start(ours, session, interval_s=1)
    with pytest.raises(UserError, match="another Prometheus already answers"):
        prometheus.start(prometheus.Prometheus(session / "other", port=ours.port), session)
    with pytest.raises(UserError, match="Prometheus refused 'sum by \\(model'"):
        prometheus.query(ours.url, "sum by (model")


def test_prometheus_accepts_every_dashboard_query(ours, session):
    """Each panel's PromQL parses and evaluates (whether it has data is the cluster's test)."""
    from cluster.dashboards import all_dashboards

    prometheus.start(ours, session, interval_s=1)
    for dashboard in all_dashboards():
        for query in dashboard.queries():
            expr = query.expr
            for variable in dashboard.variables:
                expr = expr.replace(f"${variable.label}", ".*")  # Grafana's "All"
            assert isinstance(prometheus.query(ours.url, expr), list)


def test_render_draws_each_panel_from_query_range_and_names_the_empty_ones(ours, session, tmp_path):
    """A dashboard of Prometheus's own metrics (it scrapes itself here), and a panel of a metric nobody
    exports; the sheet is a PNG with both panels."""
    import matplotlib.image

    from cluster.dashboard_model import Dashboard, Panel, Query
    from cluster.dashboard_render import render

    prometheus.start(ours, session, interval_s=1)
    deadline = time.monotonic() + 30
    while len(prometheus.query(ours.url, "prometheus_http_requests_total")) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # a few scrapes, for a line rather than a point
    dashboard = Dashboard("self", "Prometheus itself", "", (
        Panel("Requests", "", (Query("sum by (handler) (prometheus_http_requests_total)", "{{handler}}"),)),
        Panel("Nobody's metric", "", (Query("rayfoundry_never_exported",),))))
    (sheet,) = render([dashboard], ours.url, since_s=60, out=tmp_path / "sheets")
    assert sheet.path == tmp_path / "sheets" / "self.png" and sheet.panels == 2
    assert sheet.without_data == ("Nobody's metric",)
    height, width, _ = matplotlib.image.imread(sheet.path).shape
    assert width > height > 100


def test_render_refuses_a_duration_prometheus_would_not_know():
    from cluster.dashboard_render import seconds_of

    assert [seconds_of(d) for d in ("30s", "15m", "2h", "1d", "1.5m")] == [30, 900, 7200, 86400, 90]
    with pytest.raises(UserError, match="--since takes a duration such as 30s"):
        seconds_of("15 minutes")
