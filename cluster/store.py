"""Artifact store: models, datasets and results addressed by URI through pyarrow.fs.

Layout under the store root (a local path, file://, s3:// or gs:// URI):

    <root>/<kind>/<name>/...files...        kind is models | datasets | results | cache
    <root>/<kind>/<name>/manifest.json      sha256 and size of every file, written last

An artifact exists only once its manifest exists. Writes are staged under `<root>/.staging/`
and committed with one rename (atomic on local disks), so a crash leaves at most an orphaned
staging folder, never a half-written artifact. On object stores, where folders cannot be
renamed, files are copied first and the manifest last, so readers still never see half.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from cluster.errors import UserError

MANIFEST = "manifest.json"
KINDS = ("models", "datasets", "results", "cache")  # cache: calibration statistics, sensitivity tables
_HASH_CHUNK = 8 << 20


def rayfoundry_home() -> Path:
    return Path(os.environ.get("RAYFOUNDRY_HOME", Path.home() / ".rayfoundry")).expanduser()


def default_store_uri() -> str:
    return os.environ.get("RAYFOUNDRY_STORE", str(rayfoundry_home() / "store"))


def singular(kind: str) -> str:
    return kind.removesuffix("s")  # models -> model, in messages


def has_scheme(ref: str) -> bool:
    return "://" in ref


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a URI or a plain (possibly relative) local path."""
    if not has_scheme(uri):
        uri = str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


class CorruptArtifact(UserError):
    """A stored file no longer matches its manifest."""


@dataclass(frozen=True)
class Artifact:
    """A folder of files at `path` on `fs`; `manifest` is None for a plain folder a user gave."""

    kind: str
    name: str
    fs: pafs.FileSystem
    path: str
    manifest: dict | None

    @property
    def uri(self) -> str:
        return self.path if is_local(self.fs) else f"{self.fs.type_name}://{self.path}"

    @property
    def num_bytes(self) -> int:
        if self.manifest is not None:
            return sum(f["bytes"] for f in self.manifest["files"].values())
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sum(i.size for i in infos if i.type == pafs.FileType.File)

    def file_path(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def read_text(self, relative: str) -> str:
        with self.fs.open_input_stream(self.file_path(relative)) as f:
            return f.read().decode("utf-8")


def sha256_of(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Relative paths of all files under `root`, sorted, without the manifest."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rel = [i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File]
    return sorted(p for p in rel if p != MANIFEST)


def build_manifest(fs: pafs.FileSystem, root: str, kind: str, name: str, meta: dict) -> dict:
    files = {}
    for rel in list_files(fs, root):
        size = fs.get_file_info(f"{root}/{rel}").size
        files[rel] = {"bytes": size, "sha256": sha256_of(fs, f"{root}/{rel}")}
    return {"kind": kind, "name": name, "created": time.time(), **meta, "files": files}


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a single file so readers see either the old file or the whole new one."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def verify(artifact: Artifact) -> None:
    """Re-hash every file the manifest lists; raise CorruptArtifact naming the repair."""
    if artifact.manifest is None:
        return
    for rel, expected in artifact.manifest["files"].items():
        info = artifact.fs.get_file_info(artifact.file_path(rel))
        if info.type != pafs.FileType.File:
            problem = "is missing"
        elif info.size != expected["bytes"]:
            problem = f"has {info.size} bytes, the manifest says {expected['bytes']}"
        elif sha256_of(artifact.fs, artifact.file_path(rel)) != expected["sha256"]:
            problem = "does not match its sha256 in the manifest"
        else:
            continue
        repair = artifact.manifest.get("recreate", "remove it and create it again")
        raise CorruptArtifact(
            f"stored {singular(artifact.kind)} '{artifact.name}' is corrupted: {rel} {problem}; "
            f"repair it with: {repair}"
        )


class Store:
    """The artifact store rooted at one URI."""

    def __init__(self, uri: str | None = None):
        self.uri = uri or default_store_uri()
        self.fs, self.root = filesystem_for(self.uri)

    def _dir(self, kind: str, name: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"bad artifact name {name!r}: use letters, digits, '-', '_' and '.'")
        return f"{self.root}/{kind}/{name}"

    def get(self, kind: str, name: str) -> Artifact | None:
        path = self._dir(kind, name)
        try:
            with self.fs.open_input_stream(f"{path}/{MANIFEST}") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            return None
        return Artifact(kind, name, self.fs, path, manifest)

    def list(self, kind: str) -> list[Artifact]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{kind}", allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
        return [a for a in (self.get(kind, n) for n in names) if a is not None]

    def names(self, kind: str) -> list[str]:
        return [a.name for a in self.list(kind)]

    def newest_result(self, source: str, run: str) -> Artifact | None:
        """The latest result artifact a job (`source`) stored for `run`."""
        found = [a for a in self.list("results") if a.manifest.get("source") == source and a.manifest.get("run") == run]
        return max(found, key=lambda a: a.manifest.get("created", a.name), default=None)

    def put_dir(self, kind: str, name: str, local_dir: Path, meta: dict, replace: bool = False) -> Artifact:
        """Copy `local_dir` in as artifact `name`, manifest included, in one atomic step."""
        final = self._dir(kind, name)
        if self.get(kind, name) is not None and not replace:
            raise UserError(f"{singular(kind)} '{name}' is already stored at {final}")
        staging = f"{self.root}/.staging/{kind}-{name}-{uuid.uuid4().hex}"
        self.fs.create_dir(staging, recursive=True)
        try:
            pafs.copy_files(str(Path(local_dir).resolve()), staging, pafs.LocalFileSystem(), self.fs)
            manifest = build_manifest(self.fs, staging, kind, name, meta)
            write_bytes_atomic(self.fs, f"{staging}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
            _commit(self.fs, f"{self.root}/.staging", staging, final)
        finally:
            _delete_dir_quietly(self.fs, staging)
        return self.get(kind, name)

    def remove(self, kind: str, name: str) -> None:
        if self.get(kind, name) is None:
            raise UserError(f"no {singular(kind)} named '{name}' in the store at {self.uri}")
        self.fs.delete_dir(self._dir(kind, name))


def _commit(fs: pafs.FileSystem, scratch: str, staging: str, final: str) -> None:
    fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
    exists = fs.get_file_info(final).type != pafs.FileType.NotFound
    if is_local(fs):
        # Renames: readers see the old artifact or the new one, never a mix.
        old = f"{scratch}/.old-{uuid.uuid4().hex}" if exists else None
        if old:
            fs.move(final, old)
        fs.move(staging, final)
        if old:
            fs.delete_dir(old)
    else:
        # Object stores cannot rename folders: the old artifact disappears with its
        # manifest, and the new one appears when its manifest is written, last.
        if exists:
            fs.delete_file(f"{final}/{MANIFEST}")
            fs.delete_dir(final)
        _copy_manifest_last(fs, staging, final)


def put_location(ref: str, local_dir: Path, kind: str, meta: dict, replace: bool = False) -> str:
    """Copy `local_dir` to a path or URI outside the store, with a manifest, in one atomic step;
    returns the URI. The result opens like any artifact (open_artifact)."""
    fs, path = filesystem_for(str(Path(ref).expanduser().resolve()) if not has_scheme(ref) else ref)
    path = path.rstrip("/")
    if fs.get_file_info(path).type != pafs.FileType.NotFound and not replace:
        raise UserError(f"{ref} already exists; choose another --out or replace it with --force")
    parent, name = path.rsplit("/", 1)
    staging = f"{parent}/.{name}.staging-{uuid.uuid4().hex}"
    fs.create_dir(staging, recursive=True)
    try:
        pafs.copy_files(str(Path(local_dir).resolve()), staging, pafs.LocalFileSystem(), fs)
        manifest = build_manifest(fs, staging, kind, name, meta)
        write_bytes_atomic(fs, f"{staging}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        _commit(fs, parent, staging, path)
    finally:
        _delete_dir_quietly(fs, staging)
    return ref


def local_copy(artifact: Artifact) -> Path:
    """A local folder with the artifact's files: itself when local, else a cached download."""
    if is_local(artifact.fs):
        return Path(artifact.path)
    digest = hashlib.sha256(json.dumps(artifact.manifest, sort_keys=True).encode()).hexdigest()[:16]
    cached = rayfoundry_home() / "cache" / artifact.kind / f"{artifact.name}-{digest}"
    if not cached.is_dir():
        tmp = cached.with_name(f".tmp-{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        pafs.copy_files(artifact.path, str(tmp), artifact.fs, pafs.LocalFileSystem())
        verify(Artifact(artifact.kind, artifact.name, pafs.LocalFileSystem(), str(tmp), artifact.manifest))
        tmp.rename(cached)
    return cached


def _copy_manifest_last(fs: pafs.FileSystem, src: str, dst: str) -> None:
    for rel in list_files(fs, src):
        fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")
    fs.copy_file(f"{src}/{MANIFEST}", f"{dst}/{MANIFEST}")


def _delete_dir_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def open_artifact(ref: str, kind: str, store: Store | None = None) -> Artifact:
    """Resolve a user's reference: a stored name, a local path, or a file/s3/gs URI.

    A bare word is a stored name first; only if nothing is stored under it is it tried as a
    folder in the working directory.
    """
    store = store or Store()
    if has_scheme(ref) or os.sep in ref or ref.startswith((".", "~")):
        return _open_location(ref, kind)
    artifact = store.get(kind, ref)
    if artifact is not None:
        return artifact
    if Path(ref).is_dir():
        return _open_location(ref, kind)
    stored = ", ".join(store.names(kind)) or "none"
    raise UserError(
        f"no {singular(kind)} named '{ref}' in the store at {store.uri} (stored: {stored}); "
        f"give a path or URI, or add it first"
    )


def fetch(ref: str, kind: str, store: Store | None = None) -> Path:
    """A verified local folder for a stored name, a path or a URI."""
    return materialize(open_artifact(ref, kind, store))


def materialize(artifact: Artifact) -> Path:
    """A local folder with the artifact's files, checked against its manifest exactly once:
    in place when local, as the download is made when remote."""
    if is_local(artifact.fs):
        verify(artifact)
    return local_copy(artifact)


def _open_location(ref: str, kind: str) -> Artifact:
    try:
        fs, path = filesystem_for(ref)
    except (pafs.ArrowInvalid, ValueError, OSError) as exc:
        raise UserError(f"cannot open {ref}: {exc}") from None
    path = path.rstrip("/")
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise UserError(f"no such {singular(kind)} folder: {ref}")
    name = path.rsplit("/", 1)[-1]
    manifest_path = f"{path}/{MANIFEST}"
    manifest = None
    if fs.get_file_info(manifest_path).type == pafs.FileType.File:
        with fs.open_input_stream(manifest_path) as f:
            manifest = json.loads(f.read())
        name = manifest.get("name", name)
    return Artifact(kind, name, fs, path, manifest)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


__all__ = [
    "Artifact", "CorruptArtifact", "Store", "fetch", "materialize", "open_artifact", "verify", "local_copy",
    "write_bytes_atomic", "human_bytes", "default_store_uri", "rayfoundry_home", "filesystem_for",
]
