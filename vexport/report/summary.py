"""The summary table of a comparison report: one row per artifact (the reference first), shared by the
Markdown and HTML writers so that both show the same cells.

Every metric cell carries the status of its threshold check ("pass", "fail", "skipped" or None when the
metric has no check), so a writer can mark failures without re-deciding them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

HEADER = ("Artifact", "Format", "Dtype / bits", "Size on disk", "Load", "Throughput", "Per-token SQNR",
          "Max abs error", "Mean abs error", "Pearson", "Spearman", "Top-1 agreement", "Pairwise agreement",
          "Result")
# (parity key, formatting) of the metric columns, in HEADER order
_METRICS = (("sqnr_db", "db"), ("max_abs_error", "error"), ("mean_abs_error", "error"), ("pearson", "corr"),
            ("spearman", "corr"), ("top1_agreement", "share"), ("pairwise_agreement", "share"))


@dataclass(frozen=True)
class Cell:
    text: str
    status: str | None = None  # the threshold check's status, when the column has one


def as_float(value: Any) -> float:
    """A JSON number or one of the strings "inf", "-inf", "nan" as a float (None is nan)."""
    if value is None:
        return math.nan
    return float(value)


def fmt_bytes(size: Any) -> str:
    if size is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def fmt_seconds(seconds: Any) -> str:
    return "—" if seconds is None else f"{seconds:.2f} s"


def fmt_rate(scoring: Mapping[str, Any] | None) -> str:
    rate = (scoring or {}).get("tokens_per_second")
    return "—" if rate is None else f"{rate:,.0f} tok/s"


def fmt_metric(value: Any, kind: str) -> str:
    number = as_float(value)
    if math.isnan(number):
        return "n/a"
    if kind == "db":
        return "identical" if number == math.inf else f"{number:.1f} dB"
    if kind == "error":
        return f"{number:.3g}"
    if kind == "corr":
        return f"{number:.5f}" if number < 0.99999 else f"{number:.7f}"
    return f"{number:.3f}"


def dtype_bits(entry: Mapping[str, Any]) -> str:
    """'float16 (16-bit)', 'int4 (4-bit, group 128)'."""
    parts = [f"{entry['bits']}-bit"] if entry.get("bits") else []
    group = entry.get("group_size")
    if group is not None:
        parts.append("per channel" if group == -1 else f"group {group}")
    return f"{entry.get('precision', '—')} ({', '.join(parts)})" if parts else str(entry.get("precision", "—"))


def _statuses(parity: Mapping[str, Any]) -> dict[str, str]:
    return {check["metric"]: check["status"] for check in parity.get("checks", [])}


def reference_row(reference: Mapping[str, Any]) -> list[Cell]:
    """The reference's own row: what it costs; the fidelity cells are blank."""
    name = PurePath(str(reference.get("model"))).name or str(reference.get("model"))
    head = [f"reference: {name}", reference.get("backend", "—"),
            f"{reference.get('dtype')} on {reference.get('device')}", fmt_bytes(reference.get("size_bytes")),
            fmt_seconds(reference.get("load_seconds")), fmt_rate(reference.get("scoring"))]
    return [Cell(str(text)) for text in head] + [Cell("—") for _ in _METRICS] + [Cell("reference")]


def artifact_row(entry: Mapping[str, Any]) -> list[Cell]:
    """One artifact's row: what it is, what it costs, every headline metric and its verdict."""
    parity = entry["parity"]
    statuses = _statuses(parity)
    head = [entry["label"], entry["format"], dtype_bits(entry), fmt_bytes(entry.get("size_bytes")),
            fmt_seconds(entry.get("load_seconds")), fmt_rate(entry.get("scoring"))]
    metrics = [Cell(fmt_metric(parity.get(key), kind), statuses.get(key)) for key, kind in _METRICS]
    nonfinite = any(statuses.get(f"{side}_nonfinite") == "fail" for side in ("reference", "candidate"))
    verdict = "PASS" if parity["passed"] else ("FAIL (NaN/inf)" if nonfinite else "FAIL")
    return [Cell(text) for text in head] + metrics + [Cell(verdict, "pass" if parity["passed"] else "fail")]


def summary_rows(report: Mapping[str, Any]) -> list[list[Cell]]:
    """The reference row, then one row per artifact, in the order they were checked."""
    return [reference_row(report["reference"]), *(artifact_row(e) for e in report["artifacts"])]
