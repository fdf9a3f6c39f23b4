"""Writing outputs under hostile conditions (vexport/artifact.py, vexport check's record and reports; issue 21).

Each case runs the CLI in a subprocess: exit code 2, one line naming the file or flag, no traceback, nothing
deleted that was there before, no partial folder left. Importing vexport's dependencies costs seconds per
interpreter, so most cases are batched: one `python` runs several `vexport` command lines through the CLI's
own entry point (`vexport.cli.app`), each with its own stdout, stderr, exit code and working folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, copy_model, leftovers
from vexport.artifact import OWNER_FILE, output_lock, staging_dir

TIMEOUT = 300
FILE_LIMIT = 256 << 10  # bytes a file may grow to in the "full disk" child: model.onnx.data needs ~740 kB

_DRIVER = r"""
import contextlib, hashlib, io, json, os, sys, traceback
from vexport.cli import app
results = []
for case in json.loads(sys.argv[1]):
    for folder in case.get("mkdir", []):
        os.mkdir(folder)
    os.chdir(case["cwd"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app(case["args"], prog_name="vexport")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    for folder in case.get("mkdir", []):
        os.rmdir(folder)
    watched = case.get("watch")  # a file whose sha256 after the case is reported
    digest = hashlib.sha256(open(watched, "rb").read()).hexdigest() if watched else None
    results.append({"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "sha256": digest})
print("\n" + json.dumps(results))
"""


def _env(columns: int = 200) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "PYTHONPATH": path}


def run_batch(cases: list[dict], *, columns: int = 200, preexec_fn=None) -> list[dict]:
    """Run each case in one interpreter: {"args": [...], "cwd": folder, "mkdir": [folders made for the case
    and removed after it], "watch": a file whose sha256 after the case the result gives}."""
    cases = [{**case, "args": [str(a) for a in case["args"]], "cwd": str(case["cwd"]),
              "mkdir": [str(p) for p in case.get("mkdir", [])],
              "watch": str(case["watch"]) if case.get("watch") else None} for case in cases]
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True, text=True,
                          env=_env(columns), timeout=TIMEOUT, preexec_fn=preexec_fn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def refused(result: dict, *needles: str) -> str:
    """Exit 2 with one line on stderr naming every NEEDLE, no traceback (the progress bars of work begun
    before the failure aside). Returns the line."""
    assert result["rc"] == 2, result
    lines = [line for line in result["stderr"].splitlines() if line.strip() and "━" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result["stderr"]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under FOLDER (links not followed) with the sha256 of each file: proves nothing changed."""
    listing = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            listing[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            listing[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            listing[rel] = "dir"
    return listing


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_partial(parent: Path, name: str, pid: int) -> Path:
    partial = parent / f".{name}.partial-{pid:08x}"
    partial.mkdir()
    (partial / "model.onnx.data").write_bytes(b"\0" * 64)
    (partial / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return partial


def full_disk():
    """In the child: files may not grow past FILE_LIMIT, and passing it fails the write (EFBIG) instead of
    killing the process with SIGXFSZ, as a full disk fails a write with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


@pytest.fixture(scope="module")
def work(tiny_model_dir, tmp_path_factory) -> Path:
    """A folder holding a copy of the tiny model, a link to it, an artifact-like folder (as a GPTQ export,
    which `--format onnx` takes as MODEL, has a manifest.json), a calibration file inside another artifact,
    a folder of unrelated files and a plain file."""
    root = tmp_path_factory.mktemp("hostile-output")
    model = copy_model(tiny_model_dir, root / "model")
    (root / "link").symlink_to(model, target_is_directory=True)
    gptq = copy_model(tiny_model_dir, root / "gptq")
    (gptq / "manifest.json").write_text(json.dumps({"manifest_version": 1, "format": "gptq"}))
    calibrated = root / "calibrated"
    calibrated.mkdir()
    (calibrated / "manifest.json").write_text(json.dumps({"manifest_version": 1, "format": "onnx"}))
    (calibrated / "cal.jsonl").write_text('{"text": "a calibration line"}\n')
    junk = root / "junk"
    (junk / "notes").mkdir(parents=True)
    (junk / "thesis.tex").write_text("years of work")
    (junk / "notes" / "a.txt").write_text("a")
    (root / "afile").write_text("a file, not a folder")
    (root / "full").mkdir()
    (root / "prompts.jsonl").write_text(
        '{"prompt": "Hi there", "responses": ["Hello!", "Go away."]}\n'
        '{"prompt": "What is 2+2?", "responses": ["4", "5", "22"]}\n')
    return root


@pytest.fixture(scope="module")
def race(work):
    """Two exports to the same new output at once, beside a partial left by a dead export, one of a live
    process (this one) and a dead one of another output."""
    out = work / "race" / "out"
    out.parent.mkdir()
    stale = plant_partial(out.parent, "out", dead_pid())
    live = plant_partial(out.parent, "out", os.getpid())
    other = plant_partial(out.parent, "other", dead_pid())
    args = [sys.executable, "-m", "vexport", "export", work / "model", "--output", out]
    procs = [subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(2)]
    results = [(p.wait(TIMEOUT), p.stdout.read(), p.stderr.read()) for p in procs]
    return {"out": out, "results": results, "stale": stale, "live": live, "other": other}


def test_two_exports_to_one_output_and_stale_partials(race):
    """Exactly one export wins; the other exits 2 (the lock is held, or the output exists by the time it
    gets it). The dead export's partial is removed, the live one's and another output's are kept."""
    from vexport.manifest import read_manifest
    from vexport.runtime import check_files

    results = sorted(race["results"])
    assert [rc for rc, _, _ in results] == [0, 2], results
    _, _, stderr = results[1]
    refused({"rc": 2, "stderr": stderr}, "--output")
    assert "is being written by another vexport (pid " in stderr or "already exists" in stderr, stderr
    out = race["out"]
    manifest = read_manifest(out)
    check_files(out, manifest)  # every file the manifest lists, with its size and sha256
    assert OWNER_FILE not in manifest.files and not (out / OWNER_FILE).exists()
    assert not race["stale"].exists()
    assert race["live"].exists() and race["other"].exists()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["out", race["live"].name, race["other"].name])


def export_cases(work: Path) -> list[tuple[dict, tuple[str, ...]]]:
    """(case, what its one error line must name): outputs that are, hold or lie inside an input, a folder that
    is not an artifact, a file as parent, a `check --report` inside an artifact or the reference, a full disk,
    an output whose lock another process holds."""
    model, junk = work / "model", work / "junk"
    export = ["export", model, "--output"]
    return [
        ({"args": [*export, model, "--force"], "cwd": work}, ("--output", "is the input")),
        ({"args": [*export, work, "--force"], "cwd": work}, ("--output", "contains the input")),
        ({"args": ["export", "model", "--output", ".", "--force"], "cwd": work}, ("--output .", "contains the input")),
        ({"args": [*export, work / "link", "--force"], "cwd": work}, ("link", "is the input")),
        ({"args": [*export, model / "onnx"], "cwd": work}, ("--output", "is inside the input")),
        ({"args": ["export", work / "gptq", "--output", work / "gptq", "--force"], "cwd": work},
         ("gptq", "is the input")),
        ({"args": [*export, work / "calibrated", "--force", "--format", "gptq", "--calibration",
                   work / "calibrated" / "cal.jsonl"], "cwd": work}, ("contains the input", "cal.jsonl")),
        ({"args": ["export", model, "--output", ".", "--force"], "cwd": junk},
         ("--output .", "not a vexport artifact", "move it away or choose another --output")),
        ({"args": [*export, work / "afile" / "out"], "cwd": work}, ("afile", "is a file, not a folder")),
        ({"args": ["check", work / "gptq", "--reference", model, "--report", work / "gptq" / "r.json"], "cwd": work},
         ("--report", "is inside the input")),
        ({"args": ["check", work / "gptq", "--reference", model, "--report", model / "r.md"], "cwd": work},
         ("--report", "is inside the input")),
        ({"args": [*export, work / "full" / "out"], "cwd": work}, ("--output", "full/out", "File too large")),
        ({"args": [*export, work / "locked" / "out"], "cwd": work},
         (f"--output {work / 'locked' / 'out'} is being written by another vexport (pid {os.getpid()})",)),
    ]


def check_cases(work: Path, out: Path) -> list[dict]:
    """`vexport check` runs on OUT (relative to WORK, where they run, as a user types paths)."""
    manifest = out / "manifest.json"
    check = ["check", out, "--reference", "model", "--prompts", "prompts.jsonl"]
    cases = [
        [*check, "--threshold", "min_sqnr=20", "--report", "bad.json"],
        [*check, "--threshold", "min_sqnr_db=nan"],
        [*check, "--report", "r.txt"],
        [*check, "--report", "afile/r.json"],
        ["check", out, *check[1:], "--threshold", "min_sqnr_db=20", "--report", "r.json", "--report", "r.md"],
        ["info", out],
        [*check, "--no-record"],
        check,
    ]
    runs = [{"args": args, "cwd": work, "watch": work / manifest} for args in cases]
    runs[-1]["mkdir"] = [work / manifest.with_suffix(".json.tmp")]  # the manifest cannot be replaced
    return runs


@pytest.fixture(scope="module")
def batched(work, race) -> dict:
    """Every batched case in one interpreter, files limited to FILE_LIMIT bytes, 80 columns, while this
    process holds the lock of locked/out; with snapshots of the inputs taken before."""
    exports = export_cases(work)
    out = race["out"].relative_to(work)
    checks = check_cases(work, out)
    before = {name: snapshot(work / name) for name in ("model", "gptq", "calibrated", "junk")}
    manifest_sha = hashlib.sha256((race["out"] / "manifest.json").read_bytes()).hexdigest()
    (work / "locked").mkdir()
    with output_lock(work / "locked" / "out"):
        results = run_batch([case for case, _ in exports] + checks, columns=80, preexec_fn=full_disk)
    return {"before": before, "manifest_sha": manifest_sha, "out": out,
            "exports": list(zip(exports, results[:len(exports)])), "checks": results[len(exports):]}


def test_export_refuses_inputs_non_artifacts_and_unwritable_outputs(work, batched):
    """--force never replaces or writes into an input (the model folder, a parent of it, `.` in its parent, a
    link to it, an artifact given as MODEL, the calibration file's folder), replaces no folder that is not a
    vexport artifact, and a file as parent or a full disk is one line with nothing left behind. The same for
    `check --report` inside an artifact or the reference. An output another process is writing (holds its
    lock) is refused naming that process."""
    for (case, needles), result in batched["exports"]:
        refused(result, *needles)
    before = batched["before"]
    assert {name: snapshot(work / name) for name in before} == before  # model.safetensors' sha256 included
    assert (work / "model" / "model.safetensors").is_file()
    assert list((work / "full").iterdir()) == []  # the partial of the failed write is gone, and no lock file
    assert list((work / "locked").iterdir()) == []
    for folder in (work, work / "junk", work / "full", work / "model"):
        assert leftovers(folder) == [], folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes, so a read-only folder is writable")
def test_read_only_parent_and_artifact(work, race, tmp_path):
    """A read-only output parent is one line before any work; a read-only artifact is still checkable, the
    record skipped with one line saying why."""
    parent, artifact = tmp_path / "ro", copy_model(race["out"], tmp_path / "ro-artifact")
    parent.mkdir()
    for folder in (parent, artifact):
        folder.chmod(0o555)
    try:
        export, check = run_batch([
            {"args": ["export", work / "model", "--output", parent / "out"], "cwd": tmp_path},
            {"args": ["check", artifact, "--reference", work / "model", "--prompts", work / "prompts.jsonl"],
             "cwd": tmp_path}])
        refused(export, "--output", "is not writable")
        assert list(parent.iterdir()) == []
        assert check["rc"] == 0, check
        assert f"parity not recorded: {artifact / 'manifest.json'} is not writable" in check["stdout"]
    finally:
        for folder in (parent, artifact):
            folder.chmod(0o755)


def test_check_validates_first_records_last_and_fits_80_columns(work, batched):
    """Bad thresholds and report paths fail before any work; a run that fails after the work (a report that
    cannot be written) leaves the manifest as it was; a pass under a loosened threshold is recorded with the
    thresholds and shown as such by `vexport info`; the report paths and the record are printed; a manifest
    that cannot be written is skipped with one line; --no-record writes nothing; the comparison fits 80
    columns."""
    results, original = batched["checks"], batched["manifest_sha"]
    manifest = batched["out"] / "manifest.json"
    reports = ["r.json", "r.md"]
    bad_key, bad_value, bad_suffix, unwritable, compared, info, no_record, blocked = results
    refused(bad_key, "--threshold", "min_sqnr")
    refused(bad_value, "--threshold", "min_sqnr_db")
    refused(bad_suffix, "--report", "r.txt")
    refused(unwritable, "--report", "afile")
    assert not (work / "r.txt").exists() and not (work / "bad.json").exists()
    assert [r["sha256"] for r in results[:4]] == [original] * 4  # no exit-2 run wrote it, even after the work

    assert compared["rc"] == 0, compared
    lines = compared["stdout"].splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in compared["stdout"], compared["stdout"]
    for header in ("Size on disk", "Throughput", "Per-token SQNR", "Pearson", "Pairwise agreement", "Result"):
        assert header in compared["stdout"], header
    for path in reports:
        assert f"wrote report {path}" in lines and (work / path).is_file()
    assert f"recorded parity in {manifest} (--no-record skips this)" in lines
    parity = json.loads((work / manifest).read_text())["parity"]
    assert parity["passed"] and parity["thresholds"]["min_sqnr_db"] == 20 and parity["loosened"] == ["sqnr_db>=20"]
    assert info["rc"] == 0 and "PASS (loosened: sqnr_db>=20)" in info["stdout"], info["stdout"]

    recorded = compared["sha256"]
    assert recorded != original
    assert no_record["rc"] == 0 and "recorded" not in no_record["stdout"], no_record
    assert blocked["rc"] == 0, blocked
    assert f"parity not recorded: {manifest} is not writable" in blocked["stdout"], blocked["stdout"]
    assert no_record["sha256"] == blocked["sha256"] == recorded  # neither run wrote it


def test_force_replaces_an_empty_folder_and_the_owner_marker_goes(tmp_path):
    """An empty folder may be replaced; the owner marker is gone from the finished folder."""
    (tmp_path / "out").mkdir()
    with staging_dir(tmp_path / "out", force=True) as tmp:
        assert json.loads((tmp / OWNER_FILE).read_text())["pid"] == os.getpid()
        (tmp / "a.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_rules_keep_what_cannot_be_proven_garbage(tmp_path):
    """A partial without a readable marker, or one of another host, is kept; an `.old-*` (the previous output
    of a replace cut short) is removed only when the output exists, and kept when it is all that is left."""
    from vexport.artifact import remove_stale

    unmarked = tmp_path / ".out.partial-unmarked"
    unmarked.mkdir()
    elsewhere = plant_partial(tmp_path, "out", dead_pid())
    (elsewhere / OWNER_FILE).write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-elsewhere"}))
    old = tmp_path / ".out.old-12345678"
    old.mkdir()
    assert remove_stale(tmp_path / "out") == [] and old.exists() and unmarked.exists() and elsewhere.exists()
    (tmp_path / "out").mkdir()
    assert remove_stale(tmp_path / "out") == [old] and not old.exists()
    assert unmarked.exists() and elsewhere.exists()
