"""Report files: ``--report`` paths checked before any work, then each written in the format its suffix names."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ReportPaths = str | os.PathLike | Sequence[str | os.PathLike] | None


def report_paths(paths: ReportPaths) -> list[Path]:
    """REPORT as a list of paths, each checked (a known suffix, not a folder)."""
    from vexport.report import check_report_path

    if paths is None:
        return []
    return [check_report_path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]


def write_reports(paths: ReportPaths, comparison: Mapping[str, Any],
                  single: Mapping[str, Any] | None = None) -> list[Path]:
    """Write every report path (HTML always gets the comparison; JSON/Markdown get SINGLE when given); the paths
    written."""
    from vexport.report import write_report

    written = []
    for path in report_paths(paths):
        html = path.suffix.lower() == ".html"
        written.append(write_report(path, comparison if single is None or html else single))
    return written
