"""The JSON report's schema (vexport/data/report.schema.json) and validation against it.

`validate_report` checks a report dict, exactly as its JSON would be written, and raises one ReportSchemaError
listing every problem (path in the document and what is wrong), not just the first.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from vexport.errors import MissingDependencyError, VexportError
from vexport.report.json import to_jsonable

SCHEMA_FILE = "report.schema.json"
_SHOWN = 10  # problems listed in the message


class ReportSchemaError(VexportError):
    """A report does not match vexport/data/report.schema.json; `problems` lists every mismatch."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        super().__init__(f"report does not match {SCHEMA_FILE}: {'; '.join(problems[:_SHOWN])}{more}")


@functools.cache
def report_schema() -> dict[str, Any]:
    """The schema, read once from the package data."""
    text = resources.files("vexport").joinpath("data", SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def schema_problems(report: Mapping[str, Any]) -> list[str]:
    """Every mismatch between REPORT (as JSON would hold it) and the schema, as 'path: message' lines."""
    try:
        from jsonschema import Draft202012Validator
    except ImportError:
        raise MissingDependencyError("validating a report needs the 'jsonschema' package: "
                                     "pip install jsonschema") from None
    validator = Draft202012Validator(report_schema())
    errors = sorted(validator.iter_errors(to_jsonable(report)), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {_short(e.message)}" for e in errors]


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ReportSchemaError naming every problem when REPORT does not match the schema."""
    problems = schema_problems(report)
    if problems:
        raise ReportSchemaError(problems)


def _short(message: str, width: int = 160) -> str:
    flat = " ".join(message.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
