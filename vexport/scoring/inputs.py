"""Scoring input: JSONL or Parquet files (or a folder of them), indexed once and then read window by window.

Rows are numbered by their position in the input: the 0-based line of a JSONL file or row of a Parquet file,
counted on across the files of a folder in name order. The input is cut into windows of ``part_rows`` rows
(never across files); a window is the unit of work, of output (one Parquet part) and of resume. Reading
yields each row as raw bytes: a JSONL line as it is, a Parquet row as a JSON object of the columns that
matter. Nothing is parsed or validated here (see rows.py), so both engines see exactly the same bytes.

Parquet text columns may be strings or binary: binary values are taken as UTF-8, byte for byte (a value that is
not valid UTF-8 makes its row's bytes invalid UTF-8 too, so rows.py rejects that row), never as a Python repr.
The id column is int64 for integer ids, uint64 for a uint64 Parquet column, else string (see rows.check_id).

What is scored is what was hashed. Indexing reads each file once through one descriptor and records its
identity (size, mtime_ns, ctime_ns, inode, device), the sha256 of its bytes and, for JSONL, of each window's byte range.
Reading hashes the bytes it hands on and checks them before a window leaves this module: a JSONL window against
its indexed digest (and the file's end after its last window), a Parquet file as a whole, read once into a
private copy that pyarrow then parses (so no later edit can reach the rows). A window whose bytes differ is
InputChangedError, a VexportError naming the file. Only regular files are opened, and a path is opened
non-blocking and checked with fstat before anything is read, so a FIFO or device never blocks or streams.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vexport.errors import VexportError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ROW_FIELDS = ("text", "prompt", "response", "messages")
ID_FIELD = "id"
ID_SCAN_LINES = 1000  # how many JSONL lines decide whether there is an id column, and its type
_CHUNK = 1 << 20
SNAPSHOT_IN_MEMORY = 256 << 20  # a Parquet file up to this size is read into memory, a larger one to a temp file
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class InputChangedError(VexportError):
    """An input file changed between indexing and reading (or the end of the run)."""


@dataclass(frozen=True)
class InputFile:
    """One input file: where its rows sit among all rows, its identity and hashes, and (JSONL) the byte offset
    and sha256 of each window."""

    path: Path
    kind: str  # "jsonl" | "parquet"
    first_row: int
    num_rows: int
    offsets: tuple[int, ...] = ()
    identity: tuple[int, ...] = ()  # (size, mtime_ns, ctime_ns, inode, device) when indexed
    sha256: str = ""  # of the file's bytes
    window_sha256: tuple[str, ...] = ()  # JSONL: of each window's bytes, offsets[k] up to offsets[k + 1] (or EOF)


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
    files, kinds, first = [], [], 0
    for file in find_input_files(root):
        name = file.relative_to(root) if root.is_dir() else Path(file.name)
        indexed, id_kind = _index_file(file, name.as_posix(), first, part_rows, digest)
        files.append(indexed)
        kinds.append(id_kind)
        first += indexed.num_rows
    plan = InputPlan(root, tuple(files), part_rows, digest.hexdigest(), next((k for k in kinds if k), None))
    log.info("input %s: %d files, %d rows, sha256 %s", root, len(files), plan.total_rows, plan.sha256[:12])
    return plan


def find_input_files(root: Path) -> list[Path]:
    """The input file itself, or the JSONL and Parquet files under a folder (hidden ones skipped), by name.

    Every one must be a regular file (links followed): a FIFO, device or socket, given or found by its name in
    the folder, is refused naming it, before anything opens it."""
    try:
        mode = root.stat().st_mode
    except OSError:
        raise VexportError(f"--input {root} does not exist") from None
    if not stat.S_ISDIR(mode):
        _require_regular(root, mode)
        if _kind(root) is None:
            raise VexportError(f"--input {root}: expected a .jsonl or .parquet file (or a folder of them)")
        return [root]
    found = []
    for path in sorted(root.rglob("*")):
        if not _kind(path) or _hidden(path.relative_to(root)):
            continue
        try:
            mode = path.stat().st_mode
        except OSError as exc:  # a link to nothing
            raise VexportError(f"--input {path} cannot be read ({exc.strerror})") from None
        if not stat.S_ISDIR(mode):  # a folder named like a data file is just a folder
            _require_regular(path, mode)
            found.append(path)
    if not found:
        raise VexportError(f"--input {root}: the folder has no .jsonl or .parquet files")
    return found


def _require_regular(path: Path, mode: int) -> None:
    """PATH (of MODE, links followed) must be a regular file: a FIFO would block a reader, a device stream."""
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
    raise VexportError(f"--input {path} is {what}{link}, not a regular file: give .jsonl or .parquet files")


def open_input(path: Path) -> BinaryIO:
    """PATH opened for reading, only if it is a regular file: opened non-blocking (a FIFO swapped in after
    find_input_files looked cannot block) and checked with fstat before a byte is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What says a file is the one indexed: size, mtime and ctime (an edit with its mtime put back still moves the
    ctime), inode and device (a file renamed over it)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def check_unchanged(file: InputFile) -> None:
    """FILE's path must still be the file indexed: same inode and device, size, mtime and ctime."""
    try:
        now = identity(os.stat(file.path))
    except OSError:
        raise InputChangedError(changed_message(file.path, "removed")) from None
    if now != file.identity:
        raise InputChangedError(changed_message(file.path, _difference(file.identity, now)))


def check_input_unchanged(plan: "InputPlan") -> None:
    """The whole input is still what was indexed: the same files (a folder is listed again), each unchanged."""
    if plan.root.is_dir():
        now, then = find_input_files(plan.root), [f.path for f in plan.files]
        for path in sorted(set(now) ^ set(then)):
            raise InputChangedError(changed_message(path, "added to the folder" if path in now else "removed"))
    for file in plan.files:
        check_unchanged(file)


def changed_message(path: Path, what: str) -> str:
    return (f"--input {path} changed during the run ({what}); the parts scored before the change are kept: "
            "put the input back as it was and run again with --resume, or score it afresh with --force")


def _difference(then: tuple[int, ...], now: tuple[int, ...]) -> str:
    if then[3:] != now[3:]:
        return "replaced by another file"
    if now[0] < then[0]:
        return f"truncated: {then[0]} bytes when indexed, {now[0]} now"
    if now[0] > then[0]:
        return f"grew: {then[0]} bytes when indexed, {now[0]} now"
    return "modified: same size, new mtime" if now[1] != then[1] else "modified: same size and mtime, new ctime"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _index_file(path: Path, name: str, first_row: int, part_rows: int, digest) -> tuple[InputFile, str | None]:
    """One pass over PATH through one descriptor: its identity, hashes, rows, (JSONL) window offsets and hashes,
    and the type of its id column. A file that changes while it is indexed is InputChangedError."""
    with open_input(path) as fh:
        before = identity(os.fstat(fh.fileno()))
        digest.update(f"{name}\0{before[0]}\0".encode())
        if _kind(path) == "parquet":
            rows, sha256, id_kind, size = _index_parquet(path, fh, digest)
            file = InputFile(path, "parquet", first_row, rows, identity=before, sha256=sha256)
        else:
            rows, offsets, windows, size = _index_jsonl(fh, part_rows, digest)
            file = InputFile(path, "jsonl", first_row, rows, tuple(offsets), before, window_sha256=tuple(windows))
            fh.seek(0)
            id_kind = _jsonl_id_kind(fh)
        after = identity(os.fstat(fh.fileno()))
    if after != before or size != before[0]:
        what = _difference(before, after) if after != before else f"{size} bytes read of {before[0]}"
        raise InputChangedError(f"--input {path} changed while it was being indexed ({what}): "
                                "score it once it is still")
    return file, id_kind


def _index_jsonl(fh: BinaryIO, part_rows: int, digest) -> tuple[int, list[int], list[str], int]:
    """Rows (lines) in a JSONL file, the byte offset and sha256 of every window, and the bytes read, in one chunked
    pass."""
    import numpy as np

    offsets, windows, newlines, position, last = [0], [hashlib.sha256()], 0, 0, b"\n"
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A)  # newlines in this chunk
        targets = np.arange(len(offsets) * part_rows, newlines + len(ends) + 1, part_rows)
        starts = (position + ends[targets - newlines - 1] + 1).tolist()  # row t follows newline t
        view, cut = memoryview(chunk), 0
        for start in starts:  # each window's bytes into its own digest
            windows[-1].update(view[cut:start - position])
            cut = start - position
            windows.append(hashlib.sha256())
        windows[-1].update(view[cut:])
        offsets.extend(starts)
        newlines, position, last = newlines + len(ends), position + len(chunk), chunk[-1:]
    rows = newlines + (1 if last != b"\n" else 0)
    kept = [i for i in range(len(offsets)) if i * part_rows < rows]
    return rows, [offsets[i] for i in kept], [windows[i].hexdigest() for i in kept], position


def _index_parquet(path: Path, fh: BinaryIO, digest) -> tuple[int, str, str | None, int]:
    """(rows, sha256, id kind, bytes read) of a Parquet file: the footer, then every byte, from one descriptor."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(fh).metadata
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise VexportError(f"--input {path}: not a readable Parquet file ({' '.join(str(exc).split())})") from None
    schema = metadata.schema.to_arrow_schema()
    if not set(schema.names) & set(ROW_FIELDS):
        raise VexportError(f"--input {path}: no 'text', 'prompt'/'response' or 'messages' column")
    for name in ("text", "prompt", "response"):
        if name in schema.names and not _text_type(schema.field(name).type):
            raise VexportError(f"--input {path}: column {name!r} has type {schema.field(name).type}; "
                               "expected strings (or UTF-8 binary)")
    id_kind = _parquet_id_kind(path, schema)
    fh.seek(0)
    sha256, size = hashlib.sha256(), 0
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        sha256.update(chunk)
        size += len(chunk)
    return metadata.num_rows, sha256.hexdigest(), id_kind, size


def _text_type(kind) -> bool:
    """A column type whose values are text: strings, binary (decoded as UTF-8), all-null; dictionary-encoded too."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _parquet_id_kind(path: Path, schema) -> str | None:
    import pyarrow as pa

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


def _jsonl_id_kind(fh: BinaryIO) -> str | None:
    """The id type of the first of the file's first ID_SCAN_LINES lines that has one."""
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

    Runs of consecutive windows of one file are read in one sequential pass. A window is yielded only once its
    bytes are known to be the indexed ones (else InputChangedError).
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


def _open_indexed(file: InputFile) -> BinaryIO:
    """FILE opened, which must still be the file indexed (same inode, size and mtime)."""
    fh = open_input(file.path)
    now = identity(os.fstat(fh.fileno()))
    if now != file.identity:
        fh.close()
        raise InputChangedError(changed_message(file.path, _difference(file.identity, now)))
    return fh


class _HashedLines:
    """A file read line by line from POSITION on, every byte read also hashed into the current window's digest."""

    def __init__(self, fh: BinaryIO, position: int):
        self.fh, self.position, self.digest = fh, position, hashlib.sha256()

    def readline(self, limit: int) -> bytes:
        line = self.fh.readline(limit)
        self.digest.update(line)
        self.position += len(line)
        return line

    def check(self, file: InputFile, window: Window, index: int) -> None:
        """The window just read must be the indexed bytes: they ended where indexed, with the same sha256."""
        digest, self.digest = self.digest.hexdigest(), hashlib.sha256()
        end = file.offsets[index + 1] if index + 1 < len(file.offsets) else file.identity[0]
        if self.position != end or digest != file.window_sha256[index]:
            first = window.start - file.first_row + 1
            what = f"lines {first}-{first + window.rows - 1} are not the bytes indexed when the run started"
            raise InputChangedError(changed_message(file.path, what))
        if index + 1 == len(file.offsets) and self.fh.read(1):
            raise InputChangedError(changed_message(file.path, "bytes follow its last indexed line"))


def _read_jsonl_run(file: InputFile, run: list[Window], part_rows: int, line_limit: int):
    first = (run[0].start - file.first_row) // part_rows
    with _open_indexed(file) as fh:
        fh.seek(file.offsets[first])
        lines = _HashedLines(fh, file.offsets[first])
        for index, window in enumerate(run, first):
            rows = [_read_line(lines, line_limit) for _ in range(window.rows)]
            lines.check(file, window, index)
            yield window, rows


def _read_line(fh, limit: int) -> bytes | None:
    """One line; None (and the rest of the line skipped) when it is longer than LIMIT bytes."""
    line = fh.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line
    while (rest := fh.readline(_CHUNK)) and not rest.endswith(b"\n"):
        pass
    return None


def _read_parquet_run(file: InputFile, run: list[Window]):
    with _snapshot(file) as source:
        rows = _parquet_rows_from(source, run[0].start - file.first_row)
        for window in run:
            yield window, [next(rows) for _ in range(window.rows)]


@contextlib.contextmanager
def _snapshot(file: InputFile) -> Iterator[Any]:
    """The Parquet file read once, hashed and checked against the index: pyarrow parses this copy (in memory up
    to SNAPSHOT_IN_MEMORY bytes, else a temporary file), so the rows scored are the bytes hashed."""
    import pyarrow as pa

    size, digest = file.identity[0], hashlib.sha256()
    with _open_indexed(file) as fh, contextlib.ExitStack() as stack:
        if size <= SNAPSHOT_IN_MEMORY:
            data = fh.read(size + 1)
            digest.update(data)
            copied, source = len(data), pa.BufferReader(data)
        else:
            copy = stack.enter_context(tempfile.TemporaryFile())
            while copy.tell() <= size and (chunk := fh.read(min(_CHUNK, size + 1 - copy.tell()))):
                digest.update(chunk)
                copy.write(chunk)
            copied, source = copy.tell(), pa.PythonFile(copy, mode="r")
            copy.seek(0)
        if copied != size or digest.hexdigest() != file.sha256:
            raise InputChangedError(changed_message(file.path, "its bytes are not those indexed when the run started"))
        yield source


def _parquet_rows_from(source, start: int) -> Iterator[bytes]:
    """Rows of a Parquet file from row START on, each as a JSON object of the scoring columns."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source)
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
