"""Scoring input: JSONL or Parquet files (or a folder of them), indexed once and then read window by window.

Rows are numbered by their position in the input: the 0-based line of a JSONL file or row of a Parquet file,
counted on across the files of a folder in name order. The input is cut into windows of ``part_rows`` rows
(never across files); a window is the unit of work, of output (one Parquet part) and of resume. Reading
yields each row as raw bytes: a JSONL line as it is, a Parquet row as a JSON object of the columns that
matter. Nothing is parsed or validated here (see rows.py), so both engines see exactly the same bytes.

Parquet text columns may be strings or binary: binary values are taken as UTF-8, byte for byte (a value that is
not valid UTF-8 makes its row's bytes invalid UTF-8 too, so rows.py rejects that row), never as a Python repr.
The id column is int64 for integer ids, uint64 for a uint64 Parquet column, else string (see rows.check_id).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vexport.errors import VexportError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ROW_FIELDS = ("text", "prompt", "response", "messages")
ID_FIELD = "id"
ID_SCAN_LINES = 1000  # how many JSONL lines decide whether there is an id column, and its type
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InputFile:
    """One input file: where its rows sit among all rows, and (JSONL) the byte offset of each window."""

    path: Path
    kind: str  # "jsonl" | "parquet"
    first_row: int
    num_rows: int
    offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class Window:
    """Rows [start, stop) of the input, all in one file (plan.files[file])."""

    file: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputPlan:
    """The indexed input: files in order, the window size, a content hash and the id column's type."""

    root: Path
    files: tuple[InputFile, ...]
    part_rows: int
    sha256: str
    id_kind: str | None  # "int" | "uint" (a uint64 Parquet id column) | "str" | None (no id column)

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def windows(self) -> list[Window]:
        return [Window(i, f.first_row + s, f.first_row + min(s + self.part_rows, f.num_rows))
                for i, f in enumerate(self.files) for s in range(0, f.num_rows, self.part_rows)]


def index_input(path: str | Path, part_rows: int) -> InputPlan:
    """Find the input files, count their rows, hash their bytes and note where each window starts."""
    root = Path(path).expanduser().absolute()
    if part_rows < 1:
        raise VexportError(f"--part-rows must be at least 1, got {part_rows}")
    digest = hashlib.sha256()
    files, first = [], 0
    for file in find_input_files(root):
        name = file.relative_to(root) if root.is_dir() else Path(file.name)
        digest.update(f"{name.as_posix()}\0{file.stat().st_size}\0".encode())
        indexed = _index_file(file, first, part_rows, digest)
        files.append(indexed)
        first += indexed.num_rows
    plan = InputPlan(root, tuple(files), part_rows, digest.hexdigest(), _id_kind(files))
    log.info("input %s: %d files, %d rows, sha256 %s", root, len(files), plan.total_rows, plan.sha256[:12])
    return plan


def find_input_files(root: Path) -> list[Path]:
    """The input file itself, or the JSONL and Parquet files under a folder (hidden ones skipped), by name."""
    if not root.exists():
        raise VexportError(f"--input {root} does not exist")
    if root.is_file():
        if _kind(root) is None:
            raise VexportError(f"--input {root}: expected a .jsonl or .parquet file (or a folder of them)")
        return [root]
    found = sorted(p for p in root.rglob("*") if p.is_file() and _kind(p) and not _hidden(p.relative_to(root)))
    if not found:
        raise VexportError(f"--input {root}: the folder has no .jsonl or .parquet files")
    return found


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _index_file(path: Path, first_row: int, part_rows: int, digest) -> InputFile:
    if _kind(path) == "parquet":
        return InputFile(path, "parquet", first_row, _parquet_rows(path, digest))
    rows, offsets = _index_jsonl(path, part_rows, digest)
    return InputFile(path, "jsonl", first_row, rows, tuple(offsets))


def _index_jsonl(path: Path, part_rows: int, digest) -> tuple[int, list[int]]:
    """Rows (lines) in a JSONL file and the byte offset of every window's first line, in one chunked pass."""
    import numpy as np

    offsets, newlines, position, last = [0], 0, 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A)  # newlines in this chunk
            targets = np.arange(len(offsets) * part_rows, newlines + len(ends) + 1, part_rows)
            offsets.extend((position + ends[targets - newlines - 1] + 1).tolist())  # row t follows newline t
            newlines, position, last = newlines + len(ends), position + len(chunk), chunk[-1:]
    rows = newlines + (1 if last != b"\n" else 0)
    return rows, [o for i, o in enumerate(offsets) if i * part_rows < rows]


def _parquet_rows(path: Path, digest) -> int:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise VexportError(f"--input {path}: not a readable Parquet file ({' '.join(str(exc).split())})") from None
    schema = metadata.schema.to_arrow_schema()
    if not set(schema.names) & set(ROW_FIELDS):
        raise VexportError(f"--input {path}: no 'text', 'prompt'/'response' or 'messages' column")
    for name in ("text", "prompt", "response"):
        if name in schema.names and not _text_type(schema.field(name).type):
            raise VexportError(f"--input {path}: column {name!r} has type {schema.field(name).type}; "
                               "expected strings (or UTF-8 binary)")
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return metadata.num_rows


def _text_type(kind) -> bool:
    """A column type whose values are text: strings, binary (decoded as UTF-8), all-null; dictionary-encoded too."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _id_kind(files: Sequence[InputFile]) -> str | None:
    """The id column's type: from the first Parquet schema with an `id`, or the first JSONL lines with one."""
    for file in files:
        kind = _parquet_id_kind(file.path) if file.kind == "parquet" else _jsonl_id_kind(file.path)
        if kind:
            return kind
    return None


def _parquet_id_kind(path: Path) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    if ID_FIELD not in schema.names:
        return None
    kind = schema.field(ID_FIELD).type
    if pa.types.is_uint64(kind):
        return "uint"  # ids up to 2**64 - 1: an int64 column could not hold them
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "str"
    raise VexportError(f"--input {path}: column 'id' has type {kind}; ids must be integers or strings")


def _jsonl_id_kind(path: Path) -> str | None:
    with open(path, "rb") as fh:
        for _, line in zip(range(ID_SCAN_LINES), fh):
            if b'"id"' not in line:
                continue
            try:
                value = json.loads(line).get(ID_FIELD)
            except (ValueError, AttributeError, RecursionError):  # not an object, or nested too deep: a bad row
                continue
            if isinstance(value, str):
                return "str"
            if isinstance(value, int) and not isinstance(value, bool):
                return "int"
    return None


def read_windows(plan: InputPlan, windows: Sequence[Window], line_limit: int) -> Iterator[tuple[Window, list]]:
    """Each window with its rows as raw bytes (None for a JSONL line over LINE_LIMIT bytes), in the given order.

    Runs of consecutive windows of one file are read in one sequential pass.
    """
    for run in _runs(windows):
        file = plan.files[run[0].file]
        if file.kind == "jsonl":
            yield from _read_jsonl_run(file, run, plan.part_rows, line_limit)
        else:
            yield from _read_parquet_run(file, run)


def _runs(windows: Sequence[Window]) -> Iterator[list[Window]]:
    run: list[Window] = []
    for window in windows:
        if run and (window.file != run[-1].file or window.start != run[-1].stop):
            yield run
            run = []
        run.append(window)
    if run:
        yield run


def _read_jsonl_run(file: InputFile, run: list[Window], part_rows: int, line_limit: int):
    with open(file.path, "rb") as fh:
        fh.seek(file.offsets[(run[0].start - file.first_row) // part_rows])
        for window in run:
            yield window, [_read_line(fh, line_limit) for _ in range(window.rows)]


def _read_line(fh, limit: int) -> bytes | None:
    """One line; None (and the rest of the line skipped) when it is longer than LIMIT bytes."""
    line = fh.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line
    while (rest := fh.readline(_CHUNK)) and not rest.endswith(b"\n"):
        pass
    return None


def _read_parquet_run(file: InputFile, run: list[Window]):
    rows = _parquet_rows_from(file.path, run[0].start - file.first_row)
    for window in run:
        yield window, [next(rows) for _ in range(window.rows)]


def _parquet_rows_from(path: Path, start: int) -> Iterator[bytes]:
    """Rows of a Parquet file from row START on, each as a JSON object of the scoring columns."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    columns = [c for c in (*ROW_FIELDS, ID_FIELD) if c in parquet.schema_arrow.names]
    group_starts = [0]
    for g in range(parquet.num_row_groups):
        group_starts.append(group_starts[-1] + parquet.metadata.row_group(g).num_rows)
    first = max(0, bisect.bisect_right(group_starts, start) - 1)
    skip = start - group_starts[first]
    batches = parquet.iter_batches(batch_size=4096, row_groups=range(first, parquet.num_row_groups), columns=columns)
    for batch in batches:
        for record in batch.slice(min(skip, batch.num_rows)).to_pylist():
            yield json.dumps(record, ensure_ascii=False, default=_as_text).encode("utf-8", "surrogateescape")
        skip = max(0, skip - batch.num_rows)


def _as_text(value) -> str:
    """A binary value as the UTF-8 text it holds; bytes that are not UTF-8 stay those bytes in the row (see
    the module docstring). Anything else JSON cannot hold (a date in a messages struct) as its str()."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)
