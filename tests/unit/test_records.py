"""Record files (JSON Lines, Parquet) as `index add` reads them: field names, ids, bad records."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybrid_serve.retrieval.records import BadRecord, FieldNames, read_records


def test_jsonl_records_with_a_bad_line_reported_and_skipped(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": 12, "title": "A", "text": "Alpha text.", "metadata": {"k": 1}}),
        "",
        "{oops",
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "b", "text": "   "}),
        json.dumps({"title": "no id", "text": "Content id."}),
        json.dumps({"id": True, "text": "bool id"}),
        json.dumps({"id": "m", "text": "x", "metadata": [1, 2]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    got = list(read_records(path))
    good = [(n, d) for n, d in got if not isinstance(d, BadRecord)]
    bad = {n: d.reason for n, d in got if isinstance(d, BadRecord)}
    assert [(n, d.id, d.title, d.metadata) for n, d in good] == [
        (1, "12", "A", {"k": 1}),
        (6, None, "no id", {}),
    ]
    assert sorted(bad) == [3, 4, 5, 7, 8]  # line numbers count the blank line
    assert bad[3].startswith("invalid JSON") and "list" in bad[4]
    assert bad[5].startswith("text:") and bad[7].startswith("id:") and "metadata" in bad[8]
    assert str(BadRecord(str(path), 3, "x")) == f"{path}:3: x"


def test_field_names_from_flags_and_parquet_rows(tmp_path):
    path = tmp_path / "in.parquet"
    table = pa.Table.from_pylist(
        [
            {"doc": "p1", "heading": "One", "body": "First body.", "extra": {"a": "b"}},
            {"doc": "p2", "heading": "Two", "body": None, "extra": None},
            {"doc": "p3", "heading": None, "body": "Third body.", "extra": None},
        ]
    )
    pq.write_table(table, path)
    fields = FieldNames(id="doc", title="heading", text="body", metadata="extra")
    got = list(read_records(path, fields))
    assert [n for n, _ in got] == [1, 2, 3]
    assert got[0][1].id == "p1" and got[0][1].metadata == {"a": "b"}
    assert isinstance(got[1][1], BadRecord) and got[1][1].reason == "body: missing"
    assert got[2][1].title == "" and got[2][1].text == "Third body."
    with pytest.raises(ValueError, match="--text-field"):
        list(read_records(path))  # no "text" column
