"""Parity reports: one report dict, written as JSON, Markdown or HTML (picked by the file's suffix).

The caller builds the dict: a one-artifact report (artifact, reference, evalset, environment,
`ParityResult.to_dict()`, worst sequences) or a comparison report (the reference, then `artifacts`, each with
its costs, parity, worst sequences and plot data; see vexport/data/report.schema.json); the writers only
render it. HTML needs a comparison report and draws its plots with matplotlib (imported only then).
Files are written atomically: a temporary file in the same folder, then `os.replace`, so a reader never
sees half a report.
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

__all__ = ["check_report_path", "render_html", "render_json", "render_markdown", "validate_report", "write_report"]


def render_html(report: Mapping[str, Any]) -> str:
    """The comparison report as one self-contained HTML page (see vexport.report.html)."""
    from vexport.report.html import render_html as render

    return render(report)


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ReportSchemaError listing every mismatch with vexport/data/report.schema.json."""
    from vexport.report.schema import validate_report as validate

    validate(report)


_RENDERERS: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    ".json": render_json,
    ".md": render_markdown,
    ".html": render_html,
}


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Render `report` in the format its suffix names (.json, .md, .html) and write it atomically."""
    target = check_report_path(path)
    _write_atomic(target, _RENDERERS[target.suffix.lower()](report))
    return target


def check_report_path(path: str | os.PathLike[str]) -> Path:
    """PATH as a Path when a report can be written there (known suffix, not a folder); else VexportError."""
    target = Path(path)
    if target.suffix.lower() not in _RENDERERS:
        known = ", ".join(_RENDERERS)
        raise VexportError(
            f"--report {target}: unsupported suffix {target.suffix or '(none)'!r} (use {known})"
        )
    if target.is_dir():
        raise VexportError(f"--report {target}: is a folder, expected a file path")
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
