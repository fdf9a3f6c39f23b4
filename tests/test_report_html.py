"""Comparison reports: vexport.check_many, the JSON schema, the Markdown summary, the HTML page and its plots,
the CLI with several artifacts, and the page opened in a real headless browser (chromium via Playwright).

The browser test also writes the README's screenshot: `scripts/make_report_demo.py` runs it with
VEXPORT_REPORT_HTML (the page to open) and VEXPORT_REPORT_PNG (where to save the screenshot).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import markupsafe
import numpy as np
import pytest

from tests.helpers import run_cli
from vexport import checker
from vexport.errors import VexportError
from vexport.report import render_html, render_markdown, write_report
from vexport.report.figures import figure_data
from vexport.report.json import to_jsonable
from vexport.report.plots import error_by_position_png, error_histogram_png, overview_png, scatter_png
from vexport.report.schema import ReportSchemaError, schema_problems, validate_report
from vexport.report.summary import HEADER

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["onnx-fp32", "onnx-fp16"]
CHROMIUM = os.environ.get("VEXPORT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT_VIEWPORT = {"width": 1440, "height": 1800}
SCREENSHOT_LIMIT = 1_000_000  # bytes: the README's screenshot stays small


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory) -> list[Path]:
    from vexport.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("compare")
    return [export_onnx(tiny_model_dir, root / label, dtype) for label, dtype in zip(LABELS, ("float32", "float16"))]


@pytest.fixture(scope="module")
def comparison(exports, tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """check_many over both exports, counting every load and every reference scoring call."""
    out = tmp_path_factory.mktemp("reports")
    loads: list[str] = []
    reference_calls: list[int] = []

    def counting_load(model, *args, **kwargs):
        loaded = real_load(model, *args, **kwargs)
        loads.append(str(model))
        if str(model) == str(tiny_model_dir):
            values = loaded.values
            loaded.values = lambda *a, **k: reference_calls.append(1) or values(*a, **k)
        return loaded

    real_load = checker.load
    paths = [out / "report.html", out / "report.json", out / "report.md"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checker, "load", counting_load)
        outcome = checker.check_many(exports, tiny_model_dir, report=paths)
    return SimpleNamespace(outcome=outcome, loads=loads, reference_calls=len(reference_calls), html=paths[0],
                           json=paths[1], md=paths[2])


# ------------------------------------------------------------------------------------------ check_many
def test_reference_is_loaded_and_scored_once(comparison, exports, tiny_model_dir):
    assert comparison.loads == [str(tiny_model_dir), *map(str, exports)]
    batches = comparison.outcome.report["reference"]["scoring"]["batches"]
    assert comparison.reference_calls == batches + 1  # every batch once, plus the warm-up sequence


def test_every_artifact_is_compared_on_the_same_tokens(comparison):
    report = comparison.outcome.report
    assert [a["label"] for a in report["artifacts"]] == LABELS
    assert comparison.outcome.passed and report["passed"] is True
    fp32, fp16 = comparison.outcome.results
    assert fp32.sqnr_db > 100 and 30 < fp16.sqnr_db < fp32.sqnr_db
    for entry in report["artifacts"]:
        assert entry["parity"]["num_tokens"] == report["evalset"]["tokens"]
        assert entry["scoring"]["tokens"] == report["evalset"]["tokens"]
        assert entry["scoring"]["tokens_per_second"] > 0 and entry["load_seconds"] > 0
        assert entry["size_bytes"] > 0 and entry["figures"]["tokens"] == report["evalset"]["tokens"]
    assert [a["bits"] for a in report["artifacts"]] == [32, 16]
    assert report["artifacts"][1]["size_bytes"] < report["artifacts"][0]["size_bytes"]


def test_report_states_reference_evalset_seed_and_how_to_repeat(comparison, exports, tiny_model_dir):
    report = comparison.outcome.report
    assert report["reference"]["dtype"] == "float32" and report["reference"]["device"] == "cpu"
    assert report["reference"]["description"] == "torch float32 on CPU"
    assert report["evalset"]["name"] == "builtin" and report["evalset"]["sequences"] == 72
    assert re.fullmatch(r"[0-9a-f]{16}", report["evalset"]["digest"])
    assert report["seed"] == 0 and report["environment"]["device"].startswith("cpu: ")
    assert {"torch", "onnxruntime", "transformers", "python", "numpy"} <= set(report["environment"])
    assert report["command"] == (f"vexport check {exports[0]} {exports[1]} --reference {tiny_model_dir} "
                                 "--device cpu --batch-tokens 4096 --seed 0")


def test_worst_rows_carry_text_position_and_group_order(comparison):
    worst = comparison.outcome.report["artifacts"][1]["worst"]
    assert len(worst) == checker.WORST_K
    errors = [w["max_abs_error"] for w in worst]
    assert errors == sorted(errors, reverse=True)
    for row in worst:
        assert "<|assistant|>" in row["text"] and 0 <= row["position"] < row["tokens"]
        assert isinstance(row["group_order_kept"], bool)


def test_each_manifest_records_its_parity(comparison, exports):
    for path, result in zip(exports, comparison.outcome.results):
        parity = json.loads((path / "manifest.json").read_text())["parity"]
        assert parity["passed"] is True and parity["sqnr_db"] == pytest.approx(result.sqnr_db)
        assert parity["reference"]["dtype"] == "float32"


def test_labels_are_unique():
    assert checker.artifact_labels(["a/x", "b/x", "c/y", "x"]) == ["x", "x #2", "y", "x #3"]


def test_bad_report_suffix_fails_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(VexportError, match="--report .*unsupported suffix"):
        checker.check_many([tmp_path / "does-not-matter"], tiny_model_dir, report=tmp_path / "r.pdf")
    with pytest.raises(VexportError, match="at least one artifact"):
        checker.check_many([], tiny_model_dir)


# ---------------------------------------------------------------------------------------------- schema
def test_json_report_validates_against_the_schema(comparison):
    data = json.loads(comparison.json.read_text())
    assert schema_problems(data) == []
    assert data == json.loads(json.dumps(data))  # nothing but JSON
    for entry in data["artifacts"]:
        assert set(entry["parity"]["thresholds"]) >= {"min_sqnr_db", "min_pearson", "min_top1_agreement"}


@pytest.mark.parametrize("path", [
    ("artifacts", 0, "parity", "sqnr_db"),
    ("artifacts", 1, "parity", "spearman"),
    ("artifacts", 0, "parity", "thresholds", "min_pairwise_agreement"),
    ("artifacts", 0, "scoring", "tokens_per_second"),
    ("artifacts", 1, "load_seconds"),
    ("artifacts", 1, "size_bytes"),
    ("artifacts", 0, "figures", "scatter"),
    ("artifacts", 1, "figures", "error_by_position", "p95_abs_error"),
    ("environment", "device"),
    ("reference", "dtype"),
    ("evalset", "digest"),
    ("seed",),
])
def test_schema_fails_when_a_figure_is_missing(comparison, path):
    data = json.loads(comparison.json.read_text())
    holder = data
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    with pytest.raises(ReportSchemaError, match=re.escape(repr(path[-1]))):
        validate_report(data)


def test_schema_lists_every_problem(comparison):
    data = json.loads(comparison.json.read_text())
    del data["artifacts"][0]["parity"]["pearson"]
    data["artifacts"][1]["parity"]["sqnr_db"] = "loud"
    problems = schema_problems(data)
    assert len(problems) >= 2
    assert any(p.startswith("artifacts/0/parity") and "'pearson'" in p for p in problems)
    assert any(p.startswith("artifacts/1/parity/sqnr_db") for p in problems)


def test_one_artifact_report_validates_too(exports, tiny_model_dir, tmp_path):
    outcome = checker.check(exports[0], tiny_model_dir, report=[tmp_path / "r.json", tmp_path / "r.html"],
                            record=False)
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == {"vexport_version", "created", "artifact", "reference", "evalset", "seed", "environment",
                         "parity", "worst"}
    assert data == to_jsonable(outcome.report) and data["parity"]["passed"] is True
    assert schema_problems(data) == []
    page = (tmp_path / "r.html").read_text()
    assert page.count("<img ") == 1 + 3 and "onnx-fp32" in page


# -------------------------------------------------------------------------------------------- markdown
def test_markdown_has_the_summary_table(comparison):
    text = comparison.md.read_text()
    assert text.startswith("# vexport parity comparison: PASS (2 artifacts)\n")
    assert "| " + " | ".join(HEADER) + " |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("| PASS |")]
    assert [row.split(" | ")[0][2:] for row in rows] == LABELS
    assert "| reference: " in text and "torch float32 on CPU" in text
    assert "--seed 0" in text and "## Thresholds" in text and "| device | cpu: " in text


# ------------------------------------------------------------------------------------------------ html
def _images(page: str) -> list[bytes]:
    return [base64.b64decode(uri) for uri in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)]


def test_html_is_self_contained_with_every_plot(comparison):
    page = comparison.html.read_text()
    images = _images(page)
    assert page.count("<img ") == len(images) == 1 + 3 * len(LABELS)
    assert all(png.startswith(PNG_SIGNATURE) and len(png) > 5000 for png in images)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page and "<script" not in page
    assert page.count('<tr class="artifact">') == len(LABELS) and page.count('<tr class="reference">') == 1
    assert 'id="verdict">PASS<' in page


def test_html_shows_worst_prompts_escaped(comparison):
    page = comparison.html.read_text()
    worst = comparison.outcome.report["artifacts"][0]["worst"][0]
    assert str(markupsafe.escape(worst["text"])) in page  # as Jinja's autoescape writes it (quotes too)
    assert "&lt;|user|&gt;" in page


def test_html_marks_a_failing_artifact_and_escapes_text(comparison):
    data = json.loads(comparison.json.read_text())
    entry = data["artifacts"][1]
    sqnr = next(c for c in entry["parity"]["checks"] if c["metric"] == "sqnr_db")
    sqnr.update(status="fail", message="sqnr_db 1 is below min_sqnr_db 30")
    entry["parity"].update(passed=False, failures=[sqnr["message"]])
    data["passed"] = False
    entry["worst"][0]["text"] = "<script>alert(1)</script>"
    page = render_html(data)
    assert 'id="verdict">FAIL<' in page and "failing: onnx-fp16" in page
    assert page.count('class="num fail"') == 1 and "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    text = render_markdown(data)
    assert "dB ✗" in text and "- onnx-fp16: sqnr_db 1 is below min_sqnr_db 30" in text


def test_html_is_redrawn_from_the_json_alone(comparison, tmp_path):
    data = json.loads(comparison.json.read_text())
    page = write_report(tmp_path / "again.html", data).read_text()
    assert len(_images(page)) == 1 + 3 * len(LABELS)


def test_html_needs_a_comparison_report(tmp_path):
    with pytest.raises(VexportError, match="comparison report"):
        write_report(tmp_path / "r.html", {"parity": {}, "artifact": {}})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- figures/plots
def test_figure_data_samples_bins_and_skips_nonfinite():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=n) for n in (300, 40, 7)]
    cand = [r + 0.01 * np.arange(len(r)) for r in ref]  # error grows along the sequence
    cand[1][3] = np.nan
    data = figure_data(ref, cand, seed=1, scatter_points=100)
    assert data["tokens"] == 346 and data["nonfinite_tokens"] == 1
    assert data["scatter"]["sampled"] == 100 and data["scatter"]["of"] == 346
    assert data == figure_data(ref, cand, seed=1, scatter_points=100)  # the seed fixes the sample
    assert sum(data["error_histogram"]["counts"]) == 346
    by_position = data["error_by_position"]
    assert sum(by_position["tokens"]) == 346 and by_position["start"][0] == 0
    assert by_position["mean_abs_error"][-1] > 10 * by_position["mean_abs_error"][0]
    assert all(a <= b <= c for a, b, c in zip(by_position["mean_abs_error"], by_position["p95_abs_error"],
                                             by_position["max_abs_error"]))


@pytest.mark.parametrize("error", [0.0, 1e-7, 0.3])
def test_plots_draw_identical_tiny_and_large_errors(error):
    ref = [np.linspace(-1, 1, 50), np.linspace(0, 2, 20)]
    data = figure_data(ref, [r + error for r in ref], seed=0)
    pngs = [scatter_png(data["scatter"], "x"), error_histogram_png(data["error_histogram"], "x"),
            error_by_position_png(data["error_by_position"], "x")]
    sqnr = "inf" if error == 0 else 20.0
    pngs.append(overview_png([{"label": "x", "parity": {"sqnr_db": sqnr}, "figures": data}]))
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE)
        width, height = struct.unpack(">II", png[16:24])
        assert width > 300 and height > 200


# ------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_compares_several_artifacts(exports, tiny_model_dir, tmp_path):
    result = run_cli("check", *exports, "--reference", tiny_model_dir, "--report", tmp_path / "r.html",
                     "--report", tmp_path / "r.md", "--seed", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(label in result.stdout for label in LABELS) and "PASS" in result.stdout
    assert "seed 3" in result.stdout
    assert (tmp_path / "r.html").read_text().count("<img ") == 7
    assert "--seed 3" in (tmp_path / "r.md").read_text()


@pytest.mark.slow
def test_cli_exit_1_when_any_artifact_fails(exports, tiny_model_dir, tmp_path):
    result = run_cli("check", *exports, "--reference", tiny_model_dir, "--threshold", "min_sqnr_db=100",
                     "--report", tmp_path / "r.json")
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert [a["parity"]["passed"] for a in data["artifacts"]] == [True, False]
    assert data["threshold_overrides"] == {"min_sqnr_db": 100.0} and "onnx-fp16: sqnr_db" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing", "suffix"])
def test_cli_bad_input_exit_2_before_scoring(exports, tiny_model_dir, tmp_path, problem):
    extra = [tmp_path / "nope"] if problem == "missing" else []
    report = tmp_path / ("r.json" if problem == "missing" else "r.pdf")
    result = run_cli("check", *exports, *extra, "--reference", tiny_model_dir, "--report", report)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("nope" if problem == "missing" else "--report") in result.stderr
    assert "scoring" not in result.stderr and not report.exists()


# --------------------------------------------------------------------------------------------- browser
def _browser_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install playwright)")
    chromium = Path(CHROMIUM)
    if not chromium.is_file() and not shutil.which("chromium"):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_api, str(chromium if chromium.is_file() else shutil.which("chromium"))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return struct.unpack(">II", data[16:24])


def test_report_renders_in_a_real_browser(request, tmp_path):
    """Open the page in headless chromium with the network cut: the table and every image must render."""
    sync_api, chromium = _browser_or_skip()
    page_path = Path(os.environ.get("VEXPORT_REPORT_HTML") or request.getfixturevalue("comparison").html)
    screenshot = Path(os.environ.get("VEXPORT_REPORT_PNG") or tmp_path / "report.png")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            seen = _open_and_inspect(browser, page_path, screenshot)
        finally:
            browser.close()
    artifacts = seen["rows"] - 1
    assert artifacts >= 1 and seen["headers"] == list(HEADER)
    assert seen["table_width"] > 600 and seen["first_cells"][0].startswith("reference: ")
    assert len(seen["images"]) == 1 + 3 * artifacts
    for image in seen["images"]:
        assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image
        assert image["shownWidth"] > 100, image
    assert seen["external_requests"] == [] and seen["errors"] == []
    assert _png_size(screenshot) == (SCREENSHOT_VIEWPORT["width"], SCREENSHOT_VIEWPORT["height"])
    assert screenshot.stat().st_size < SCREENSHOT_LIMIT


def _open_and_inspect(browser, page_path: Path, screenshot: Path) -> dict:
    page = browser.new_page(viewport=SCREENSHOT_VIEWPORT)
    external: list[str] = []
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.route(re.compile(r"^(https?|wss?|ftp)://"), lambda route: (external.append(route.request.url), route.abort()))
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    seen = page.evaluate("""() => ({
        rows: document.querySelectorAll('table#summary tbody tr').length,
        headers: Array.from(document.querySelectorAll('table#summary thead th')).map(th => th.innerText.trim()),
        first_cells: Array.from(document.querySelectorAll('table#summary tbody tr td:first-child'))
                          .map(td => td.innerText.trim()),
        table_width: document.querySelector('table#summary').getBoundingClientRect().width,
        images: Array.from(document.images).map(i => ({complete: i.complete, naturalWidth: i.naturalWidth,
                      naturalHeight: i.naturalHeight, shownWidth: i.getBoundingClientRect().width, alt: i.alt})),
    })""")
    page.screenshot(path=str(screenshot))
    return {**seen, "external_requests": external, "errors": errors}
