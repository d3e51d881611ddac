"""What an autoscaling cluster looks like over time, sampled from the driver: worker nodes alive,
the deployment's replicas by state, and on which node each replica lives (so a response's
X-Rayfoundry-Replica header names its node)."""
from __future__ import annotations

import threading
import time

HEAD_RESOURCE = "node:__internal_head__"
MAP_EVERY_S = 2.0


def worker_nodes() -> list[str]:
    """Node ids of the alive nodes other than the head."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE not in n["Resources"]]


def replica_states(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or deployment not in application.deployments:
        return {}
    return {str(state): count for state, count in application.deployments[deployment].replica_states.items()}


def replica_nodes(app: str, deployment: str, dashboard_url: str) -> dict[str, str]:
    """Replica id (its actor name's last part) -> node id, for the deployment's live replicas."""
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    actors = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=10_000,
                         raise_on_missing_output=False)
    return {a.name.removeprefix(prefix): a.node_id for a in actors if (a.name or "").startswith(prefix)}


class ClusterTimeline(threading.Thread):
    """Samples every `period_s` until `stop()`; `samples` rows are {t, worker_nodes, replicas_<STATE>...}
    with t in time.perf_counter() seconds, as the load generator's timestamps."""

    def __init__(self, app: str, deployment: str, dashboard_url: str, period_s: float = 0.5):
        super().__init__(daemon=True, name="cluster-timeline")
        self.app, self.deployment, self.dashboard_url, self.period_s = app, deployment, dashboard_url, period_s
        self.samples: list[dict] = []
        self.replica_node: dict[str, str] = {}
        self.errors: list[str] = []
        self._stopped = threading.Event()
        self._mapped: tuple[dict, float] = ({}, 0.0)  # the replica states and time of the last mapping

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.sample()
            except Exception as error:  # a slow or restarting controller: the next sample may answer
                self.errors.append(repr(error))
            self._stopped.wait(self.period_s)

    def sample(self) -> dict:
        nodes = worker_nodes()
        states = replica_states(self.app, self.deployment)
        now = time.perf_counter()
        if states != self._mapped[0] or now - self._mapped[1] > MAP_EVERY_S:  # the state API is slower
            self.replica_node.update(replica_nodes(self.app, self.deployment, self.dashboard_url))
            self._mapped = (states, now)
        row = {"t": now, "worker_nodes": len(nodes),
               **{f"replicas_{s.lower()}": n for s, n in states.items()}}
        self.samples.append(row)
        return row

    def stop(self) -> None:
        self._stopped.set()
        self.join()
