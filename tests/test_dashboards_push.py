"""`rayfoundry dashboards push` through grafana-api. No Grafana server can be installed on these machines
(no package registry we reach carries one), so the test serves, on loopback, the endpoints of Grafana's
HTTP API that the push calls, as Grafana documents them: data sources by name, create, update, and
POST /api/dashboards/db; each answers 401 without the right Bearer key."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.dashboards import all_dashboards
from cluster.grafana import dashboard_json
from cluster.grafana_push import DATASOURCE_NAME
from conftest import RAYFOUNDRY, env_with_home, free_port, run

KEY = "glsa_test-key"


class GrafanaAPI(BaseHTTPRequestHandler):
    datasources: dict[int, dict]
    dashboards: dict[str, dict]
    calls: list[str]

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        self.calls.append(f"{method} {self.path}")
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._reply(401, {"message": "invalid API key"})
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        route = getattr(self, f"_{method.lower()}", None)
        status, answer = route(self.path, body) if route else (404, {"message": "Not found"})
        self._reply(status, answer)

    def _get(self, path: str, body):
        name = path.removeprefix("/api/datasources/name/")
        found = [ds for ds in self.datasources.values() if ds["name"] == name]
        return (200, found[0]) if found else (404, {"message": "Data source not found"})

    def _post(self, path: str, body: dict):
        if path == "/api/datasources":
            new_id = len(self.datasources) + 1
            self.datasources[new_id] = body | {"id": new_id}
            return 200, {"id": new_id, "name": body["name"], "message": "Datasource added",
                         "datasource": self.datasources[new_id]}
        if path == "/api/dashboards/db":
            uid = body["dashboard"]["uid"]
            if uid in self.dashboards and not body.get("overwrite"):
                return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
            self.dashboards[uid] = body
            return 200, {"id": len(self.dashboards), "uid": uid, "url": f"/d/{uid}/x", "status": "success",
                         "version": 1, "slug": "x"}
        return 404, {"message": "Not found"}

    def _put(self, path: str, body: dict):
        ds_id = int(path.removeprefix("/api/datasources/"))
        self.datasources[ds_id] = body | {"id": ds_id}
        return 200, {"id": ds_id, "name": body["name"], "message": "Datasource updated",
                     "datasource": self.datasources[ds_id]}

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def log_message(self, *args):
        pass


@pytest.fixture
def grafana():
    handler = type("Grafana", (GrafanaAPI,), {"datasources": {}, "dashboards": {}, "calls": []})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _push(home, url: str, key: str = KEY):
    return run([*RAYFOUNDRY, "dashboards", "push", "--grafana-url", url, "--api-key", key,
                "--prometheus-url", "http://prometheus.internal:9090"], env_with_home(home), timeout=120)


def test_the_data_source_and_every_dashboard_arrive_as_generated(grafana, tmp_path):
    state, url = grafana
    for _ in range(2):  # the second push updates what the first created
        pushed = _push(tmp_path, url)
        assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.split() == [f"{url}/d/{d.uid}/x" for d in all_dashboards()]
    (source,) = state.datasources.values()
    assert source | {"id": None} == {"name": DATASOURCE_NAME, "uid": DATASOURCE_NAME, "type": "prometheus",
                                     "url": "http://prometheus.internal:9090", "access": "proxy", "isDefault": False,
                                     "jsonData": {"httpMethod": "POST", "timeInterval": "5s"}, "id": None}
    assert {uid: body["dashboard"] for uid, body in state.dashboards.items()} == \
        {d.uid: dashboard_json(d, DATASOURCE_NAME) for d in all_dashboards()}
    assert all(body["overwrite"] for body in state.dashboards.values())
    assert sum(call.startswith("POST /api/datasources") for call in state.calls) == 1
    assert sum(call.startswith("PUT /api/datasources/") for call in state.calls) == 1


def test_a_bad_key_is_one_clear_line_and_exit_2(grafana, tmp_path):
    state, url = grafana
    refused = _push(tmp_path, url, key="wrong")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"rayfoundry: error: Grafana at {url} refused the API key (401): give a service account token with the "
        "Editor role"]
    assert state.dashboards == {} and state.datasources == {}


def test_an_unreachable_grafana_is_one_clear_line_and_exit_2(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    refused = _push(tmp_path, url)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"rayfoundry: error: cannot reach Grafana at {url}: ConnectionError"]
