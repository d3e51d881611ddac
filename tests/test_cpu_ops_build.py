"""The C++ kernels' build survives a build killed midway: torch's lock file left behind must not
make the next process wait forever."""
import subprocess
import sys
from pathlib import Path

from kernels.cpu_ops import _build_directory, _build_name, native_ops

LOAD = "from kernels.cpu_ops import native_ops; assert native_ops() is not None; print('loaded')"


def test_a_lock_left_by_a_killed_build_is_cleared():
    assert native_ops() is not None  # built (or loaded) here first
    stale = _build_directory(_build_name()) / "lock"
    stale.touch()  # what torch leaves when its builder is killed
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    assert not stale.exists()


def test_processes_starting_together_all_load():
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1]) for _ in range(3)]
    assert all(p.communicate(timeout=300)[0].strip() == "loaded" for p in procs)
