"""Data: sources, the deterministic split, shard round trips, Ray Datasets."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import auth
from cluster.errors import UserError
from cluster.store import Store
from jobs.data.prepared import check_tokenized_for, tokenizer_entry
from jobs.data.shards import ROW_TOKENS, read_tokens, ray_dataset, write_shards
from jobs.data.sources import (
    DebianHandbookSource, Document, JsonlSource, ParquetSource, ShakespeareSource, TxtSource, html_to_text,
    markdown_play_to_text, read_documents,
)
from jobs.data.split import split_documents


def test_txt_jsonl_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    (tmp_path / "d.jsonl").write_text('{"body": "one"}\n\n{"body": "two", "x": 1}\n')
    pq.write_table(pa.table({"text": ["p0", None, "p2"]}), tmp_path / "d.parquet")
    txt = read_documents(TxtSource(kind="txt", paths=[str(tmp_path / "*.txt")]))
    assert [d.text for d in txt] == ["alpha\n", "beta\n"]
    jsonl = read_documents(JsonlSource(kind="jsonl", paths=[str(tmp_path / "d.jsonl")], field="body"))
    assert [(d.id.rsplit(":", 1)[1], d.text) for d in jsonl] == [("1", "one"), ("3", "two")]
    parquet = read_documents(ParquetSource(kind="parquet", paths=[str(tmp_path / "d.parquet")]))
    assert [d.text for d in parquet] == ["p0", "p2"]


def test_source_errors_name_file_and_key(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: no field 'text' \(it has: body\)"):
        read_documents(JsonlSource(kind="jsonl", paths=[str(tmp_path / "d.jsonl")]))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"no column 'text' \(it has: content\)"):
        read_documents(ParquetSource(kind="parquet", paths=[str(tmp_path / "d.parquet")]))
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(UserError, match="the corpus is empty"):
        read_documents(TxtSource(kind="txt", paths=[str(tmp_path / "empty.txt")]))
    with pytest.raises(UserError, match="no such file"):
        read_documents(TxtSource(kind="txt", paths=[str(tmp_path / "missing.txt")]))


def test_shakespeare_is_plain_text():
    plays = read_documents(ShakespeareSource(kind="shakespeare"))
    assert len(plays) > 30
    hamlet = next(p for p in plays if p.id.endswith("hamlet.md"))
    assert hamlet.text.startswith("Hamlet\n\nACT I\n")
    assert "BERNARDO\nWho's there?" in hamlet.text
    assert "**" not in hamlet.text and "  \n" not in hamlet.text


def test_markdown_and_html_to_text():
    play = "## ACT I\n\n**LEAR**  \nNothing.  \n\n_Exit_\n"
    assert markdown_play_to_text(play) == "ACT I\n\nLEAR\nNothing.\n\nExit\n"
    page = ("<html><head><title>t</title></head><body><ul class='docnav'><li>Prev</li><li>Next</li></ul>"
            "<h1>Title</h1><p>Some <b>bold</b>\n  text</p>"
            "<pre>a  b\nc</pre><script>x()</script></body></html>")
    assert html_to_text(page) == "Title\nSome bold text\na  b\nc\n"


def test_debian_handbook_pages():
    source = DebianHandbookSource(kind="debian-handbook")
    if not Path(source.root).is_dir():
        pytest.skip("Debian package debian-handbook is not installed (.ci/run installs it)")
    pages = read_documents(source)
    assert len(pages) > 100
    apt = next(p for p in pages if p.id.endswith("/apt.html"))
    assert "Chapter 6. Maintenance and Updates: The APT Tools" in apt.text
    assert "Download the ebook" not in apt.text and "<" not in apt.text[:2000]


def test_split_is_deterministic_and_independent_of_order():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(40)]
    first = split_documents(docs, 0.1)
    again = split_documents(list(reversed(docs)), 0.1)
    assert len(first["validation"]) == 4 and len(first["train"]) == 36
    assert {d.id for d in first["validation"]} == {d.id for d in again["validation"]}
    assert [d.id for d in first["train"]] == [d.id for d in docs if d not in first["validation"]]


def test_split_of_a_single_document_cuts_at_a_line():
    text = "".join(f"line {i}\n" for i in range(100))
    parts = split_documents([Document("only", text)], 0.1)
    assert parts["train"][0].text + parts["validation"][0].text == text
    assert parts["validation"][0].text.startswith("line ") and 60 < len(parts["validation"][0].text) < 90


def stored_dataset(tmp_path, stream, shard_tokens, **meta):
    out = tmp_path / "shards"
    out.mkdir()
    shards = write_shards(stream, out, "validation", shard_tokens)
    meta = {"splits": {"validation": {"tokens": len(stream), "documents": 1, "shards": shards}}, **meta}
    return Store(str(tmp_path / "store")).put_dir("datasets", "d", out, meta), shards


def test_shards_round_trip_the_stream(tmp_path):
    stream = np.arange(5 * ROW_TOKENS + 123, dtype=np.int32)
    dataset, shards = stored_dataset(tmp_path, stream, shard_tokens=2 * ROW_TOKENS)
    assert [s["tokens"] for s in shards] == [2 * ROW_TOKENS, 2 * ROW_TOKENS, ROW_TOKENS + 123]
    np.testing.assert_array_equal(read_tokens(dataset, "validation"), stream)
    np.testing.assert_array_equal(read_tokens(dataset, "validation", 4100), stream[:4100])


class OneTokenTokenizer:
    eos_token_id = 0

    def __len__(self) -> int:
        return 1


def model_folder(path, tokenizer_json: str | None):
    path.mkdir()
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def test_a_dataset_is_read_by_models_with_its_tokenizer_only(tmp_path):
    made_by = model_folder(tmp_path / "made-by", '{"vocab": 1}')
    entry = tokenizer_entry("made-by", made_by, OneTokenTokenizer())
    dataset, _ = stored_dataset(tmp_path, np.arange(10, dtype=np.int32), ROW_TOKENS, tokenizer=entry)
    check_tokenized_for(dataset, made_by, "made-by")
    check_tokenized_for(dataset, model_folder(tmp_path / "no-tokenizer-json", None), "x")  # nothing to compare
    with pytest.raises(UserError, match="tokenized with made-by's tokenizer, which differs from other's"):
        check_tokenized_for(dataset, model_folder(tmp_path / "other", '{"vocab": 2}'), "other")


def test_split_reads_as_a_ray_dataset(tmp_path):
    import ray

    auth.set_process_mode("disabled")  # a private Ray; the test's end restores the mode
    stream = np.arange(3 * ROW_TOKENS + 5, dtype=np.int32)
    dataset, _ = stored_dataset(tmp_path, stream, shard_tokens=2 * ROW_TOKENS)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        rows = ray_dataset(dataset, "validation").take_all()
    finally:
        ray.shutdown()
    rows = sorted(rows, key=lambda r: r["tokens"][0])  # Ray reads shards in parallel, in any order
    assert [len(r["tokens"]) for r in rows] == [ROW_TOKENS, ROW_TOKENS, ROW_TOKENS, 5]
    np.testing.assert_array_equal(np.concatenate([r["tokens"] for r in rows]), stream)
    assert json.loads((tmp_path / "store" / "datasets" / "d" / "manifest.json").read_text())["kind"] == "datasets"
