"""Parity reports: one report dict, written as JSON or Markdown (picked by the file's suffix).

The caller builds the dict (artifact, reference, evalset, environment, `ParityResult.to_dict()`, worst
sequences); the writers only render it. Files are written atomically: a temporary file in the same folder,
then `os.replace`, so a reader never sees half a report.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vexport.errors import VexportError
from vexport.report.json import render_json
from vexport.report.markdown import render_markdown

__all__ = ["render_json", "render_markdown", "write_report"]

_RENDERERS: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    ".json": render_json,
    ".md": render_markdown,
}


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Render `report` in the format its suffix names (.json, .md) and write it atomically."""
    target = Path(path)
    renderer = _RENDERERS.get(target.suffix.lower())
    if renderer is None:
        known = ", ".join(_RENDERERS)
        raise VexportError(
            f"--report {target}: unsupported suffix {target.suffix or '(none)'!r} (use {known})"
        )
    if target.is_dir():
        raise VexportError(f"--report {target}: is a folder, expected a file path")
    _write_atomic(target, renderer(report))
    return target


def _write_atomic(target: Path, text: str) -> None:
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is for reading
        os.replace(tmp, target)
    except OSError as exc:
        raise VexportError(f"--report {target}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
