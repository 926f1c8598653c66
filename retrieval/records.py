"""Documents from record files, JSON Lines or Parquet: one document a line (or row).

Fields are `id`, `title`, `text` and `metadata` unless named otherwise. Each record is validated
by the same wire type `POST /v1/documents` uses; a record that fails is reported by its line (or
row) and skipped, and the rest are read. An integer id is taken as its decimal string (common in
exports); a record without an id gets one from its content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hybrid_serve.schemas import DocumentIn

RECORD_SUFFIXES = (".jsonl", ".ndjson", ".parquet")


@dataclass(frozen=True)
class FieldNames:
    id: str = "id"
    title: str = "title"
    text: str = "text"
    metadata: str = "metadata"


@dataclass(frozen=True)
class BadRecord:
    """A record that was not ingested, and why."""

    source: str
    line: int  # 1-based line of a JSONL file, row of a Parquet file
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def is_record_file(path: Path) -> bool:
    return path.suffix.lower() in RECORD_SUFFIXES


def read_records(
    path: Path, fields: FieldNames = FieldNames()
) -> Iterator[tuple[int, DocumentIn | BadRecord]]:
    """(line, document or problem) for every record of a .jsonl/.ndjson or .parquet file."""
    rows: Iterator[tuple[int, dict[str, Any] | BadRecord]]
    if path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path, fields)
    else:
        rows = _jsonl_rows(path)
    for line, raw in rows:
        if isinstance(raw, BadRecord):
            yield line, raw
        else:
            yield line, _document(str(path), line, raw, fields)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRecord]]:
    with open(path, encoding="utf-8", errors="strict") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                yield (
                    line,
                    BadRecord(str(path), line, f"invalid JSON: {exc.msg} (column {exc.colno})"),
                )
                continue
            if not isinstance(raw, dict):
                yield (
                    line,
                    BadRecord(str(path), line, f"not a JSON object but {type(raw).__name__}"),
                )
                continue
            yield line, raw


def _parquet_rows(path: Path, fields: FieldNames) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if fields.text not in names:
        raise ValueError(
            f"{path}: no column {fields.text!r} (columns: {', '.join(sorted(names))}); "
            "name the text column with --text-field"
        )
    wanted = [f for f in (fields.id, fields.title, fields.text, fields.metadata) if f in names]
    line = 0
    for batch in pf.iter_batches(batch_size=4096, columns=wanted):
        for row in batch.to_pylist():
            line += 1
            yield line, row


def _document(
    source: str, line: int, raw: dict[str, Any], fields: FieldNames
) -> DocumentIn | BadRecord:
    doc_id = raw.get(fields.id)
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    metadata = raw.get(fields.metadata)
    if isinstance(metadata, str):  # Parquet exports often carry metadata as a JSON string
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            return BadRecord(source, line, f"{fields.metadata}: not a JSON object")
    if isinstance(metadata, list) and all(
        isinstance(kv, tuple | list) and len(kv) == 2 for kv in metadata
    ):
        metadata = dict(metadata)  # a Parquet map column
    candidate = {
        "id": doc_id,
        "title": raw.get(fields.title) if raw.get(fields.title) is not None else "",
        "text": raw.get(fields.text),
        "metadata": metadata if metadata is not None else {},
    }
    try:
        return DocumentIn.model_validate(candidate)
    except ValidationError as exc:
        names = {"id": fields.id, "title": fields.title, "text": fields.text}
        names["metadata"] = fields.metadata
        problems = []
        for e in exc.errors():
            where = names.get(str(e["loc"][0]), str(e["loc"][0])) if e["loc"] else "record"
            what = "missing" if candidate.get(str(e["loc"][0])) is None else e["msg"]
            problems.append(f"{where}: {what}")
        return BadRecord(source, line, "; ".join(problems))
