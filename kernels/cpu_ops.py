"""Our C++ CPU kernels (kernels/csrc), compiled on first use and cached per machine.

torch.utils.cpp_extension builds them with this machine's compiler for this machine's CPU
(-march=native) into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); a later process
loads the cached build in well under a second. If the build fails (no compiler, no ninja) the
callers fall back to the torch reference, with one warning saying why.
RAYFOUNDRY_NATIVE_KERNELS=0 turns them off.

Processes that start together (a node's Serve replicas) build once: one builds under an OS file
lock while the others wait for it, then load its build. The sources are compiled from a copy in the
build directory, not from where this package happens to sit: Ray jobs and Serve apps run from a
copy of the working directory each, and ninja rebuilds (minutes) whenever a source's path changes.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in (
    "bindings.cpp", "paged_attention_cpu.cpp", "norm_rotary_cpu.cpp", "weight_only_linear_cpu.cpp",
    "float32_gemm_cpu.cpp", "sampling_cpu.cpp", "shm_all_reduce_cpu.cpp")]


def _build_name() -> str:
    """The extension's name carries a digest of every file in csrc: torch's build cache tracks the
    sources it is given, not the headers they include, so an edited header gets a fresh build."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return f"rayfoundry_cpu_ops_{digest.hexdigest()[:12]}"


def _build_directory(name: str) -> Path:
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return root / version / name


@contextlib.contextmanager
def _ninja_beside_python():
    """torch runs the first `ninja` on PATH. Use the one installed beside this interpreter (a
    dependency) wherever PATH points: ninja 1.11 and 1.13 hash their build logs differently, so two
    processes finding different ninjas rebuild each other's build every time."""
    ours, path = Path(sys.executable).parent, os.environ.get("PATH", "")
    if (ours / "ninja").exists():
        os.environ["PATH"] = f"{ours}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Exclusive across processes, and released by the OS when its holder dies. torch's own lock
    is a file that a build killed midway leaves behind, after which every build waits forever; under
    this lock, that file can only be such a leftover, so it is removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "rayfoundry.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        yield


def _stable_sources(build_dir: Path) -> list[str]:
    """csrc copied once into the build directory (the name's digest pins its content)."""
    copy = build_dir / "csrc"
    if not copy.is_dir():
        staging = Path(tempfile.mkdtemp(dir=build_dir))
        shutil.copytree(CSRC, staging / "csrc")
        (staging / "csrc").rename(copy)
        staging.rmdir()
    return [str(copy / source.name) for source in SOURCES]


@functools.cache
def native_ops():
    """The compiled module, or None when disabled or unbuildable."""
    if os.environ.get("RAYFOUNDRY_NATIVE_KERNELS", "1") == "0":
        return None
    name = _build_name()
    build_dir = _build_directory(name)
    try:
        from torch.utils.cpp_extension import load

        with _build_lock(build_dir), _ninja_beside_python():
            if not (build_dir / f"{name}.so").exists():
                print(f"building rayfoundry's C++ CPU kernels into {build_dir} (once per machine, about a minute)",
                      file=sys.stderr, flush=True)
            return load(name, _stable_sources(build_dir), build_directory=str(build_dir),
                        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means "use the reference"
        warnings.warn(f"C++ CPU kernels unavailable, using the torch reference: {error}", stacklevel=2)
        return None
