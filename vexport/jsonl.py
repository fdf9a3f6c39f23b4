"""Bounded JSONL reading for small user files (prompt groups, calibration text).

Lines are split on b"\\n" only (JSON strings may hold U+2028, which ``str.splitlines`` would split on), each
decoded on its own so invalid UTF-8 names its line, and a line longer than the bound is refused before it
is held whole in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vexport.errors import VexportError

MAX_LINE_BYTES = 64 << 20  # one JSONL record of a prompt or calibration file; a 1 GB line is refused unread


def read_lines(path: Path, source: str, limit: int = MAX_LINE_BYTES,
               missing: str = "no such file") -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of PATH; errors are VexportErrors naming SOURCE and the line."""
    try:
        with open(path, "rb") as fh:
            yield from _lines(fh, source, limit)
    except FileNotFoundError:
        raise VexportError(f"{source}: {missing}") from None
    except OSError as exc:
        raise VexportError(f"{source}: cannot read the file ({' '.join(str(exc).split())})") from None


def _lines(fh, source: str, limit: int) -> Iterator[tuple[int, str]]:
    number = 0
    while line := fh.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            raise VexportError(f"{source}:{number}: line longer than {limit} bytes: refused")
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError:
            raise VexportError(f"{source}: cannot read the file (line {number} is not valid UTF-8)") from None


def parse_json(line: str, where: str) -> Any:
    """One JSON value; invalid JSON, too deep nesting and too-long integers are one-line VexportErrors."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise VexportError(f"{where}: not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # integers over the digit limit; nesting too deep
        raise VexportError(f"{where}: not valid JSON ({type(exc).__name__})") from None
