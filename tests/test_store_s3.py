"""The store on an object store: s3:// URIs against an S3-compatible server (moto) on loopback.

Object stores cannot rename folders, so commits take the other path: files first, manifest last.
"""
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from cluster.store import Store, local_copy, open_artifact, verify


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def s3_store_uri():
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
            time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
        yield f"s3://rayfoundry/store?{query}"
    finally:
        server.kill()
        server.wait()


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("RAYFOUNDRY_HOME", str(tmp_path / "home"))


def folder(path, files):
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_put_replace_verify_and_download(s3_store_uri, tmp_path):
    store = Store(s3_store_uri)
    store.fs.create_dir("rayfoundry")
    first = store.put_dir("models", "m", folder(tmp_path / "v1", {"w.bin": b"old", "sub/x": b"1"}), {})
    assert store.names("models") == ["m"] and first.num_bytes == 4
    second = store.put_dir("models", "m", folder(tmp_path / "v2", {"w.bin": b"newer"}), {}, replace=True)
    listed = store.fs.get_file_info(pafs.FileSelector(second.path, recursive=True))
    assert sorted(i.base_name for i in listed if i.type == pafs.FileType.File) == ["manifest.json", "w.bin"]
    verify(second)
    local = local_copy(second)
    assert (local / "w.bin").read_bytes() == b"newer"
    assert open_artifact("m", "models", store).manifest == second.manifest
