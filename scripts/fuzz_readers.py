"""Coverage-guided fuzzing (atheris / libFuzzer) of every reader of outside data, one target per reader.

    python scripts/fuzz_readers.py --seconds 600                 # every target, 10 minutes each
    python scripts/fuzz_readers.py --seconds 60 --targets manifest safetensors

Each target runs in its own process (libFuzzer exits when it is done) with a per-input timeout and an RSS
limit; a VexportError (or a rejected scoring row) is the expected end of a bad input, anything else is a
crash, saved as crash-* in --artifacts. Prints, per target: cases tried, seconds, and the crash if any.
The targets are the ones the hypothesis tests use (tests/fuzz_targets.py). Needs `pip install atheris`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
log = logging.getLogger("fuzz_readers")

TARGETS = ("manifest", "prompt_groups", "calibration", "safetensors", "shard_index", "gptq", "onnx_graph",
           "scoring_row", "scoring_input")
PER_INPUT_TIMEOUT_S = 10
RSS_LIMIT_MB = 3072
MAX_INPUT_BYTES = 4096


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600, help="fuzzing time per target")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"), help="where crashes are saved")
    parser.add_argument("--json", type=Path, help="write the per-target results here")
    parser.add_argument("--run", choices=TARGETS, help=argparse.SUPPRESS)  # the child process
    return parser.parse_known_args(argv)[0]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.run:
        return run_target(args.run, argv)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    results = [fuzz_one(name, args.seconds, args.artifacts) for name in args.targets]
    log.info("%-14s %10s %8s  %s", "target", "cases", "seconds", "result")
    for r in results:
        log.info("%-14s %10s %8.0f  %s", r["target"], r["cases"], r["seconds"], r["result"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["result"] != "no crash" for r in results) else 0


def fuzz_one(name: str, seconds: int, artifacts: Path) -> dict:
    """Run one target in a child process for SECONDS; parse libFuzzer's report."""
    command = [sys.executable, __file__, "--run", name, f"-max_total_time={seconds}",
               f"-timeout={PER_INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={MAX_INPUT_BYTES}",
               f"-artifact_prefix={artifacts.absolute()}/{name}-", "-print_final_stats=1"]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 600)
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output) or re.findall(r"#(\d+)\s", output)
    crash = re.search(r"(Uncaught Python exception: .*|ERROR: libFuzzer: .*|==\d+== ERROR: .*)", output)
    result = "no crash" if done.returncode == 0 else (crash.group(1)[:200] if crash else f"exit {done.returncode}")
    if done.returncode != 0:
        (artifacts / f"{name}.log").write_text(output[-20000:])
    log.info("%s: %s cases in %.0f s: %s", name, runs[-1] if runs else "?", elapsed, result)
    return {"target": name, "cases": int(runs[-1]) if runs else None, "seconds": round(elapsed), "result": result}


def run_target(name: str, argv: list[str]) -> int:
    import atheris

    with atheris.instrument_imports(include=["vexport"]):
        import vexport.backends.onnxrt  # noqa: F401
        import vexport.calibration  # noqa: F401
        import vexport.evalset  # noqa: F401
        import vexport.manifest  # noqa: F401
        import vexport.model  # noqa: F401
        import vexport.quant.pack  # noqa: F401
        import vexport.runtime  # noqa: F401
        import vexport.safety  # noqa: F401
        import vexport.scoring.inputs  # noqa: F401
        import vexport.scoring.rows  # noqa: F401
    one_input = make_target(name, Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-")))
    libfuzzer_args = [sys.argv[0], *(a for a in argv if a.startswith("-") and not a.startswith("--"))]
    atheris.Setup(libfuzzer_args, one_input)
    atheris.Fuzz()
    return 0


def make_target(name: str, base: Path):
    """TestOneInput for NAME: the reader gets the bytes; a VexportError is a good end, anything else a crash."""
    import atheris

    from tests import fuzz_targets as targets
    from vexport.errors import VexportError

    feed = _feeder(name, base, targets, atheris)

    def one_input(data: bytes) -> None:
        try:
            feed(data)
        except VexportError as exc:
            if "\n" in str(exc):
                raise AssertionError(f"a VexportError message spans lines: {str(exc)[:200]!r}") from None

    return one_input


def _feeder(name: str, base: Path, targets, atheris):
    if name == "gptq":
        return lambda data: targets.gptq(_gptq_tensors(atheris.FuzzedDataProvider(data)))
    if name == "shard_index":
        return lambda data: targets.shard_index(base, data.decode("utf-8", "replace"))
    if name == "scoring_row":
        from vexport.tiny import make_tiny_value_model

        tok = targets.tokenizer(make_tiny_value_model(base / "tiny", seed=0))
        return lambda data: targets.scoring_row(tok, data)
    if name == "scoring_input":
        return lambda data: targets.scoring_input(base, data[1:], ".parquet" if data[:1] == b"P" else ".jsonl")
    reader = {"manifest": targets.manifest, "prompt_groups": targets.prompt_groups,
              "calibration": targets.calibration, "safetensors": targets.safetensors,
              "onnx_graph": targets.onnx_graph}[name]
    return lambda data: reader(base, data)


def _gptq_tensors(fdp) -> dict:
    """Four tensors of fuzzer-chosen shapes (up to 3 dims of 0..16), dtypes and values."""
    import torch

    dtypes = (torch.int32, torch.int64, torch.float16, torch.float32, torch.uint8)
    tensors = {}
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        shape = [fdp.ConsumeIntInRange(0, 16) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        dtype = dtypes[fdp.ConsumeIntInRange(0, len(dtypes) - 1)]
        low, high = (0, 255) if dtype == torch.uint8 else (-40, 40)
        tensors[name] = torch.randint(low, high, shape, generator=torch.Generator().manual_seed(
            fdp.ConsumeIntInRange(0, 2**31))).to(dtype)
    return tensors


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
