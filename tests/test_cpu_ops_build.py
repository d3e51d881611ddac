"""The C++ kernels' build cache: a build killed midway (torch's lock file left behind) must not make
the next process wait forever, and a copy of the package elsewhere must reuse the build."""
import shutil
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


def test_a_copy_of_the_package_elsewhere_reuses_the_build(tmp_path):
    """Ray jobs and Serve apps import kernels/ from a copy of the working directory each; the
    copy must load the cached build, not recompile it."""
    assert native_ops() is not None
    built = _build_directory(_build_name()) / f"{_build_name()}.so"
    before = built.stat().st_mtime_ns
    shutil.copytree(Path(__file__).parents[1] / "kernels", tmp_path / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    check = LOAD.replace("print('loaded')", "import kernels; print(kernels.__file__)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path))  # the copy was the one imported
    assert built.stat().st_mtime_ns == before and "building" not in done.stderr
