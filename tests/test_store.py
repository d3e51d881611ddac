"""The artifact store: URIs, manifests, atomic commits, corruption detection."""
import json
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from cluster.errors import UserError
from cluster.store import CorruptArtifact, Store, open_artifact, verify, write_bytes_atomic
from conftest import REPO, tree_snapshot


def make_folder(path, files):
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize("as_uri", [False, True], ids=["plain-path", "file-uri"])
def test_put_list_and_reopen(tmp_path, as_uri):
    root = tmp_path / "store"
    store = Store(f"file://{root}" if as_uri else str(root))
    src = make_folder(tmp_path / "src", {"a.bin": b"x" * 10, "sub/b.txt": b"hello"})
    artifact = store.put_dir("models", "m", src, {"source": "test"})
    assert artifact.num_bytes == 15
    assert set(artifact.manifest["files"]) == {"a.bin", "sub/b.txt"}
    assert [a.name for a in store.list("models")] == ["m"]
    assert (root / "models" / "m" / "sub" / "b.txt").read_bytes() == b"hello"
    verify(store.get("models", "m"))
    reopened = open_artifact(str(root / "models" / "m"), "models")
    assert reopened.manifest == artifact.manifest


KILLED_WRITER = """
import sys, time
import cluster.store as store_module
from cluster.store import Store

real_copy = store_module.pafs.copy_files
def slow_copy(src, dst, *args):  # copy, then hang so the parent can kill us mid-write
    real_copy(src, dst, *args)
    print("copied", flush=True)
    time.sleep(600)
store_module.pafs.copy_files = slow_copy
Store(sys.argv[1]).put_dir("models", "m", sys.argv[2], {})
"""


def test_a_writer_killed_mid_write_leaves_no_artifact(tmp_path):
    store_root = tmp_path / "store"
    src = make_folder(tmp_path / "src", {"w.bin": b"1" * 100_000, "config.json": b"{}"})
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(store_root), str(src)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert writer.stdout.readline().strip() == "copied"
        staged = list((store_root / ".staging").iterdir())
        assert len(staged) == 1 and (staged[0] / "w.bin").exists()  # killed with the files half-committed
    finally:
        writer.kill()
        writer.wait()
    store = Store(str(store_root))
    assert store.get("models", "m") is None and store.list("models") == []
    assert not (store_root / "models" / "m").exists()


def test_replace_swaps_whole_artifacts(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.put_dir("models", "m", make_folder(tmp_path / "v1", {"w": b"old", "extra": b"e"}), {})
    store.put_dir("models", "m", make_folder(tmp_path / "v2", {"w": b"new"}), {}, replace=True)
    assert sorted(p.name for p in (tmp_path / "store" / "models" / "m").iterdir()) == ["manifest.json", "w"]
    with pytest.raises(UserError, match="already stored"):
        store.put_dir("models", "m", tmp_path / "v2", {})


def test_corruption_is_detected_with_repair_hint(tmp_path):
    store = Store(str(tmp_path / "store"))
    src = make_folder(tmp_path / "src", {"w.bin": bytes(range(256))})
    store.put_dir("models", "m", src, {"recreate": "rayfoundry models add src --force"})
    stored = tmp_path / "store" / "models" / "m" / "w.bin"
    data = bytearray(stored.read_bytes())
    data[7] ^= 0xFF  # same size, different content
    stored.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match=r"w.bin does not match its sha256.*rayfoundry models add src --force"):
        verify(store.get("models", "m"))
    stored.unlink()
    with pytest.raises(CorruptArtifact, match="w.bin is missing"):
        verify(store.get("models", "m"))


def test_write_bytes_atomic_replaces_whole_file(tmp_path):
    fs, path = pafs.FileSystem.from_uri(f"file://{tmp_path}/results/r.json")
    write_bytes_atomic(fs, path, json.dumps({"v": 1}).encode())
    write_bytes_atomic(fs, path, json.dumps({"v": 2}).encode())
    assert json.loads((tmp_path / "results" / "r.json").read_text()) == {"v": 2}
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["r.json"]


def test_bad_references_name_the_problem_and_change_nothing(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.put_dir("models", "known", make_folder(tmp_path / "src", {"w": b"1"}), {})
    before = tree_snapshot(tmp_path / "store")
    with pytest.raises(UserError, match=r"no model named 'nope'.*stored: known"):
        open_artifact("nope", "models", store)
    with pytest.raises(UserError, match="no such model folder"):
        open_artifact(str(tmp_path / "missing"), "models", store)
    with pytest.raises(UserError, match="bad artifact name"):
        store.put_dir("models", "../escape", tmp_path / "src", {})
    assert tree_snapshot(tmp_path / "store") == before
