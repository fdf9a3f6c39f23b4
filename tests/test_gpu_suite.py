"""scripts/gpu_suite.py: the plan covers every GPU test and CUDA benchmark, the flags work, and --smoke runs
every step end to end on the CPU (tiny shapes, Triton under the interpreter)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

SUITE = REPO / "scripts" / "gpu_suite.py"


def suite(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["gpu_suite"]


def installed(requirement: str) -> bool:
    try:
        metadata.version(re.match(r"[\w.-]+", requirement).group(0))
    except metadata.PackageNotFoundError:
        return False
    return True


def alive(pid: int) -> bool:
    """Whether PID runs (a zombie waiting for a parent to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def grep_gpu_tests() -> set[str]:
    """The gpu-marked tests found by reading the files (not the suite's AST walk)."""
    found = set()
    for path in (REPO / "tests").glob("test_*.py"):
        text = path.read_text()
        if re.search(r"^pytestmark\s*=.*mark\.gpu", text, re.M):
            found |= {f"tests/{path.name}::{n}" for n in re.findall(r"^def (test\w*)", text, re.M)}
        for block in re.findall(r"((?:^@.*\n)+)def (test\w*)", text, re.M):
            if "mark.gpu" in block[0]:
                found.add(f"tests/{path.name}::{block[1]}")
    return found


@pytest.fixture(scope="module")
def plans(module) -> dict[str, dict]:
    done = suite("--plan", "--json")  # as CI's readers run it; --quick through the same function in-process
    assert done.returncode == 0, done.stderr
    quick = module.plan_document("quick", Path("WORK"), module.DEFAULT_BUDGET_S)
    return {"full": json.loads(done.stdout), "quick": json.loads(json.dumps(quick))}


def test_plan_covers_every_gpu_test_and_cuda_benchmark(plans):
    doc = plans["full"]
    steps = {s["name"]: s for s in doc["steps"]}
    tests = grep_gpu_tests()
    assert len(tests) >= 10 and tests <= set(doc["gpu_tests"])
    for file in {t.split("::")[0] for t in tests}:
        assert file in steps["gpu_tests"]["covers"] and file in steps["gpu_tests"]["argv"]
    covered = {path for s in doc["steps"] for path in s["covers"]}
    cuda_benches = {f"scripts/{p.name}" for p in (REPO / "scripts").glob("bench_*.py")
                    if "cuda" in p.read_text().lower()}
    assert len(cuda_benches) >= 5
    for bench in cuda_benches:
        assert bench in covered or doc["excluded"].get(bench), f"{bench} has CUDA code but no place in the suite"
    for path, reason in doc["excluded"].items():
        assert (REPO / path).is_file() and path not in covered and len(reason) > 10
    for step in doc["steps"]:  # every script a step runs exists, or the step says why it cannot run
        assert all((REPO / p).is_file() for p in step["covers"]) or step["absent"]


def test_step_limits_fit_the_default_budget(plans, module):
    for mode, doc in plans.items():
        limits = [s["limit_s"] for s in doc["steps"] if not s["absent"]]
        assert doc["budget_s"] == module.DEFAULT_BUDGET_S <= 600 - 60  # one device command is 10 minutes at most
        assert sum(limits) <= doc["budget_s"], (mode, sum(limits))
        assert doc["total_limit_s"] == sum(limits)
    assert [s["name"] for s in plans["full"]["steps"]][:3] == ["models", "gpu_tests", "parity"]
    readme = (REPO / "README.md").read_text().split("## GPU suite", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| (\w+) \| (\d+) s \|", readme, re.M)  # the README's table says the plan's limits
    assert table == [(s["name"], str(s["limit_s"])) for s in plans["full"]["steps"]]


def test_gpu_test_discovery_reads_marks(tmp_path, module):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "import pytest\npytestmark = [pytest.mark.gpu]\ndef test_one(): pass\ndef helper(): pass\n")
    (tmp_path / "tests" / "test_b.py").write_text(
        "import pytest\n@pytest.mark.slow\n@pytest.mark.gpu\ndef test_two(): pass\n"
        "@pytest.mark.parametrize('x', [1])\ndef test_cpu(x): pass\n")
    assert module.gpu_tests(tmp_path) == ["tests/test_a.py::test_one", "tests/test_b.py::test_two"]


def test_env_check_and_wheels_dry_run(tmp_path, module, capsys):
    code = module.main(["--env-check", "--json"])  # in this process: torch is imported already
    report = json.loads(capsys.readouterr().out)
    missing = {module._requirement_name(r) for r in report["missing"]}
    assert {module._requirement_name(r) for r in module.suite_requirements() if not installed(r)} <= missing
    assert code == (1 if missing else 0)
    assert report["cuda"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
    listed = {module._requirement_name(s["requirement"]) for s in report["requirements"]}
    assert {"torch", "jsonschema", "pytest"} <= listed
    dry = suite("--wheels", tmp_path / "wheels", "--dry-run")
    assert dry.returncode == 0 and not (tmp_path / "wheels").exists()
    listed = [line for line in dry.stdout.splitlines() if not line.startswith("#")]
    assert "jsonschema>=4.20" in listed and not any(line.startswith(("torch", "transformers")) for line in listed)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:  # each one is in the image or in the download
        assert module._requirement_name(requirement) in module.IMAGE_PACKAGES or requirement in listed
    assert "--python-version 3.12" in dry.stdout and "manylinux" in dry.stdout
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert module.main(["--wheels", str(tmp_path / "taken")]) == 2  # refused before any download
    assert capsys.readouterr().err.startswith("error: --wheels") and os.listdir(tmp_path / "taken") == ["notes.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the suite would run for real")
def test_without_cuda_it_exits_2_with_one_line(tmp_path, module, capsys):
    assert module.main(["--out", str(tmp_path / "out")]) == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no CUDA GPU")
    bad = suite("--quick", "--smoke", "--out", tmp_path / "out")  # as a script: exit code and one line
    assert bad.returncode == 2 and bad.stderr.startswith("error: --quick and --smoke") and bad.stderr.count("\n") == 1


def test_runner_budget_timeout_and_needs(tmp_path, module):
    """The real subprocess runner: a step past its limit is ended with its children; the rest still run."""
    py = sys.executable
    sleeper = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid)); time.sleep(60)")
    figures = tmp_path / "f.json"
    steps = [module.Step("hangs", "hangs", 2, (py, "-c", sleeper)),
             module.Step("ok", "ok", 20, (py, "-c", f"open({str(figures)!r}, 'w').write('{{\"x\": 1.5}}')"),
                         figures=str(figures)),
             module.Step("fails", "fails", 20, (py, "-c", "raise SystemExit(3)")),
             module.Step("after", "after", 20, (py, "-c", "pass"), needs=("fails",)),
             module.Step("late", "late", 500, (py, "-c", "pass"))]
    records = []
    start = time.monotonic()
    outcomes = {o.name: o for o in module.run_steps(steps, 30, 1, dict(os.environ), tmp_path, records.append)}
    assert time.monotonic() - start < 25
    assert outcomes["hangs"].status == "timeout" and 2 <= outcomes["hangs"].wall_s < 10
    assert not alive(int((tmp_path / "pid").read_text()))  # the grandchild went with its group
    assert outcomes["ok"].status == "ok" and outcomes["ok"].figures == {"x": 1.5}
    assert outcomes["fails"].status == "failed" and outcomes["fails"].returncode == 3
    assert outcomes["after"].status == "skipped" and "fails" in outcomes["after"].note
    assert outcomes["late"].status == "ok"  # its limit is cut to what is left, not skipped
    assert len(records) == len(steps) + 1  # once before the first step, then after each one


def test_smoke_runs_every_step(tmp_path, plans, module):
    out, work = tmp_path / "out", tmp_path / "work"
    done = suite("--smoke", "--out", out, "--work", work, "--budget-s", "400", timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "gpu_results.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == [s["name"] for s in plans["full"]["steps"]] and doc["mode"] == "smoke"
    for step in plans["full"]["steps"]:
        got = steps[step["name"]]
        assert got["status"] == ("skipped" if step["absent"] else "ok"), (step["name"], got["log_tail"])
        assert step["absent"] or step["name"] == "gpu_tests" or got["figures"], step["name"]
    tests = steps["gpu_tests"]["tests"]
    assert {c["id"].split("[")[0] for c in tests["cases"]} >= grep_gpu_tests()
    assert tests["skipped"] == len(tests["cases"]) and "CUDA" in tests["cases"][0]["message"]
    from_log = module.log_summary((work / "logs" / "gpu_tests.log").read_text())  # the timeout fallback
    assert [(c["id"], c["outcome"], c["message"]) for c in from_log["cases"]] == \
        [(c["id"], c["outcome"], c["message"]) for c in tests["cases"]]
    parity = steps["parity"]["figures"]["rows"]
    assert parity[0]["comparison"].startswith("torch fp16") and all(r["passed"] for r in parity)
    assert all(r["rel_err"] < 1e-2 for r in steps["int4_matmul"]["figures"]["rows"])
    assert steps["gptq_layers"]["figures"]["layers"] == 2 and steps["decoding"]["figures"]["smoke"]
    markdown = (out / "gpu_results.md").read_text()
    assert "no timing claims" in markdown and "| parity | ok |" in markdown and "#### int4 Triton matmul" in markdown
    assert all((out / name).stat().st_size < 1_000_000 for name in ("gpu_results.json", "gpu_results.md"))
    assert sorted(p.name for p in out.iterdir()) == ["gpu_results.json", "gpu_results.md"]
