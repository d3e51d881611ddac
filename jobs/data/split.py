"""Deterministic train/validation split by document.

Documents are ranked by the sha256 of their id; the last `fraction` of that ranking (at least
one document) is validation. The split depends only on ids, never on order or randomness, so
re-running a preparation, or adding unrelated files, keeps most assignments. A corpus of a
single document is cut at the line boundary nearest to (1 - fraction) of its characters.
"""
from __future__ import annotations

import hashlib

from jobs.data.sources import Document


def _rank_key(document: Document) -> str:
    return hashlib.sha256(document.id.encode()).hexdigest()


def split_documents(documents: list[Document], fraction: float) -> dict[str, list[Document]]:
    if len(documents) == 1:
        return _split_one(documents[0], fraction)
    ranked = sorted(documents, key=_rank_key)
    num_validation = min(len(documents) - 1, max(1, round(fraction * len(documents))))
    validation_ids = {d.id for d in ranked[-num_validation:]}
    return {
        "train": [d for d in documents if d.id not in validation_ids],
        "validation": [d for d in documents if d.id in validation_ids],
    }


def _split_one(document: Document, fraction: float) -> dict[str, list[Document]]:
    target = int(len(document.text) * (1 - fraction))
    cut = document.text.rfind("\n", 0, target) + 1 or target
    return {
        "train": [Document(f"{document.id}#train", document.text[:cut])],
        "validation": [Document(f"{document.id}#validation", document.text[cut:])],
    }
