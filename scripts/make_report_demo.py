"""The README's parity report: a trained SmolLM2-135M value model, exported three ways, compared in one run.

Builds the value model (needs `pip install 'vexport[trained]'`), exports ONNX float32, ONNX float16 and GPTQ
int4 (a small calibration set, so it runs in minutes on a CPU), runs `vexport.check_many` against the
float32 reference (the reference runs once), writes DOCS/report.html, report.md and report.json, then runs
the browser test (tests/test_report_html.py, headless chromium) on the page, which saves DOCS/report.png.

    python scripts/make_report_demo.py                 # work in runs/report-demo, write docs/
    python scripts/make_report_demo.py --samples 64    # a better GPTQ calibration (slower)

The same comparison from the command line, once the exports exist:

    vexport check runs/report-demo/onnx-fp32 runs/report-demo/onnx-fp16 runs/report-demo/gptq-int4 \\
        --reference runs/report-demo/smollm2-value --report docs/report.html --report docs/report.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BROWSER_TEST = "tests/test_report_html.py::test_report_renders_in_a_real_browser"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/report-demo"), help="folder for the model and exports")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="folder for report.{html,md,json,png}")
    parser.add_argument("--samples", type=int, default=16, help="GPTQ calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="GPTQ tokens per window")
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ group size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model and exports that exist")
    parser.add_argument("--no-screenshot", action="store_true", help="skip the browser test and report.png")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The trained value model and its three exports (kept between runs unless --rebuild)."""
    from vexport.export.gptq import export_gptq
    from vexport.export.onnx import export_onnx
    from vexport.quant.stream import GPTQOptions
    from vexport.trained import make_trained_value_model

    model = args.work / "smollm2-value"
    steps = {
        model: lambda: make_trained_value_model(model),
        args.work / "onnx-fp32": lambda: export_onnx(model, args.work / "onnx-fp32", "float32", force=True),
        args.work / "onnx-fp16": lambda: export_onnx(model, args.work / "onnx-fp16", "float16", force=True),
        args.work / "gptq-int4": lambda: export_gptq(model, args.work / "gptq-int4",
                                                     GPTQOptions(group_size=args.group_size), samples=args.samples,
                                                     seq_len=args.seq_len, seed=args.seed, force=True, progress=True),
    }
    for path, make in steps.items():
        if args.rebuild or not (path / "config.json").is_file():
            start = time.perf_counter()
            make()
            print(f"built {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return model, list(steps)[1:]


def screenshot(html: Path, png: Path) -> int:
    """Run the browser test on HTML; it saves the screenshot to PNG."""
    env = {**os.environ, "VEXPORT_REPORT_HTML": str(html.resolve()), "VEXPORT_REPORT_PNG": str(png.resolve())}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", BROWSER_TEST]
    return subprocess.run(command, cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vexport.checker import check_many
    from vexport.errors import VexportError

    try:
        model, exports = build(args)
        reports = [args.docs / f"report.{suffix}" for suffix in ("html", "md", "json")]
        outcome = check_many(exports, model, report=reports, seed=args.seed, progress=True)
    except VexportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for entry, result in zip(outcome.report["artifacts"], outcome.results):
        print(f"{entry['label']}: {'PASS' if result.passed else 'FAIL'}, SQNR {result.sqnr_db:.1f} dB, "
              f"pairwise {result.pairwise_agreement:.3f}, {entry['scoring']['tokens_per_second'] or 0:.0f} tok/s")
    print("wrote " + ", ".join(map(str, reports)))
    if not args.no_screenshot and screenshot(reports[0], args.docs / "report.png") != 0:
        print("error: the browser test failed (see above); no screenshot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
