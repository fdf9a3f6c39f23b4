"""The Markdown report: a human-readable page over the same report dict as the JSON report.

One artifact: title with the verdict, what was compared (candidate, reference, evaluation set), the checks
table (metric, value, threshold, PASS/FAIL), other measurements, failures, notes, worst sequences and the
environment. A comparison (a report with `artifacts`): what was compared and how to repeat it, the summary
table (one row per artifact, as on the HTML page; failing cells marked ✗), the thresholds used, failures
and the environment. Plain string building: each section is one small function returning its lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vexport.report.bits import bits_table, is_mixed
from vexport.report.json import to_jsonable
from vexport.report.summary import HEADER, summary_rows

TEXT_WIDTH = 80  # characters of a worst sequence's text shown in the table
_OPS = {">=": "≥", "<=": "≤", "==": "="}
_STATUS = {"pass": "PASS", "fail": "FAIL", "skipped": "not checked"}
_UNITS = {"sqnr_db": " dB"}
_OTHER_METRICS = (
    "mean_abs_error",
    "final_max_abs_error",
    "final_mean_abs_error",
    "final_pearson",
    "num_tokens",
    "num_sequences",
    "num_groups",
    "num_pairs",
)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown text ending in a newline."""
    data = to_jsonable(report)
    if "artifacts" in data:
        return _render_comparison(data)
    parity = data.get("parity", {})
    sections = [
        _title(data, parity),
        _checks(parity),
        _other_measurements(parity),
        _bullets("Failures", parity.get("failures", []), empty="None."),
        _bullets("Notes", parity.get("notes", []), empty=None),
        _bits(None, data.get("artifact", {}).get("allocation")),
        _worst(data.get("worst", [])),
        _key_values("Environment", data.get("environment", {})),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _cell(value: Any) -> str:
    return " ".join(_fmt(value).split()).replace("|", "\\|")


def _row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _title(data: Mapping[str, Any], parity: Mapping[str, Any]) -> list[str]:
    verdict = "PASS" if parity.get("passed") else "FAIL"
    art, ref, ev = data.get("artifact", {}), data.get("reference", {}), data.get("evalset", {})
    lines = [
        f"# vexport parity report: {verdict}",
        "",
        f"Candidate: `{_fmt(art.get('path'))}` ({_fmt(art.get('format'))}, {_fmt(art.get('precision'))}).",
        f"Reference: `{_fmt(ref.get('model'))}` on {_fmt(ref.get('backend'))} "
        f"({_fmt(ref.get('device'))}, {_fmt(ref.get('dtype'))}).",
        f"Evaluation set: `{_fmt(ev.get('name'))}`: {_fmt(ev.get('groups'))} groups, "
        f"{_fmt(ev.get('sequences'))} sequences, {_fmt(ev.get('tokens'))} tokens. "
        f"Seed: {_fmt(data.get('seed'))}.",
        f"Created {_fmt(data.get('created'))} by vexport {_fmt(data.get('vexport_version'))}.",
    ]
    extra = {k: v for k, v in art.items() if k not in ("path", "format", "precision")}
    return lines + (["", *_table(["Artifact", "Value"], extra.items())] if extra else [])


def _checks(parity: Mapping[str, Any]) -> list[str]:
    rows = []
    for check in parity.get("checks", []):
        unit = _UNITS.get(check["metric"], "")
        threshold = check.get("threshold")
        op = _OPS.get(check["op"], check["op"])
        limit = "—" if threshold is None else f"{op} {_fmt(threshold)}{unit}"
        value = f"{_fmt(check.get('value'))}{unit}"
        rows.append([check["metric"], value, limit, _STATUS.get(check["status"], check["status"])])
    return ["## Checks", "", *_table(["Metric", "Value", "Threshold", "Result"], rows)]


def _other_measurements(parity: Mapping[str, Any]) -> list[str]:
    rows = [[name, parity[name]] for name in _OTHER_METRICS if name in parity]
    return ["## Other measurements", "", *_table(["Metric", "Value"], rows)] if rows else []


def _bullets(heading: str, items: Sequence[str], empty: str | None) -> list[str]:
    if not items:
        return [f"## {heading}", "", empty] if empty else []
    return [f"## {heading}", "", *(f"- {' '.join(str(i).split())}" for i in items)]


def _truncate(text: Any, width: int = TEXT_WIDTH) -> str:
    flat = " ".join(str(text if text is not None else "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _worst(worst: Sequence[Mapping[str, Any]]) -> list[str]:
    if not worst:
        return []
    rows = [
        [rank, w.get("index"), w.get("max_abs_error"), _truncate(w.get("text"))]
        for rank, w in enumerate(worst, start=1)
    ]
    return ["## Worst sequences", "", *_table(["Rank", "Sequence", "Max abs error", "Text"], rows)]


def _key_values(heading: str, values: Mapping[str, Any]) -> list[str]:
    if not values:
        return []
    return [f"## {heading}", "", *_table(["Name", "Value"], sorted(values.items()))]


# -------------------------------------------------------------------------------------- comparison
_THRESHOLD_COLUMNS = (("min_sqnr_db", "min SQNR (dB)"), ("max_abs_error", "max abs error"),
                      ("min_pearson", "min Pearson"), ("min_spearman", "min Spearman"),
                      ("min_top1_agreement", "min top-1"), ("min_pairwise_agreement", "min pairwise"))


def _render_comparison(data: Mapping[str, Any]) -> str:
    sections = [
        _comparison_title(data),
        _summary(data),
        _thresholds(data.get("artifacts", [])),
        _artifact_failures(data.get("artifacts", [])),
        *(_bits(a.get("label"), a.get("export", {}).get("allocation")) for a in data.get("artifacts", [])),
        _key_values("Environment", data.get("environment", {})),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _bits(label: str | None, allocation: Any) -> list[str]:
    """The per-module bits table of a mixed-precision export (nothing for a uniform one)."""
    table = bits_table(allocation)
    if table is None or not is_mixed(table):
        return []
    title = "## Bits per module" + (f": {label}" if label else "")
    note = (f"Average {_fmt(table['average_bits'])} stored bits per Linear weight (scales and zero points "
            "counted). `4g128`: 4 bits in groups of 128 inputs; `fp16`: left unquantized.")
    return [title, "", *_table(table["header"], table["rows"]), "", note]


def _comparison_title(data: Mapping[str, Any]) -> list[str]:
    ref, ev = data.get("reference", {}), data.get("evalset", {})
    count = len(data.get("artifacts", []))
    return [
        f"# vexport parity comparison: {'PASS' if data.get('passed') else 'FAIL'} "
        f"({count} artifact{'s' if count != 1 else ''})",
        "",
        f"Reference: `{_fmt(ref.get('model'))}`, {_fmt(ref.get('description'))}.",
        f"Evaluation set: `{_fmt(ev.get('name'))}`: {_fmt(ev.get('groups'))} prompt groups, "
        f"{_fmt(ev.get('sequences'))} sequences, {_fmt(ev.get('tokens'))} tokens (digest {_fmt(ev.get('digest'))}). "
        f"Seed: {_fmt(data.get('seed'))}. Batches of at most {_fmt(data.get('batch_tokens'))} tokens.",
        f"Device: {_fmt(data.get('environment', {}).get('device'))}. "
        f"Created {_fmt(data.get('created'))} by vexport {_fmt(data.get('vexport_version'))}.",
        "",
        "Repeat it with:",
        "",
        "```bash",
        str(data.get("command", "")),
        "```",
    ]


def _summary(data: Mapping[str, Any]) -> list[str]:
    rows = [[f"{c.text} ✗" if c.status == "fail" and not c.text.startswith("FAIL") else c.text for c in row]
            for row in summary_rows(data)]
    note = ("Size on disk: every file of the folder. Load: seconds to load. Throughput: real tokens per second "
            "scoring the evaluation set in this run, after one warm-up sequence. ✗: fails its threshold.")
    return ["## Summary", "", *_table(HEADER, rows), "", note]


def _thresholds(artifacts: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [[a.get("label"), *(a["parity"]["thresholds"].get(key) for key, _ in _THRESHOLD_COLUMNS)]
            for a in artifacts]
    return ["## Thresholds", "", *_table(["Artifact", *(name for _, name in _THRESHOLD_COLUMNS)], rows)]


def _artifact_failures(artifacts: Sequence[Mapping[str, Any]]) -> list[str]:
    items = [f"{a.get('label')}: {message}" for a in artifacts for message in a["parity"].get("failures", [])]
    return _bullets("Failures", items, empty="None.")
