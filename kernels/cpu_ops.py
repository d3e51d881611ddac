"""Our C++ CPU kernels (kernels/csrc), compiled on first use and cached per machine.

torch.utils.cpp_extension builds them with this machine's compiler for this machine's CPU
(-march=native) into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); a later process
loads the cached build in well under a second. If the build fails (no compiler, no ninja) the
callers fall back to the torch reference, with one warning saying why.
RAYFOUNDRY_NATIVE_KERNELS=0 turns them off.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in (
    "bindings.cpp", "paged_attention_cpu.cpp", "norm_rotary_cpu.cpp", "weight_only_linear_cpu.cpp",
    "sampling_cpu.cpp")]


def _build_name() -> str:
    """The extension's name carries a digest of every file in csrc: torch's build cache tracks the
    sources it is given, not the headers they include, so an edited header gets a fresh build."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return f"rayfoundry_cpu_ops_{digest.hexdigest()[:12]}"


@functools.cache
def native_ops():
    """The compiled module, or None when disabled or unbuildable."""
    if os.environ.get("RAYFOUNDRY_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(_build_name(), [str(s) for s in SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means "use the reference"
        warnings.warn(f"C++ CPU kernels unavailable, using the torch reference: {error}", stacklevel=2)
        return None
