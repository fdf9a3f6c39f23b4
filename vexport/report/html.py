"""The HTML report: one self-contained page (styles inline, plots as base64 PNG) over a comparison report.

The page shows what was compared and how to repeat it, the summary table (one row per artifact, the
reference first), an overview plot, then per artifact its checks against thresholds, a scatter of candidate
against reference values, a histogram of per-token errors, the error along token position, and the worst
sequences with their text. It loads nothing from the network. The template is vexport/data/report.html.j2;
the plots are drawn from the report's `figures` data (vexport.report.plots), so a page can be redrawn
from the JSON report alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from vexport.errors import VexportError
from vexport.report import plots
from vexport.report.bits import bits_table, is_mixed
from vexport.report.json import to_jsonable
from vexport.report.summary import HEADER, as_float, dtype_bits, fmt_bytes, fmt_metric, summary_rows

TEMPLATE_FILE = "report.html.j2"
EXCERPT_WIDTH = 160  # characters of a worst sequence shown before it is opened
_OPS = {">=": "≥", "<=": "≤", "==": "="}
_KINDS = {"sqnr_db": "db", "max_abs_error": "error", "mean_abs_error": "error", "pearson": "corr",
          "spearman": "corr", "top1_agreement": "share", "pairwise_agreement": "share"}


@functools.cache
def _template() -> Any:
    from jinja2 import Environment, StrictUndefined

    source = resources.files("vexport").joinpath("data", TEMPLATE_FILE).read_text(encoding="utf-8")
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def render_html(report: Mapping[str, Any]) -> str:
    """The comparison report as one HTML page ending in a newline."""
    data = to_jsonable(report)
    if "artifacts" not in data:
        raise VexportError("an HTML report is drawn from a comparison report (vexport check / vexport.check_many "
                           "give one); this dict has no 'artifacts'")
    return _template().render(**_context(data)).rstrip("\n") + "\n"


def _context(data: Mapping[str, Any]) -> dict[str, Any]:
    artifacts = data["artifacts"]
    return {
        "report": data,
        "header": HEADER,
        "rows": summary_rows(data),
        "overview": plots.data_uri(plots.overview_png(artifacts)),
        "artifacts": [_artifact(i, entry) for i, entry in enumerate(artifacts)],
        "environment": sorted(data.get("environment", {}).items()),
        "failed": [a["label"] for a in artifacts if not a["parity"]["passed"]],
    }


def _artifact(index: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    label, figures = entry["label"], entry["figures"]
    images = [
        ("scatter", "Candidate against reference value per token", plots.scatter_png(figures["scatter"], label, index)),
        ("histogram", "Histogram of per-token errors",
         plots.error_histogram_png(figures["error_histogram"], label, index)),
        ("position", "Absolute error against token position",
         plots.error_by_position_png(figures["error_by_position"], label, index)),
    ]
    return {
        "index": index,
        "entry": entry,
        "facts": _facts(entry),
        "checks": [_check_row(c) for c in entry["parity"]["checks"]],
        "images": [{"kind": k, "alt": f"{label}: {alt}", "uri": plots.data_uri(png)} for k, alt, png in images],
        "worst": [_worst_row(rank, w) for rank, w in enumerate(entry["worst"], start=1)],
        "bits": _bits(entry.get("export", {}).get("allocation")),
    }


def _bits(allocation: Any) -> dict[str, Any] | None:
    table = bits_table(allocation)
    return table if table is not None and is_mixed(table) else None


def _facts(entry: Mapping[str, Any]) -> list[tuple[str, str]]:
    scoring = entry.get("scoring", {})
    facts = [("path", entry.get("path")), ("format", entry.get("format")), ("dtype / bits", dtype_bits(entry)),
             ("backend", f"{entry.get('backend')} on {entry.get('device')}"),
             ("size on disk", fmt_bytes(entry.get("size_bytes"))),
             ("load", f"{entry.get('load_seconds', 0):.2f} s"),
             ("scoring", f"{scoring.get('seconds', 0):.2f} s for {scoring.get('tokens')} tokens in "
                         f"{scoring.get('batches')} batches (warm-up {scoring.get('warmup_seconds', 0):.2f} s)")]
    facts += [(f"export: {k}", _flat(v)) for k, v in sorted(entry.get("export", {}).items()) if k != "allocation"]
    return [(k, str(v)) for k, v in facts]


def _flat(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(map(_flat, value))
    return str(value)


def _check_row(check: Mapping[str, Any]) -> dict[str, str]:
    metric, threshold = check["metric"], check.get("threshold")
    kind = _KINDS.get(metric)
    shown = (lambda v: fmt_metric(v, kind)) if kind else (lambda v: f"{as_float(v):g}")
    limit = "not set" if threshold is None else f"{_OPS.get(check['op'], check['op'])} {shown(threshold)}"
    return {"metric": metric, "value": shown(check.get("value")), "threshold": limit, "status": check["status"],
            "message": check.get("message", "")}


def _worst_row(rank: int, worst: Mapping[str, Any]) -> dict[str, Any]:
    text = str(worst.get("text", ""))
    flat = " ".join(text.split())
    excerpt = flat if len(flat) <= EXCERPT_WIDTH else flat[: EXCERPT_WIDTH - 1] + "…"
    return {"rank": rank, "index": worst.get("index"), "group": worst.get("group"), "response": worst.get("response"),
            "tokens": worst.get("tokens"), "position": worst.get("position"),
            "max_abs_error": fmt_metric(worst.get("max_abs_error"), "error"),
            "reference_final": fmt_metric(worst.get("reference_final"), "error"),
            "candidate_final": fmt_metric(worst.get("candidate_final"), "error"),
            "order_kept": worst.get("group_order_kept"), "excerpt": excerpt, "text": text}
