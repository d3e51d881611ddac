"""Run a job module as `ray job submit --working-dir . -- python -m <module> ...` does: on the Ray
cluster through its Job Submission API, so it shows in the dashboard; with no cluster, here in a
child process. Either way its result is on stdout, and input it refuses ends as one `...: error: ...`
line on stderr with exit code 2.

The cluster is the one Ray's job CLI would use ($RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS), else the
local cluster (`rayfoundry up`) when its dashboard answers. RAY_ADDRESS=local runs jobs here even
then, as `ray.init(address="local")` starts a private Ray instead of joining one.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cluster import auth, local_cluster
from cluster.errors import USAGE_EXIT_CODE, UserError

REPO = Path(__file__).resolve().parents[1]  # the job's working_dir: the code, and where relative paths start
CALLER_ENV = ("RAYFOUNDRY_HOME", "RAYFOUNDRY_STORE")  # the job uses the caller's store, not the cluster's
# The line a job ends with when it refuses its input (cluster.errors.reports_user_errors, or argparse).
USER_ERROR_LINE = re.compile(r"^[\w .-]+: error: ")
AGENT_WAIT_S = 60  # a cluster just started takes jobs once its job agent is up


def run_job(module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as a Ray job, or here without a cluster; returns its exit code."""
    address = cluster_address()
    if address is None or {"-h", "--help"} & set(argv):  # help reads the same anywhere: no upload for it
        return run_here(module, argv)
    if is_this_machine(address):  # the job reads the caller's files: relative paths mean what they meant here
        argv = [absolute_if_local_path(arg) for arg in argv]
    return submit(address, ["python", "-m", module, *argv])


def is_this_machine(address: str) -> bool:
    host = re.sub(r"^\w+://", "", address).split(":")[0].split("/")[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def absolute_if_local_path(arg: str) -> str:
    """`./folder`, `../x.yaml`, `configs/a.yaml` -> an absolute path, when it exists here; store names and
    URIs (no slash, or a scheme) pass as they are."""
    if "/" not in arg or "://" in arg or not Path(arg).expanduser().exists():
        return arg
    return str(Path(arg).expanduser().resolve())


def run_here(module: str, argv: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", module, *argv]).returncode


def cluster_address() -> str | None:
    """Where jobs are submitted, or None to run them here."""
    named = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if named:
        return None if named == "local" else named
    return local_cluster.dashboard_url() if local_cluster.running_version() is not None else None


def submit(address: str, entrypoint: list[str]) -> int:
    """Submit, print the job's log as it runs, return the job's exit code; Ctrl-C stops the job."""
    client = connect(address)
    runtime_env = {"working_dir": str(REPO), "env_vars": {k: os.environ[k] for k in CALLER_ENV if k in os.environ}}
    job_id = submit_when_ready(client, entrypoint=shlex.join(entrypoint), runtime_env=runtime_env)
    print(f"Ray job {job_id} submitted to {address} (its log follows; the dashboard lists it)", flush=True)
    try:
        asyncio.run(echo_log(client, job_id))
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise
    return exit_code(client, job_id)


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    # Ray's client narrates packaging the working_dir and following the log on stderr, which here
    # carries the job's own errors; only its errors stay.
    for handler in logging.getLogger("ray").handlers:
        handler.setLevel(logging.ERROR)
    auth.use_for(address)
    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        raise UserError(f"no Ray cluster answers at {address}; start one with `rayfoundry up`, "
                        "or set RAY_ADDRESS=local to run jobs here") from None


def submit_when_ready(client, **job) -> str:
    """client.submit_job, retried while the cluster has no job agent yet (Ray: 'try again later')."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


async def echo_log(client, job_id: str) -> None:
    """The job's log as it grows. Ray merges the job's stdout and stderr; its user-error line goes back
    to stderr, where the job printed it, the rest to stdout."""
    pending = ""
    async for chunk in client.tail_job_logs(job_id):
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            echo(line)
    if pending:
        echo(pending)


def echo(line: str) -> None:
    print(line, file=sys.stderr if USER_ERROR_LINE.match(line) else sys.stdout, flush=True)


def exit_code(client, job_id: str) -> int:
    """The job's own exit code; a job that failed otherwise (say, its runtime env) says why on stderr."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    code = info.driver_exit_code
    if code is None:
        code = 0 if info.status == JobStatus.SUCCEEDED else 1
    if code not in (0, USAGE_EXIT_CODE):
        print(f"rayfoundry: Ray job {job_id} ended {info.status.value} (exit code {code}): {info.message}",
              file=sys.stderr)
    return code
