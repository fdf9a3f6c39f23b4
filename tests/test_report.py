"""Tests for vexport/report: JSON and Markdown writers over one report dict."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vexport.errors import VexportError
from vexport.parity import compare, thresholds_for, worst_sequences
from vexport.report import render_markdown, write_report
from vexport.report.json import to_jsonable

TOP_KEYS = {
    "vexport_version", "created", "artifact", "reference", "evalset", "seed", "environment", "parity",
    "worst",
}


def _report(fail: bool = False) -> dict:
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=n).astype(np.float32) for n in (5, 3, 7, 2)]
    cand = [r + np.float32(1e-7) for r in ref]
    if fail:
        cand[2] = cand[2].copy()
        cand[2][1] = np.nan
        cand[0] = -cand[0]
    parity = compare(ref, cand, [0, 0, 1, 1], thresholds_for("onnx", "float32"))
    worst = worst_sequences(ref, cand, 2)
    return {
        "vexport_version": "0.1.0",
        "created": "2025-01-01T00:00:00+00:00",
        "artifact": {"path": "out/tiny-onnx", "format": "onnx", "precision": "float32", "opset": 17},
        "reference": {"model": "tiny | model", "backend": "torch", "device": "cpu", "dtype": "float32"},
        "evalset": {"name": "builtin", "groups": 2, "sequences": 4, "tokens": 17},
        "seed": 0,
        "environment": {"python": "3.11", "numpy": np.__version__, "onnxruntime": "1.20.0"},
        "parity": parity.to_dict(),
        "worst": [
            {"index": i, "max_abs_error": e, "text": "a long\nresponse | with pipes " * 10}
            for i, e in worst
        ],
    }


def test_json_round_trips_with_every_key(tmp_path):
    report = _report(fail=True)
    path = write_report(tmp_path / "report.json", report)
    assert path == tmp_path / "report.json"
    text = path.read_text()
    loaded = json.loads(text)
    assert set(loaded) == TOP_KEYS
    assert loaded == to_jsonable(report)  # nothing lost or renamed; inf written as "inf"
    assert loaded["parity"]["passed"] is False and loaded["worst"][0]["max_abs_error"] == "inf"
    assert text.startswith('{\n  "artifact"')  # indent 2, sorted keys
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_json_converts_numpy_and_non_finite_values(tmp_path):
    report = {"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), "d": (np.int64(2), -np.inf)}
    loaded = json.loads(write_report(tmp_path / "r.json", report).read_text())
    assert loaded == {"a": 0.5, "b": [0, 1, 2], "c": "nan", "d": [2, "-inf"]}


def test_markdown_has_title_reference_table_failures_worst_and_environment(tmp_path):
    text = write_report(tmp_path / "report.md", _report(fail=True)).read_text()
    assert text.startswith("# vexport parity report: FAIL\n")
    assert "Reference: `tiny | model` on torch (cpu, float32)." in text
    assert "Evaluation set: `builtin`: 2 groups, 4 sequences, 17 tokens." in text
    assert "| Metric | Value | Threshold | Result |" in text
    assert "| candidate_nonfinite | 1 | = 0 | FAIL |" in text
    assert "| sqnr_db |" in text and "≥ 60 dB | FAIL |" in text
    assert "| top1_agreement | 1 | ≥ 1 | PASS |" in text
    assert "- candidate has 1 non-finite values (NaN/inf) in 1 sequence(s)" in text
    assert "| opset | 17 |" in text and "| onnxruntime | 1.20.0 |" in text
    worst_row = next(line for line in text.splitlines() if line.startswith("| 1 | 2 | inf |"))
    assert "\\|" in worst_row and worst_row.endswith("… |") and len(worst_row) < 130


def test_markdown_of_a_passing_report(tmp_path):
    text = render_markdown(_report(fail=False))
    assert text.startswith("# vexport parity report: PASS\n")
    assert "## Failures\n\nNone." in text
    assert "FAIL" not in text
    assert text.count("| PASS |") == 8  # two finiteness checks and six metrics with limits
    assert "| max_abs_error |" in text


@pytest.mark.parametrize("name", ["report.txt", "report", "report.htm", "report.json.gz"])
def test_bad_suffix_names_the_flag(tmp_path, name):
    with pytest.raises(VexportError, match=r"--report .*unsupported suffix"):
        write_report(tmp_path / name, _report())
    assert list(tmp_path.iterdir()) == []


def test_suffix_is_case_insensitive_and_parent_folders_are_made(tmp_path):
    path = write_report(tmp_path / "runs" / "a" / "REPORT.MD", _report())
    assert path.read_text().startswith("# vexport parity report")


def test_existing_report_is_replaced_atomically(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_report(path, _report())
    assert json.loads(path.read_text())["seed"] == 0
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_folder_as_report_path_is_an_error(tmp_path):
    folder = tmp_path / "x.json"
    folder.mkdir()
    with pytest.raises(VexportError, match="--report .*folder"):
        write_report(folder, _report())
