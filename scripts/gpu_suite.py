"""The GPU half of vexport in one prepared command: tests, parity and benchmarks on a lent CUDA machine.

    python scripts/gpu_suite.py --wheels gpu_wheels          # here, with network: the wheels the image lacks
    python scripts/gpu_suite.py --out DIR [--budget-s 420] [--quick]      # there: CUDA, no network

Steps run in order of value, each in its own process group with its own time limit (cut to what is left of
the budget; a step that no longer fits is skipped, and says so). After every step DIR/gpu_results.json
(every figure, the device, driver and library versions, each step's status and wall time) and
DIR/gpu_results.md (the tables, as they go into the README) are rewritten, so what ran is kept even if the
machine is taken back mid-run. Each stays under 1 MB; models and logs live in a work folder outside DIR.

- ``--plan [--json]``: the steps, their limits and commands, what they cover, and what is left out and why
  (CI checks that every gpu-marked test and every CUDA benchmark is in it: tests/test_gpu_suite.py).
- ``--smoke``: every step's code path on tiny shapes with no GPU (``CUDA_VISIBLE_DEVICES=""``,
  ``TRITON_INTERPRET=1``): correctness only, no timing claims.
- ``--env-check [--json]``: the packages vexport needs that are missing here, and what CUDA this machine has.
- ``--wheels DIR [--dry-run]``: pip-download for Python 3.12 manylinux x86-64 the wheels of vexport's
  requirements that the GPU image lacks (IMAGE_PACKAGES), with DIR/requirements.txt; under 64 MB in all.

Internal: ``--step NAME --work W --json F`` runs one of the suite's own steps (models, parity, gptq_layers).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 420
MIN_STEP_S = 15  # a step with less than this (or its own limit) left in the budget is skipped
SMOKE_LIMIT_S = 150  # every step's limit in --smoke: a safety net on a busy CPU, not a measurement
RESULT_LIMIT = 1_000_000  # bytes, each of gpu_results.json / .md
WHEELS_LIMIT = 64 * 2**20
LOG_TAIL = 4000  # characters of a step's output kept in the JSON

# The GPU image: the one list of what it already has (the named packages and what they pull in).
IMAGE_PACKAGES = frozenset({
    "torch", "triton", "transformers", "onnx", "onnxruntime",
    "typer", "rich", "jinja2", "pyarrow", "matplotlib", "scipy", "safetensors", "tokenizers", "psutil", "pytest",
    # their own requirements (torch, transformers, matplotlib, pytest ...), present wherever they are
    "numpy", "huggingface-hub", "packaging", "typing-extensions", "filelock", "fsspec", "pyyaml", "regex",
    "tqdm", "requests", "markupsafe", "sympy", "networkx", "protobuf", "click", "pygments", "pluggy", "iniconfig",
})
WHEEL_TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64"]

# CUDA code the suite deliberately does not run, with the reason (tests/test_gpu_suite.py keeps this honest).
EXCLUDED = {
    "scripts/bench_tensorrt.py": "needs TensorRT, which the GPU image lacks",
    "scripts/bench_onnx_cpu.py": "its --cuda comparison needs onnxruntime-gpu; the image has the CPU build only",
    "scripts/bench_quant_memory.py": "host memory (RSS) of GPTQ export; the gptq_layers step measures GPTQ on "
                                     "CUDA itself (seconds per layer, peak GPU memory)",
    "scripts/bench_mcts.py": "needs the reference ppo_mcts.py in its own transformers 4.41 venv, which the image "
                             "lacks; 'cuda' there is only the shim that runs the reference's CUDA tensors on CPU",
}
SMOL_SHAPE = {"hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536,
              "max_position_embeddings": 2048}  # SmolLM2-135M's shape (the trained weights cannot be carried)
SHAPE_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_heads": 40}


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    limit_s: int
    argv: tuple[str, ...]
    covers: tuple[str, ...] = ()  # repository files the step runs (scripts, test files)
    needs: tuple[str, ...] = ()  # steps that must have passed first
    figures: str | None = None  # the JSON file the command writes its figures to
    junit: str | None = None  # the pytest JUnit XML of a test step
    absent: str | None = None  # why the step cannot run here (its script does not exist yet)


@dataclass
class Outcome:
    name: str
    title: str
    limit_s: int
    command: str
    status: str = "pending"  # ok | failed | timeout | skipped | interrupted | pending | running
    wall_s: float = 0.0
    returncode: int | None = None
    cpu_s: float | None = None  # CPU seconds of a forked (--smoke) step
    note: str = ""
    figures: dict = field(default_factory=dict)
    tests: dict = field(default_factory=dict)
    log_tail: str = ""


# ------------------------------------------------------------------------------------------------ the plan
def gpu_tests(root: Path = REPO) -> list[str]:
    """``file::test`` of every gpu-marked test function (module ``pytestmark`` or decorator), from the AST."""
    found = []
    for path in sorted((root / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_gpu = any(isinstance(node, ast.Assign) and _marks_gpu(node.value)
                         and any(getattr(t, "id", "") == "pytestmark" for t in node.targets) for node in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if module_gpu or any(_marks_gpu(d) for d in node.decorator_list):
                    found.append(f"{path.relative_to(root)}::{node.name}")
    return found


def _marks_gpu(node: ast.AST) -> bool:
    """Whether NODE is (or lists, or calls) ``pytest.mark.gpu``."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_marks_gpu(e) for e in node.elts)
    if isinstance(node, ast.Call):
        return _marks_gpu(node.func)
    return isinstance(node, ast.Attribute) and node.attr == "gpu" and getattr(node.value, "attr", "") == "mark"


def plan(mode: str, work: Path) -> list[Step]:
    """The steps in order of value for MODE (full, quick or smoke); WORK holds models, figures and logs."""
    py, fig = sys.executable, work / "figures"
    test_files = sorted({t.split("::")[0] for t in gpu_tests()})
    own = [py, "scripts/gpu_suite.py", "--work", str(work)] + ([f"--{mode}"] if mode != "full" else [])
    quick, smoke = mode == "quick", mode == "smoke"

    def bench(name: str, *args: str) -> tuple[str, ...]:
        return (py, f"scripts/{name}", *args, "--json", str(fig / f"{name[6:-3]}.json"), *(["--smoke"] * smoke))

    steps = [
        Step("models", "value models for the parity and decoding steps", 20,
             (*own, "--step", "models", "--json", str(fig / "models.json")), ("scripts/make_tiny_value_model.py",),
             figures=str(fig / "models.json")),
        Step("gpu_tests", "gpu-marked tests (pytest -m gpu)", 90,
             (py, "-m", "pytest", "-o", "addopts=", "-p", "no:xdist",  # serial, and no xdist needed on the image
              "-m", "gpu", "-v", "-rA", "--durations=15", "-p", "no:cacheprovider",
              f"--junitxml={work / 'gpu_tests.xml'}", *test_files), tuple(test_files),
             junit=str(work / "gpu_tests.xml")),
        Step("parity", "parity on CUDA: fp16 vs fp32 reference, GPTQ int4 vs fp16 reference", 60,
             (*own, "--step", "parity", "--json", str(fig / "parity.json")), needs=("models",),
             figures=str(fig / "parity.json")),
        Step("int4_matmul", "int4 Triton matmul vs fp16 F.linear, 13B shapes", 40,
             bench("bench_int4_matmul.py", *(["--tokens", "1", "16", "4096"] * quick)),
             ("scripts/bench_int4_matmul.py",),
             figures=str(fig / "int4_matmul.json")),
        Step("value_head", "fused value head vs HF norm + linear, hidden 5120", 25,
             bench("bench_value_head.py", *(["--tokens", "1", "16384"] * quick)), ("scripts/bench_value_head.py",),
             figures=str(fig / "value_head.json")),
        Step("scoring_cuda", "whole-model scoring, 13B-sized layers: vexport vs HF eager fp16", 75,
             bench("bench_scoring_cuda.py", "--layers", "2" if quick else "4", "--workdir", str(work),
                   *(["--mixed", "32", "--repeats", "2"] * quick)), ("scripts/bench_scoring_cuda.py",),
             figures=str(fig / "scoring_cuda.json")),
        Step("gptq_layers", "GPTQ of 13B-sized layers on CUDA (quant/stream.py)", 60,
             (*own, "--step", "gptq_layers", "--json", str(fig / "gptq_layers.json")), ("vexport/quant/stream.py",),
             figures=str(fig / "gptq_layers.json")),
        Step("decoding", "value-guided decoding and best-of-n on CUDA (SmolLM2-shaped model)", 30,
             bench("bench_decoding.py", "--model", str(work / "models" / ("tiny" if smoke else "smol")),
                   "--device", "cpu" if smoke else "cuda", *(["--repeats", "2", "--step-repeats", "1"] * quick)),
             ("scripts/bench_decoding.py",), needs=("models",), figures=str(fig / "decoding.json")),
        _serve_step(bench, fig, smoke),
    ]
    return [replace(s, limit_s=SMOKE_LIMIT_S) for s in steps] if smoke else steps


def _serve_step(bench, fig: Path, smoke: bool) -> Step:
    script = "scripts/bench_serve.py"
    absent = None if (REPO / script).is_file() else f"{script} does not exist yet"
    argv = bench("bench_serve.py", *([] if smoke else ["--device", "cuda"]))
    return Step("serve", "value server load test", 20, argv, (script,), needs=("models",),
                figures=str(fig / "serve.json"), absent=absent)


def plan_document(mode: str, work: Path, budget_s: int) -> dict:
    steps = plan(mode, work)
    return {"mode": mode, "budget_s": budget_s, "total_limit_s": sum(s.limit_s for s in steps if not s.absent),
            "steps": [asdict(s) for s in steps], "gpu_tests": gpu_tests(), "excluded": EXCLUDED}


def print_plan(doc: dict) -> None:
    print(f"mode {doc['mode']}: {len(doc['steps'])} steps, limits {doc['total_limit_s']} s "
          f"of a {doc['budget_s']} s budget")
    for s in doc["steps"]:
        state = f" (skipped: {s['absent']})" if s["absent"] else ""
        print(f"  {s['name']:<13} {s['limit_s']:>4} s  {s['title']}{state}\n      {' '.join(s['argv'])}")
    print(f"  gpu-marked tests: {len(doc['gpu_tests'])}")
    for path, why in doc["excluded"].items():
        print(f"  excluded {path}: {why}")


# ------------------------------------------------------------------------------------------ running steps
def run_steps(steps: list[Step], budget_s: float, jobs: int, env: dict, logs: Path, record,
              fork: bool = False) -> list[Outcome]:
    """Run STEPS (at most JOBS at once; 1 for timings) within BUDGET_S; RECORD(outcomes) before the first and
    after each one. With FORK each step runs in a fork of this process (imports done) instead of a new one."""
    run = _Run(list(steps), time.monotonic() + budget_s, jobs, env, logs, record, _fork if fork else _start)
    run.outcomes = {s.name: Outcome(s.name, s.title, s.limit_s, " ".join(s.argv)) for s in steps}
    record(list(run.outcomes.values()))
    try:
        while run.pending or run.running:
            run.start_ready()
            run.reap()
            time.sleep(0.1)
    finally:  # interrupted (SIGTERM, Ctrl-C): no step outlives the suite, and the results say so
        for name, running in run.running.items():
            _kill_group(running.popen)
            run.outcomes[name].status, run.outcomes[name].note = "interrupted", "the suite was stopped"
        if run.running:
            record(list(run.outcomes.values()))
    return list(run.outcomes.values())


@dataclass
class _Run:
    """One suite run: the steps not started yet, those running, every outcome so far."""

    pending: list[Step]
    deadline: float
    jobs: int
    env: dict
    logs: Path
    record: Callable[[list[Outcome]], None]
    start: Callable[..., _Running]
    running: dict[str, _Running] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    steps: dict[str, Step] = field(default_factory=dict)

    def start_ready(self) -> None:
        """Start (or skip, with the reason) the steps whose needs are settled, up to JOBS at once."""
        for step in list(self.pending):
            if len(self.running) >= self.jobs:
                return
            if any(self.outcomes[n].status in ("pending", "running") for n in step.needs):
                continue
            self.pending.remove(step)
            self.steps[step.name] = step
            outcome = self.outcomes[step.name]
            outcome.note = _skip_reason(step, self.outcomes, self.deadline - time.monotonic())
            if outcome.note:
                outcome.status = "skipped"
                self.record(list(self.outcomes.values()))
                continue
            timeout_s = min(step.limit_s, self.deadline - time.monotonic())
            self.running[step.name] = self.start(step, self.env, self.logs, timeout_s)
            outcome.status = "running"

    def reap(self) -> None:
        for name, running in list(self.running.items()):
            if _finished(running, self.outcomes[name]):
                del self.running[name]
                _collect(self.steps[name], self.outcomes[name], running)
                self.record(list(self.outcomes.values()))


def _skip_reason(step: Step, outcomes: dict[str, Outcome], left_s: float) -> str:
    if step.absent:
        return step.absent
    failed = [n for n in step.needs if outcomes[n].status != "ok"]
    if failed:
        return f"needs {', '.join(failed)}, which did not pass"
    if left_s < min(step.limit_s, MIN_STEP_S):
        return f"budget spent ({left_s:.0f} s left)"
    return ""


@dataclass
class _Running:
    popen: subprocess.Popen | _Forked
    log: Path
    started: float
    timeout_s: float


def _start(step: Step, env: dict, logs: Path, timeout_s: float) -> _Running:
    log = logs / f"{step.name}.log"
    if step.figures:
        Path(step.figures).unlink(missing_ok=True)
    with log.open("wb") as fh:  # the child keeps its own descriptor
        popen = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return _Running(popen, log, time.monotonic(), timeout_s)


class _Forked:
    """The part of ``subprocess.Popen`` the runner uses, for a forked child."""

    def __init__(self, pid: int):
        self.pid, self.returncode, self.cpu_s = pid, None, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.cpu_s = round(usage.ru_utime + usage.ru_stime, 2)
        return self.returncode

    def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode


PRELOAD = ("torch", "triton", "transformers", "transformers.models.llama.modeling_llama", "onnx", "onnxruntime",
           "pytest", "vexport.runtime", "vexport.checker", "vexport.export.gptq", "vexport.export.onnx",
           "vexport.backends.cuda_scoring", "vexport.backends.gptq", "vexport.decoding", "vexport.tiny")


def preload() -> None:
    """Import what every step imports, once, before forking them (--smoke: about 5 s of imports a step on a
    CPU). TRITON_INTERPRET must already be set."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def _fork(step: Step, env: dict, logs: Path, timeout_s: float) -> _Running:
    """Run STEP's command line in a forked child: ``-m pytest`` through pytest.main, a script through runpy."""
    log = logs / f"{step.name}.log"
    if step.figures:
        Path(step.figures).unlink(missing_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Running(_Forked(pid), log, time.monotonic(), timeout_s)
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.chdir(REPO)
        os.environ.clear()
        os.environ.update(env)
        code = _run_command(list(step.argv[1:]))
    except SystemExit as exc:  # what the interpreter would do with it
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child reports everything in its log and exits
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def _run_command(args: list[str]) -> int:
    import runpy

    if args[:2] == ["-m", "pytest"]:
        import pytest

        sys.path.insert(0, os.getcwd())  # as `python -m` does
        return int(pytest.main(args[2:]))
    sys.argv = args
    sys.path.insert(0, str(REPO / Path(args[0]).parent))
    runpy.run_path(args[0], run_name="__main__")
    return 0


def _finished(run: _Running, outcome: Outcome) -> bool:
    """Poll RUN; past its timeout, end its whole process group (TERM, then KILL)."""
    if run.popen.poll() is not None:
        outcome.status = "ok" if run.popen.returncode == 0 else "failed"
    elif time.monotonic() - run.started > run.timeout_s:
        _kill_group(run.popen)
        outcome.status, outcome.note = "timeout", f"stopped after {run.timeout_s:.0f} s"
    else:
        return False
    outcome.returncode, outcome.wall_s = run.popen.returncode, round(time.monotonic() - run.started, 2)
    outcome.cpu_s = getattr(run.popen, "cpu_s", None)
    return True


def _kill_group(popen: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            popen.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _collect(step: Step, outcome: Outcome, run: _Running) -> None:
    text = run.log.read_text(encoding="utf-8", errors="replace")
    outcome.log_tail = text[-LOG_TAIL:]
    if step.figures and Path(step.figures).is_file() and Path(step.figures).stat().st_size < RESULT_LIMIT // 4:
        outcome.figures = json.loads(Path(step.figures).read_text())
    if step.junit and Path(step.junit).is_file():
        outcome.tests = junit_summary(Path(step.junit))
    elif step.junit:  # cut short: pytest writes its XML at the end, but -v printed each finished test
        outcome.tests = {**log_summary(text), "note": "from the log: pytest did not finish"}
    if step.junit and outcome.status == "failed" and not (outcome.tests["failed"] or outcome.tests["errors"]):
        outcome.note = "pytest failed without a failing test (collection? see the log tail)"


def junit_summary(path: Path) -> dict:
    """Counts and one line per test case (id, outcome, message) from pytest's JUnit XML."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
        module = case.get("classname", "").replace(".", "/")
        cases.append({"id": f"{module}.py::{case.get('name')}", "outcome": outcome, "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "errors", "skipped")}
    return {**counts, "cases": cases}


def log_summary(text: str) -> dict:
    """The finished tests of a cut-short ``pytest -v`` run, from its ``file::test OUTCOME`` lines."""
    outcomes = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    line = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)(?: \((.*)\))?(?:\s+\[\s*\d+%\])?$", re.M)
    cases = [{"id": m[1], "outcome": outcomes[m[2]], "message": (m[3] or "")[:200]} for m in line.finditer(text)]
    counts = {k: sum(c["outcome"] == k for c in cases) for k in outcomes.values()}
    return {**counts, "cases": cases}


# ---------------------------------------------------------------------------------------------- results
def environment() -> dict:
    """Device, driver and library versions (CUDA facts only where a GPU is visible)."""
    import platform

    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           **{name: _version(name) for name in ("torch", "triton", "transformers", "onnx", "onnxruntime", "vexport")},
           "missing_packages": [m["requirement"] for m in missing_packages()]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_GB=round(props.total_memory / 1e9, 1), driver=_driver_version())
    else:
        env["device"] = "cpu (no CUDA device visible)"
    return env


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def write_results(out: Path, header: dict, outcomes: list[Outcome]) -> None:
    """DIR/gpu_results.json and .md, each kept under 1 MB (log tails, then figures, are dropped if needed)."""
    doc = {**header, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "steps": [asdict(o) for o in outcomes]}
    text = json.dumps(doc, indent=1, default=str)
    for key in ("log_tail", "figures"):
        if len(text.encode()) < RESULT_LIMIT:
            break
        for step in doc["steps"]:
            step[key] = {"dropped": "gpu_results.json would be over 1 MB"} if key == "figures" else ""
        text = json.dumps(doc, indent=1, default=str)
    _replace(out / "gpu_results.json", text)
    _replace(out / "gpu_results.md", markdown(doc)[: RESULT_LIMIT - 100])


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"### GPU suite on {env.get('device')} ({doc['mode']} run)", "",
             f"driver {env.get('driver', '-')}, CUDA {env.get('torch_cuda')}, torch {env.get('torch')}, triton "
             f"{env.get('triton')}, transformers {env.get('transformers')}, onnxruntime {env.get('onnxruntime')}; "
             f"budget {doc['budget_s']} s; {doc['updated']}", ""]
    if doc["mode"] == "smoke":
        lines += ["Smoke run (tiny shapes, no GPU): code paths and correctness only, no timing claims.", ""]
    lines += ["| step | status | wall s | limit s | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {s['limit_s']} | {_cell(s['note'])} |"
              for s in doc["steps"]]
    for step in doc["steps"]:
        lines += _step_markdown(step)
    return "\n".join(lines) + "\n"


def _step_markdown(step: dict) -> list[str]:
    if step["tests"]:
        t = step["tests"]
        head = [f"#### {step['title']}", "", f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                f"{t['skipped']} skipped", "", "| test | outcome | message |", "|---|---|---|"]
        return [*head, *(f"| {c['id']} | {c['outcome']} | {_cell(c['message'])} |" for c in t["cases"]), ""]
    figures = step["figures"]
    if not figures or "dropped" in figures:
        return []
    lines = [f"#### {step['title']}", ""]
    scalars = {k: v for k, v in _flatten(figures).items() if not k.startswith("rows")}
    if scalars:
        lines += ["| figure | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in scalars.items()), ""]
    rows = figures.get("rows") or []
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines.append("")
    return lines


def _flatten(value: dict, prefix: str = "") -> dict:
    """Scalar leaves of nested dicts as ``a.b`` keys (lists are left out: they are the per-run details)."""
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flatten(item, f"{prefix}{key}."))
        elif not isinstance(item, list):
            out[f"{prefix}{key}"] = item
    return out


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:300]


# ------------------------------------------------------------------------------ the suite's own steps
def step_models(work: Path, mode: str) -> dict:
    """The tiny model and a random model of SmolLM2-135M's shape (a tiny GQA one in smoke)."""
    from vexport.tiny import make_tiny_value_model

    smol = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2} if mode == "smoke" else SMOL_SHAPE
    built = {}
    for name, shape in (("tiny", {}), ("smol", smol)):
        start = time.perf_counter()
        make_tiny_value_model(work / "models" / name, seed=0, **shape)
        built[name] = {"seconds": time.perf_counter() - start, **shape}
    return {"models": built, "script_equivalent": "scripts/make_tiny_value_model.py DIR --hidden-size 576 --layers 30 "
            "--heads 9 --kv-heads 3 --intermediate-size 1536 --max-positions 2048"}


def step_parity(work: Path, mode: str) -> dict:
    """fp16 vs fp32 reference and GPTQ int4 vs the fp16 reference (as shipped, and Triton at every size), on
    the built-in evaluation set (smoke: the tiny model only, two small prompt groups)."""
    import torch

    from vexport.export.gptq import export_gptq

    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples, seq_len = (4, 32) if mode == "smoke" else (32 if mode == "quick" else 64, 512)
    prompts = _smoke_prompts(work) if mode == "smoke" else None
    rows = []
    for name in ("tiny",) if mode == "smoke" else ("tiny", "smol"):  # the same code for both
        folder = work / "models" / name
        rows.append(_half_vs_float(folder, name, device, prompts))
        start = time.perf_counter()
        gptq = export_gptq(folder, work / f"gptq-{name}", samples=samples, seq_len=seq_len, device=device, force=True)
        export_s = time.perf_counter() - start
        rows.append(_int4_row(gptq, folder, name, device, prompts, "shipped", export_s))
        if device == "cuda":
            rows.append(_int4_row(gptq, folder, name, device, prompts, "triton_everywhere", export_s))
    return {"device": device, "calibration": f"{samples} x {seq_len}", "evalset": str(prompts or "builtin"),
            "rows": rows, "all_passed": all(r["passed"] for r in rows)}


def _smoke_prompts(work: Path) -> Path:
    path = work / "smoke_prompts.jsonl"
    groups = [{"prompt": "Name a primary colour.", "responses": ["Red.", "Maybe green?", "Seven.", "No."]},
              {"prompt": "What is 2 + 2?", "responses": ["4", "About 4.", "5", "I will not say."]}]
    path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    return path


def _half_vs_float(folder: Path, name: str, device: str, prompts: Path | None) -> dict:
    from vexport.batching import pad_id_of, plan_batches
    from vexport.checker import score
    from vexport.evalset import builtin_prompt_groups, encode_groups, read_prompt_groups
    from vexport.parity import compare, thresholds_for
    from vexport.runtime import load

    ref, half = load(folder, device=device, dtype="float32"), load(folder, device=device, dtype="float16")
    samples = encode_groups(ref.tokenizer, read_prompt_groups(prompts) if prompts else builtin_prompt_groups())
    batches = plan_batches([len(s.input_ids) for s in samples], 4096)
    ref_values, half_values = (score(m, samples, batches, pad_id_of(ref)).values for m in (ref, half))
    result = compare(ref_values, half_values, [s.group for s in samples], thresholds_for("torch", "float16"))
    return _parity_row(name, "torch fp16 vs fp32 reference", result)


def _int4_row(gptq: Path, folder: Path, name: str, device: str, prompts: Path | None, path: str,
              export_s: float) -> dict:
    """`vexport check` of the GPTQ artifact; ``triton_everywhere`` lifts the row limit of the Triton path."""
    import vexport.backends.gptq as gptq_backend
    from vexport.checker import check

    limit = gptq_backend.TRITON_MAX_TOKENS
    if path == "triton_everywhere":
        gptq_backend.TRITON_MAX_TOKENS = 1 << 40
    try:
        outcome = check(gptq, folder, prompts=prompts, device=device, record=False)
    finally:
        gptq_backend.TRITON_MAX_TOKENS = limit
    label = {"shipped": f"GPTQ int4 vs fp16 reference (Triton up to {limit} rows, cuBLAS above)",
             "triton_everywhere": "GPTQ int4 vs fp16 reference (Triton kernel at every size)"}[path]
    return {**_parity_row(name, label, outcome.result), "gptq_export_s": export_s}


def _parity_row(model: str, comparison: str, result) -> dict:
    keys = ("sqnr_db", "max_abs_error", "mean_abs_error", "pearson", "spearman", "pairwise_agreement",
            "top1_agreement")
    data = result.to_dict()
    return {"model": model, "comparison": comparison, **{k: data[k] for k in keys}, "passed": result.passed,
            "failures": "; ".join(result.failures)}


def step_gptq_layers(work: Path, mode: str) -> dict:
    """Streaming GPTQ (float targets, as the export runs it) of a few 13B-sized layers; seconds and memory."""
    import resource

    import torch

    from vexport.model import open_model
    from vexport.quant.stream import GPTQOptions, quantize_stream
    from vexport.tiny import make_tiny_value_model

    layers, samples, seq_len = {"full": (3, 128, 512), "quick": (2, 64, 512), "smoke": (2, 4, 32)}[mode]
    shape = {"hidden_size": 64, "num_heads": 4} if mode == "smoke" else SHAPE_13B
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = make_tiny_value_model(work / "gptq-layers-model", num_layers=layers, dtype=torch.float16, **shape)
    source = open_model(folder)
    tokens = torch.randint(10, source.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = quantize_stream(source, tokens, GPTQOptions(float_targets=True), lambda tensors: None, device=device)
    per_layer = result.seconds_per_layer
    steady = per_layer[1:] or per_layer
    return {"device": str(device), "layers": layers, "calibration": f"{samples} x {seq_len}", **shape,
            "seconds_per_layer": [round(s, 3) for s in per_layer], "steady_s_per_layer": sum(steady) / len(steady),
            "first_layer_s": per_layer[0], "extrapolated_40_layers_s": per_layer[0] + 39 * sum(steady) / len(steady),
            "peak_gpu_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
            "peak_host_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


OWN_STEPS = {"models": step_models, "parity": step_parity, "gptq_layers": step_gptq_layers}


def run_own_step(name: str, work: Path, mode: str, json_path: Path) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    figures = OWN_STEPS[name](work, mode)
    json_path.write_text(json.dumps(figures, indent=1, default=str))
    print(json.dumps(figures, indent=1, default=str)[:LOG_TAIL])
    return 1 if figures.get("all_passed") is False else 0


# ------------------------------------------------------------------------------- packages and wheels
def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def suite_requirements(runtime_only: bool = False) -> list[str]:
    """What the suite needs installed: vexport's dependencies, then its build requirements (for the editable
    install with --no-build-isolation) and pytest, read from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    if runtime_only:
        return list(project["project"]["dependencies"])
    tests = [r for r in project["project"]["optional-dependencies"]["test"] if _requirement_name(r) == "pytest"]
    return [*project["project"]["dependencies"], *project["build-system"]["requires"], *tests]


def _requirement_name(requirement: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def wheel_requirements() -> list[str]:
    """The suite's requirements the GPU image lacks."""
    return [r for r in suite_requirements() if _requirement_name(r) not in IMAGE_PACKAGES]


def requirement_status(requirement: str) -> dict:
    """Installed version of REQUIREMENT here and whether it satisfies the specifier."""
    installed = _version(_requirement_name(requirement))
    ok = installed is not None
    if ok:
        try:
            from packaging.requirements import Requirement

            ok = Requirement(requirement).specifier.contains(installed, prereleases=True)
        except ImportError:  # no packaging: presence is all that is checked
            pass
    return {"requirement": requirement, "installed": installed, "ok": ok}


def missing_packages() -> list[dict]:
    return [s for s in map(requirement_status, suite_requirements()) if not s["ok"]]


def env_check(as_json: bool) -> int:
    """What this machine lacks for the suite (packages, CUDA, Triton, the ONNX Runtime CUDA provider)."""
    statuses = [requirement_status(r) for r in suite_requirements()]
    facts = _cuda_facts()
    missing = [s for s in statuses if not s["ok"]]
    if as_json:
        print(json.dumps({"requirements": statuses, "missing": [s["requirement"] for s in missing], **facts}, indent=1))
        return 1 if missing else 0
    for s in statuses:
        state = "ok" if s["ok"] else "MISSING" if s["installed"] is None else f"WRONG VERSION ({s['installed']})"
        print(f"{state:<10} {s['requirement']}" + (f" ({s['installed']})" if s["ok"] else ""))
    for key, value in facts.items():
        print(f"{key}: {value}")
    print(f"{len(missing)} missing" + (": " + ", ".join(s["requirement"] for s in missing) if missing else ""))
    return 1 if missing else 0


def _cuda_facts() -> dict:
    facts: dict = {"cuda": None, "triton": _version("triton"), "tensorrt": _version("tensorrt")}
    try:
        import torch

        facts["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        facts["cuda"] = "torch is not installed"
    try:
        import onnxruntime

        facts["onnxruntime_cuda_provider"] = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        facts["onnxruntime_cuda_provider"] = None
    return facts


def download_wheels(dest: Path, dry_run: bool) -> int:
    """pip-download the image's missing wheels (with their own missing requirements) into DEST."""
    requirements = wheel_requirements()
    command = [sys.executable, "-m", "pip", "download", "--dest", "DIR", *WHEEL_TARGET, *requirements]
    if dry_run:
        print("\n".join(requirements))
        print(f"# {' '.join(command)}\n# then drop the wheels of packages the image has ({len(IMAGE_PACKAGES)})")
        return 0
    if dest.exists() and any(dest.iterdir()) and not (dest / "requirements.txt").is_file():
        raise SuiteError(f"--wheels {dest}: the folder exists and is not empty (and holds no earlier wheels)")
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent if dest.parent.is_dir() else None))
    command[command.index("DIR")] = str(staging)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        _remove_tree(staging)
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SuiteError(f"--wheels: pip download failed: {last}", code=1)
    kept = _drop_image_wheels(staging)
    total = sum(p.stat().st_size for p in kept)
    if total > WHEELS_LIMIT:
        _remove_tree(staging)
        raise SuiteError(f"--wheels: {total / 2**20:.1f} MB of wheels is over the 64 MB a transfer carries", code=1)
    (staging / "requirements.txt").write_text("\n".join(requirements) + "\n")
    _remove_tree(dest)
    staging.rename(dest)
    print(f"{len(kept)} wheels, {total / 2**20:.2f} MB in {dest}: " + ", ".join(sorted(p.name for p in kept)))
    return 0


def _drop_image_wheels(folder: Path) -> list[Path]:
    kept = []
    for wheel in folder.iterdir():
        if wheel.suffix == ".whl" and _normalize(wheel.name.split("-")[0]) in IMAGE_PACKAGES:
            wheel.unlink()
        else:
            kept.append(wheel)
    return kept


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


class SuiteError(Exception):
    """Bad input or an unusable machine: one line on stderr, exit code 2 (or CODE)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_results.json and gpu_results.md")
    parser.add_argument("--budget-s", type=int, default=DEFAULT_BUDGET_S, help="seconds for all the steps")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and layers")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no GPU, no timing claims")
    parser.add_argument("--plan", action="store_true", help="print the steps and exit")
    parser.add_argument("--json", nargs="?", const="-", help="--plan/--env-check: JSON; --step: the figures file")
    parser.add_argument("--env-check", action="store_true", help="list what this machine lacks")
    parser.add_argument("--wheels", type=Path, help="download the wheels the GPU image lacks into this folder")
    parser.add_argument("--dry-run", action="store_true", help="with --wheels: list them, download nothing")
    parser.add_argument("--work", type=Path, help="folder for models, figures and logs (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=None, help="steps at once (default 1, for timings; --smoke 2)")
    parser.add_argument("--step", choices=sorted(OWN_STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        raise SuiteError("--quick and --smoke: give one of them")
    if args.budget_s <= 0 or (args.jobs is not None and args.jobs < 1):
        raise SuiteError("--budget-s and --jobs must be positive")
    if args.dry_run and args.wheels is None:
        raise SuiteError("--dry-run goes with --wheels DIR")
    return args


def run_suite(args: argparse.Namespace, mode: str) -> int:
    if args.out is None:
        raise SuiteError("--out DIR is needed to run the suite (or give --plan, --env-check or --wheels)")
    if mode == "smoke":
        # this process and every step: no GPU, Triton interpreted, one thread a step (2 steps share 2 cores)
        os.environ.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    check_installed()
    if mode == "smoke":
        preload()
    elif not _has_cuda():
        raise SuiteError("no CUDA GPU on this machine: the suite needs one (--smoke runs it on tiny shapes "
                         "without, --plan shows it)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="vexport-gpu-suite-"))
    for sub in ("figures", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}  # wide: pytest -v lines keep the whole skip reason
    started, jobs = time.monotonic(), args.jobs or (2 if mode == "smoke" else 1)
    header = {"suite": "vexport GPU suite", "mode": mode, "budget_s": args.budget_s, "jobs": jobs,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(),
              "excluded": EXCLUDED, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    steps = plan(mode, work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks end the running step
    outcomes = run_steps(steps, args.budget_s, jobs, env, work / "logs",
                         lambda done: write_results(args.out, header, done), fork=mode == "smoke")
    header["wall_s"] = round(time.monotonic() - started, 1)
    write_results(args.out, header, outcomes)
    if args.work is None:
        _remove_tree(work)
    for o in outcomes:
        print(f"{o.name:<13} {o.status:<8} {o.wall_s:7.1f} s  {o.note}")
    return 1 if any(o.status not in ("ok", "skipped") for o in outcomes) else 0


def check_installed() -> None:
    """vexport (with its kernels) and its dependencies must be importable here, or no step can run."""
    import importlib.util

    statuses = map(requirement_status, suite_requirements(runtime_only=True))
    missing = [s["requirement"] for s in statuses if not s["ok"]]
    if missing:
        raise SuiteError(f"missing on this machine: {', '.join(missing)} (--env-check lists them; "
                         "--wheels DIR prepares those the GPU image lacks)")
    if importlib.util.find_spec("vexport") is None or importlib.util.find_spec("vexport.kernels") is None:
        raise SuiteError("vexport is not installed here: pip install --no-deps --no-build-isolation -e .")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        if args.step:
            if args.work is None or args.json in (None, "-"):
                raise SuiteError("--step needs --work DIR and --json PATH")
            return run_own_step(args.step, args.work, mode, Path(args.json))
        if args.plan:
            doc = plan_document(mode, args.work or Path("WORK"), args.budget_s)
            print(json.dumps(doc, indent=1)) if args.json else print_plan(doc)
            return 0
        if args.env_check:
            return env_check(bool(args.json))
        if args.wheels is not None:
            return download_wheels(args.wheels, args.dry_run)
        return run_suite(args, mode)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
