"""`rayfoundry`: the operator's face over Ray, the store and the jobs.

Commands that do real work (adding a model, preparing data, evaluating) are Ray jobs: submitted
through the Job Submission API when a cluster answers, else run in a child process (cluster.submit),
so this package never imports `jobs`. `serve` deploys through Ray Serve, which is not a job.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pyarrow.fs as pafs

from cluster import local_cluster, prometheus
from cluster.errors import UserError, reports_user_errors
from cluster.processes import session_dir
from cluster.store import Store, human_bytes, singular, verify
from cluster.submit import run_here, run_job

# `rayfoundry A B ...` -> the job `python -m <module> ...`
DELEGATED = {
    ("models", "add"): "jobs.add_model",
    ("data", "prepare"): "jobs.prepare_data",
    ("eval", "ppl"): "jobs.eval_ppl",
    ("search", "run"): "jobs.search",
}
# `rayfoundry A ...` -> the job `python -m <module> ...`
DELEGATED_ONE_WORD = {"optimize": "jobs.optimize"}
SERVE_MODULE = "serve_apps.serve_run"  # `rayfoundry serve CONFIG`
CLUSTER_HELP = ("a cluster launcher YAML: cluster/aws-gpu.yaml and cluster/gcp-gpu.yaml go to `ray up/down`; "
                "cluster/fake-multinode.yaml autoscales local processes on this machine")
WHERE_JOBS_RUN = (
    "models add, data prepare, eval ppl, search run and optimize are Ray jobs. With a Ray cluster up "
    "($RAY_ADDRESS, as for `ray job submit`, else the local cluster on 127.0.0.1:8265) they are submitted "
    "to it: the first line printed names the job, which the dashboard lists. A cluster on this machine "
    "reads paths as given here; a remote one reads them relative to the uploaded repository. "
    "With no cluster, or RAY_ADDRESS=local, they run here. serve deploys through Ray Serve, never as a job."
)


def cmd_up(args) -> int:
    if args.cluster is not None:
        from cluster import launcher

        print(launcher.up(args.cluster))
        return 0
    print(local_cluster.up(num_cpus=args.num_cpus))
    session = session_dir(local_cluster.GCS_PORT)
    print(_publish_dashboards(session))
    if args.prometheus:
        print(prometheus.ensure(session))
    return 0


def _publish_dashboards(session: Path | None) -> str:
    from cluster.grafana import publish

    try:
        places = publish(Store(), session)
    except (OSError, UserError) as error:  # a store out of reach: the cluster runs all the same
        return f"note: the Grafana dashboards were not written: {error}"
    return f"Grafana dashboards (Serving, Training, Search, Cluster): {', '.join(places)}"


def cmd_dashboards_write(args) -> int:
    from cluster.dashboards import all_dashboards
    from cluster.grafana import write_dashboards

    for path in write_dashboards(all_dashboards(), args.out):
        print(path)
    return 0


def cmd_dashboards_push(args) -> int:
    from cluster.grafana_push import push

    api_key = args.api_key or os.environ.get("GRAFANA_API_KEY")
    if not api_key:
        raise UserError("give Grafana's API key: --api-key KEY or GRAFANA_API_KEY")
    for url in push(args.grafana_url, api_key, args.prometheus_url):
        print(url)
    return 0


def cmd_dashboards_render(args) -> int:
    from cluster.dashboards import all_dashboards
    from cluster.dashboard_render import render, seconds_of

    for sheet in render(all_dashboards(), args.prometheus_url, seconds_of(args.since), args.out):
        empty = f"; no data: {', '.join(sheet.without_data)}" if sheet.without_data else ""
        print(f"{sheet.path}: {sheet.panels - len(sheet.without_data)} of {sheet.panels} panels have data{empty}")
    return 0


def cmd_status(args) -> int:
    report = local_cluster.status()
    if report["running"] and (session := session_dir(local_cluster.GCS_PORT)) is not None:
        report["prometheus"] = prometheus.status(prometheus.of_session(session))
    print(json.dumps(report, indent=2))
    return 0 if report["running"] else 1


def cmd_down(args) -> int:
    if args.cluster is not None:
        from cluster import launcher

        print(launcher.down(args.cluster))
        return 0
    session = session_dir(local_cluster.GCS_PORT)
    if session is not None and prometheus.stop(prometheus.of_session(session)):
        print("Prometheus stopped")
    print(local_cluster.down())
    return 0


def cmd_list(kind: str):
    def run(args) -> int:
        store = Store(args.store)
        artifacts = store.list(kind)
        print(f"{'NAME':<32}{'SIZE':>12}{'FILES':>7}  SOURCE   (store: {store.uri})")
        for a in artifacts:
            print(f"{a.name:<32}{human_bytes(a.num_bytes):>12}{len(a.manifest['files']):>7}  {_source_of(a)}")
        if not artifacts:
            print(f"(no {kind} stored)")
        return 0

    return run


def _source_of(artifact) -> str:
    """A model records the reference it was added from; a dataset its source config; cached
    statistics the model they describe."""
    source = artifact.manifest.get("source", "")
    return source.get("kind", "") if isinstance(source, dict) else str(source)


def cmd_verify(kind: str):
    def run(args) -> int:
        store = Store(args.store)
        artifact = store.get(kind, args.name)
        if artifact is None:
            raise UserError(f"no {singular(kind)} named '{args.name}' in the store at {store.uri}")
        verify(artifact)
        print(f"{singular(kind)} '{args.name}': all {len(artifact.manifest['files'])} files match the manifest")
        return 0

    return run


def cmd_remove(kind: str):
    def run(args) -> int:
        Store(args.store).remove(kind, args.name)
        print(f"removed {singular(kind)} '{args.name}'")
        return 0

    return run


def cmd_search_show(args) -> int:
    """The newest results of search RUN: its front and chosen recipe; or how far a running one is."""
    store = Store(args.store)
    if (newest := store.newest_result("search", args.run)) is not None:
        print(newest.read_text("results.md"), end="")
        if "chosen.yaml" in newest.manifest["files"]:
            print("\n## chosen.yaml\n\n" + newest.read_text("chosen.yaml"), end="")
        print(f"\n(results: {newest.uri})")
        return 0
    trials = f"{store.root}/runs/search-{args.run}/rayfoundry-trials"
    infos = store.fs.get_file_info(pafs.FileSelector(trials, allow_not_found=True))
    if infos:
        print(f"search {args.run} has no results yet (running, or interrupted: run it again to resume); "
              f"{sum(i.path.endswith('.json') for i in infos)} trials finished")
        return 0
    raise UserError(f"no search named '{args.run}' in the store at {store.uri}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayfoundry", description="Compress LLMs and serve them on Ray.",
                                     epilog=WHERE_JOBS_RUN)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local Ray cluster (dashboard on 127.0.0.1:8265), or with --cluster "
                                   "a cluster from a launcher YAML (`ray up`)")
    up.add_argument("--num-cpus", type=int, help="CPUs the local head offers (default: all)")
    up.add_argument("--cluster", type=Path, help=CLUSTER_HELP)
    up.add_argument("--prometheus", action=argparse.BooleanOptionalAction, default=True,
                    help=f"start a Prometheus on 127.0.0.1:{prometheus.PORT} scraping every node (default: when "
                         "installed); `down` stops it")
    up.set_defaults(func=cmd_up)
    sub.add_parser("status", help="show the local cluster").set_defaults(func=cmd_status)
    down = sub.add_parser("down", help="stop the local cluster, or with --cluster a launcher YAML's (`ray down`)")
    down.add_argument("--cluster", type=Path, help=CLUSTER_HELP)
    down.set_defaults(func=cmd_down)
    sub.add_parser("optimize", help="search, optionally QAT, store and serve a cheaper model (python -m "
                                    "jobs.optimize; see `rayfoundry optimize --help`)")
    sub.add_parser("serve", help=f"serve models from a Serve config (python -m {SERVE_MODULE}; "
                                 "--detach: deploy and return)")
    groups = {
        "models": sub.add_parser("models", help="models in the store").add_subparsers(dest="action", required=True),
        "data": sub.add_parser("data", help="datasets in the store").add_subparsers(dest="action", required=True),
        "eval": sub.add_parser("eval", help="measure quality").add_subparsers(dest="action", required=True),
        "cache": sub.add_parser("cache", help="calibration statistics and sensitivity tables kept for reuse").add_subparsers(
            dest="action", required=True),
        "search": sub.add_parser("search", help="search compression recipes with Ray Tune").add_subparsers(
            dest="action", required=True),
    }
    dashboards = sub.add_parser("dashboards",
                                help="Grafana dashboards of the serving, training, search and cluster metrics")
    actions = dashboards.add_subparsers(dest="action", required=True)
    write = actions.add_parser(
        "write", help="write the dashboards' Grafana JSON, one file each (`rayfoundry up` also puts them in the "
                      "store and in Ray's Grafana folder)")
    write.add_argument("--out", type=Path, required=True, help="folder for the JSON files")
    write.set_defaults(func=cmd_dashboards_write)
    push = actions.add_parser("push", help="create or update the Prometheus data source and the dashboards in a "
                                           "Grafana (grafana-api: pip install 'rayfoundry[grafana]')")
    push.add_argument("--grafana-url", required=True, help="e.g. http://127.0.0.1:3000")
    push.add_argument("--api-key", help="a service account token with the Editor role (default: $GRAFANA_API_KEY)")
    push.add_argument("--prometheus-url", default=f"http://127.0.0.1:{prometheus.PORT}",
                      help="Prometheus as the Grafana server reaches it (default: %(default)s)")
    push.set_defaults(func=cmd_dashboards_push)
    render = actions.add_parser("render", help="draw every panel from Prometheus as PNG sheets, one per dashboard "
                                               "(no Grafana needed)")
    render.add_argument("--since", default="15m", help="how far back: 30s, 15m, 2h, 1d (default: %(default)s)")
    render.add_argument("--out", type=Path, required=True, help="folder for the PNG sheets")
    render.add_argument("--prometheus-url", default=f"http://127.0.0.1:{prometheus.PORT}",
                        help="(default: %(default)s)")
    render.set_defaults(func=cmd_dashboards_render)
    show = groups["search"].add_parser("show", help="print a search's Pareto front and chosen recipe")
    show.add_argument("run", help="the search's name (its config's `name`)")
    show.add_argument("--store", help="store URI (default: $RAYFOUNDRY_STORE or ~/.rayfoundry/store)")
    show.set_defaults(func=cmd_search_show)
    for group, kind in (("models", "models"), ("data", "datasets"), ("cache", "cache")):
        _add_store_commands(groups[group], kind)
    # Listed for --help only: `_main` hands these to their job module before parsing.
    for (group, action), module in DELEGATED.items():
        groups[group].add_parser(action, help=f"the job python -m {module} (see `rayfoundry {group} {action} --help`)")
    return parser


def _add_store_commands(commands, kind: str) -> None:
    for action, make_func, needs_name in (("list", cmd_list, False), ("verify", cmd_verify, True),
                                          ("rm", cmd_remove, True)):
        p = commands.add_parser(action, help=f"{action} stored {kind}")
        if needs_name:
            p.add_argument("name")
        p.add_argument("--store", help="store URI (default: $RAYFOUNDRY_STORE or ~/.rayfoundry/store)")
        p.set_defaults(func=make_func(kind))


def delegated_module(argv: list[str]) -> tuple[str, list[str]] | None:
    """The job module a command line names, and the arguments that go to it."""
    if argv[:1] and argv[0] in DELEGATED_ONE_WORD:
        return DELEGATED_ONE_WORD[argv[0]], argv[1:]
    module = DELEGATED.get(tuple(argv[:2]))
    return None if module is None else (module, argv[2:])


@reports_user_errors("rayfoundry")
def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return run_here(SERVE_MODULE, argv[1:])
    if (delegated := delegated_module(argv)) is not None:
        return run_job(*delegated)
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> None:
    sys.exit(_main(sys.argv[1:] if argv is None else argv))
