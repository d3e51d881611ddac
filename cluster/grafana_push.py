"""`rayfoundry dashboards push`: the Prometheus data source and every dashboard into a Grafana, through
grafana-api (the `grafana` extra). Both are created or replaced, so pushing again updates them."""
from __future__ import annotations

import urllib.parse

from cluster.dashboards import all_dashboards
from cluster.grafana import dashboard_json
from cluster.errors import UserError

DATASOURCE_NAME = "rayfoundry-prometheus"
FOLDER_ID = 0  # Grafana's General folder


def datasource(prometheus_url: str) -> dict:
    """The data source Grafana queries: our Prometheus, reached by the Grafana server itself."""
    return {"name": DATASOURCE_NAME, "uid": DATASOURCE_NAME, "type": "prometheus", "url": prometheus_url,
            "access": "proxy", "isDefault": False, "jsonData": {"httpMethod": "POST", "timeInterval": "5s"}}


def push(grafana_url: str, api_key: str, prometheus_url: str) -> list[str]:
    """Create or update the data source and the dashboards; the dashboards' URLs in Grafana."""
    face = _grafana(grafana_url, api_key)
    try:
        _put_datasource(face, datasource(prometheus_url))
        pushed = []
        for dashboard in all_dashboards():
            body = {"dashboard": dashboard_json(dashboard, DATASOURCE_NAME), "folderId": FOLDER_ID,
                    "overwrite": True, "message": "rayfoundry dashboards push"}
            pushed.append(urllib.parse.urljoin(grafana_url, face.dashboard.update_dashboard(body)["url"]))
        return pushed
    except Exception as error:  # grafana-api's and requests' errors, each made one line
        raise UserError(_one_line(grafana_url, error)) from None


def _grafana(grafana_url: str, api_key: str):
    from grafana_api.grafana_face import GrafanaFace

    parts = urllib.parse.urlsplit(grafana_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--grafana-url must be http(s)://host[:port][/prefix], not {grafana_url!r}")
    prefix = parts.path.strip("/")
    return GrafanaFace(auth=api_key, host=parts.hostname, port=parts.port, protocol=parts.scheme,
                       url_path_prefix=f"{prefix}/" if prefix else "", timeout=10.0)


def _put_datasource(face, wanted: dict) -> None:
    from grafana_api.grafana_api import GrafanaClientError

    try:
        existing = face.datasource.get_datasource_by_name(wanted["name"])
    except GrafanaClientError as error:
        if error.status_code != 404:
            raise
        face.datasource.create_datasource(wanted)
        return
    face.datasource.update_datasource(existing["id"], wanted)


def _one_line(grafana_url: str, error: Exception) -> str:
    from grafana_api.grafana_api import GrafanaException
    from requests import RequestException

    if isinstance(error, GrafanaException) and error.status_code in (401, 403):
        return f"Grafana at {grafana_url} refused the API key ({error.status_code}): give a service account " \
               "token with the Editor role"
    if isinstance(error, GrafanaException):
        return f"Grafana at {grafana_url} answered {error.status_code}: {error.message}"
    if isinstance(error, RequestException):
        return f"cannot reach Grafana at {grafana_url}: {type(error).__name__}"
    raise error
