"""vexport/scoring/inputs.py: finding, indexing and reading JSONL and Parquet inputs window by window."""

from __future__ import annotations

import json

import pytest

from tests.scoring_helpers import write_jsonl, write_parquet
from vexport.errors import VexportError
from vexport.scoring import inputs
from vexport.scoring.inputs import index_input, read_windows


def _read_all(plan, limit: int = 1 << 20) -> list:
    return [line for _, lines in read_windows(plan, plan.windows(), limit) for line in lines]


@pytest.mark.parametrize("chunk", [3, 1 << 20])
@pytest.mark.parametrize("part_rows", [1, 2, 5])
@pytest.mark.parametrize("text", [b"", b"a\n", b"a", b"a\nbb\n\nccc\nd", b"x\n" * 11, b"\n\n\n", b"l1\r\nl2\r\n"])
def test_jsonl_windows_give_back_every_line(tmp_path, monkeypatch, chunk, part_rows, text):
    monkeypatch.setattr(inputs, "_CHUNK", chunk)  # window starts that fall in every position of a chunk
    path = tmp_path / "in.jsonl"
    path.write_bytes(text)
    plan = index_input(path, part_rows)
    expected = text.splitlines(keepends=True)
    assert plan.total_rows == len(expected)
    assert _read_all(plan) == expected
    windows = plan.windows()
    assert [w.start for w in windows] == list(range(0, len(expected), part_rows))
    assert all(w.rows == min(part_rows, len(expected) - w.start) for w in windows)


def test_reading_a_window_in_the_middle_seeks_to_it(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": f"row {i}"} for i in range(50)])
    plan = index_input(path, 7)
    window = plan.windows()[4]
    [(got, lines)] = list(read_windows(plan, [window], 1 << 20))
    assert got == window and [json.loads(x)["text"] for x in lines] == [f"row {i}" for i in range(28, 35)]


def test_a_line_over_the_limit_is_none_and_the_next_line_is_intact(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "short"}\n' + b'{"text": "' + b"x" * 5000 + b'"}\n' + b'{"text": "after"}\n')
    lines = _read_all(index_input(path, 2), limit=100)
    assert lines[0] == b'{"text": "short"}\n' and lines[1] is None and lines[2] == b'{"text": "after"}\n'


def test_parquet_rows_come_back_as_json_objects_across_row_groups(tmp_path):
    rows = [{"id": i, "text": f"t{i}"} for i in range(23)]
    path = write_parquet(tmp_path / "in.parquet", rows, row_group_size=4)
    plan = index_input(path, 5)
    assert plan.total_rows == 23 and plan.id_kind == "int"
    assert [json.loads(x) for x in _read_all(plan)] == rows
    [(_, lines)] = list(read_windows(plan, [plan.windows()[3]], 1 << 20))  # starts inside row group 3
    assert [json.loads(x)["id"] for x in lines] == [15, 16, 17, 18, 19]


def test_a_folder_is_read_in_name_order_with_rows_numbered_across_files(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "b.jsonl", [{"text": "b0"}, {"text": "b1"}, {"text": "b2"}])
    write_parquet(folder / "a.parquet", [{"text": "a0"}, {"text": "a1"}])
    write_jsonl(folder / "sub" / "c.jsonl", [{"text": "c0"}])
    write_jsonl(folder / ".hidden.jsonl", [{"text": "never"}])
    write_jsonl(folder / "_meta" / "x.jsonl", [{"text": "never"}])
    (folder / "notes.txt").write_text("ignored")
    plan = index_input(folder, 2)
    assert [f.path.name for f in plan.files] == ["a.parquet", "b.jsonl", "c.jsonl"]
    assert [f.first_row for f in plan.files] == [0, 2, 5]
    assert [(w.start, w.stop) for w in plan.windows()] == [(0, 2), (2, 4), (4, 5), (5, 6)]  # never across files
    assert [json.loads(x)["text"] for x in _read_all(plan)] == ["a0", "a1", "b0", "b1", "b2", "c0"]


def test_hash_follows_the_bytes(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    first = index_input(path, 4).sha256
    assert index_input(path, 4).sha256 == first
    write_jsonl(path, [{"text": "b"}])
    assert index_input(path, 4).sha256 != first


@pytest.mark.parametrize("rows, kind", [
    ([{"text": "a"}, {"text": "b", "id": "x"}], "str"),
    ([{"text": "a", "id": 3}], "int"),
    ([{"text": "a"}], None),
])
def test_id_kind_comes_from_the_first_rows(tmp_path, rows, kind):
    assert index_input(write_jsonl(tmp_path / "in.jsonl", rows), 8).id_kind == kind


def test_bad_inputs_are_one_line_errors_naming_the_flag(tmp_path):
    with pytest.raises(VexportError, match="--input .* does not exist"):
        index_input(tmp_path / "missing.jsonl", 8)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(VexportError, match="expected a .jsonl or .parquet"):
        index_input(tmp_path / "data.csv", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VexportError, match="no .jsonl or .parquet files"):
        index_input(tmp_path / "empty", 8)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(VexportError, match="not a readable Parquet file"):
        index_input(tmp_path / "fake.parquet", 8)
    write_parquet(tmp_path / "cols.parquet", [{"id": 1}])
    with pytest.raises(VexportError, match="no 'text', 'prompt'/'response' or 'messages' column"):
        index_input(tmp_path / "cols.parquet", 8)
    with pytest.raises(VexportError, match="--part-rows"):
        index_input(write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}]), 0)


def test_id_kind_skips_lines_it_cannot_parse(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"[" * 5000 + b'"id"\n' + b'{"id": 1' + b"0" * 5000 + b"}\n" + b'{"text": "a", "id": "x"}\n')
    plan = index_input(path, 2)
    assert plan.id_kind == "str" and plan.total_rows == 3
