"""Ending exactly the processes of one Ray cluster on this machine, by PID, never `ray stop` (which
ends every Ray process of the user, other clusters included).

A cluster started with its own `--temp-dir` names that folder in the command line of its GCS,
raylets, dashboard and autoscaler; every other process of it (workers, agents, the nodes the fake
provider launches) descends from one of those, except its Ray client server, which outlives its
parent and names the cluster's GCS address instead.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process readable in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # it ended while we read
        table[int(entry.name)] = (parent, command)
    return table


def processes_of(marker: re.Pattern) -> set[int]:
    """Live processes whose command line `marker` matches, and all their descendants."""
    table = _process_table()
    found = {pid for pid, (_, command) in table.items() if marker.search(command) and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return {pid for pid in found if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def end_processes_of(marker: re.Pattern, grace_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL for what is left after `grace_s` (and what started meanwhile); returns how
    many there were."""
    pids = processes_of(marker)
    end_pids(pids, grace_s)
    _signal({pid for pid in processes_of(marker) if _alive(pid)}, signal.SIGKILL)
    return len(pids)


def end_pids(pids: set[int], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL for those still alive after `grace_s`."""
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    _signal({pid for pid in pids if _alive(pid)}, signal.SIGKILL)


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def session_dir(gcs_port: int) -> Path | None:
    """The session folder of the Ray cluster whose GCS listens on `gcs_port` on this machine, from the
    GCS's command line (`session_latest` names whichever Ray on the machine started last)."""
    for _, command in _process_table().values():
        if "gcs_server" in command and f"--gcs_server_port={gcs_port} " in f"{command} ":
            found = re.search(r"--session-dir=(\S+)", command)
            if found:
                return Path(found.group(1))
    return None
