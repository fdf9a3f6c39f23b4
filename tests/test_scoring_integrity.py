"""`vexport score` reads what it hashes (issue 28, items 5 and 6).

An input edited, truncated, appended to, replaced by rename or joined by a new file while a run goes on is
found before the run says it is complete: exit code 2, one line naming the file, the parts committed before
kept, and a --resume on the input put back finishes with every row once and the values of an uninterrupted run
(JSONL and Parquet, a file and a folder, the local and the Ray engine). FIFOs, devices and sockets are refused by
name, given directly or found in a folder, without ever being opened for a blocking read.

The mid-run edits are deterministic: every run is one case of ONE batch interpreter (the real `vexport` app
called once per case, as in test_scoring_hostile); the test waits for the case's first part, stops the whole
process with SIGSTOP, edits the input, and lets it go on with SIGCONT, so the edit lands between two commits
with the run frozen. A run that had finished before the stop would fail its exit-code assertion, never pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.scoring_helpers import assert_every_row_once, mixed_rows, write_jsonl, write_parquet
from tests.test_scoring_hostile import _BATCH, one_line_error
from vexport.errors import VexportError
from vexport.scoring import inputs, score
from vexport.scoring.inputs import InputChangedError, index_input, open_input, read_windows

PART_ROWS = 2
ROWS = mixed_rows(19, seed=11, max_words=12) + [{"id": "last", "text": "the cat sat on the mat"}]
WINDOWS = len(ROWS) // PART_ROWS
CHANGED = "changed during the run"
RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) \S+\.py:\d+ -- ")


def _parts(out: Path) -> dict[str, str]:
    """{part name: sha256} of the committed parts in OUT."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("part-*.parquet"))}


def _start_batch(cases: dict[str, list], log: Path) -> subprocess.Popen:
    plan = json.dumps([[name, [str(a) for a in args]] for name, args in cases.items()])
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as fh:  # a file, not a pipe: Ray's own output can never fill it and block the run
        return subprocess.Popen([sys.executable, "-c", _BATCH, plan], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)


def _results(process: subprocess.Popen, log: Path, timeout: float) -> dict[str, dict]:
    process.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, text[-4000:]
    return json.loads(line.removeprefix("RESULTS "))


def _wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.002)
    return False


# --- edits made while the run is stopped, and how each input is put back -------------------------------------------

def _rewrite_rows(path: Path, original: bytes) -> None:
    """The rows of the second half rewritten in place (the same file, a new length): the issue's case."""
    half = len(original) // 2
    path.write_bytes(original[:half] + original[half:].replace(b"the ", b"a "))


def _rewrite_parquet(path: Path, original: bytes) -> None:
    write_parquet(path, [dict(r, text="edited") if "text" in r else r for r in ROWS])


def _truncate(path: Path, original: bytes) -> None:
    os.truncate(path, len(original) // 2)


def _rename_over(path: Path, original: bytes) -> None:
    """An editor's save: a new file renamed over the input (a different inode, the same length)."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(original.replace(b"the cat sat", b"the dog sat"))
    os.replace(tmp, path)


def _append(path: Path, original: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(json.dumps({"id": "late", "text": "appended while scored"}).encode() + b"\n")


def _edit_hiding_mtime(path: Path, original: bytes) -> None:
    """The last row edited to the same length, the mtime put back: only the ctime (and the bytes) tell."""
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(original.rindex(b"the cat sat"))
        fh.write(b"the dog sat")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _add_file(path: Path, original: bytes) -> None:
    write_jsonl(path.parent / "extra.jsonl", [{"id": "extra", "text": "a file added while scored"}])


def _put_back(path: Path, original: bytes) -> None:
    tmp = path.with_name(f".{path.name}.back")
    tmp.write_bytes(original)
    os.replace(tmp, path)


def _remove_extra(path: Path, original: bytes) -> None:
    (path.parent / "extra.jsonl").unlink()


@dataclasses.dataclass
class Case:
    name: str
    fmt: str  # "jsonl" | "parquet"
    edit: object
    restore: object = _put_back
    folder: bool = False  # --input is the folder holding the file
    ray: bool = False
    named: str = ""  # the file the error line must name (default: the input file)


CASES = [
    Case("edit_row", "jsonl", _rewrite_rows),
    Case("edit_parquet", "parquet", _rewrite_parquet, folder=True),
    Case("truncate", "jsonl", _truncate, folder=True),
    Case("rename_over", "jsonl", _rename_over),
    Case("append", "jsonl", _append),
    Case("hidden_edit", "jsonl", _edit_hiding_mtime),
    Case("file_added", "jsonl", _add_file, restore=_remove_extra, folder=True, named="extra.jsonl"),
    Case("append_ray", "jsonl", _append, ray=True),
    Case("left_edited", "jsonl", _rewrite_rows, restore=None),  # never put back: --resume must refuse it
]


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401  (also puts this file in conftest's "ray" group)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def batch(tiny_model_dir, tmp_path_factory):
    """ONE interpreter runs, in order: the non-regular inputs, every edit case (each stopped at its first part and
    edited), then every case again with --resume. The inputs are put back while the last edit case is stopped
    (the runs before it have ended; its own input is never put back), so each resume sees a stable input."""
    root = tmp_path_factory.mktemp("integrity")
    cases = [c for c in CASES if _has_ray() or not c.ray]
    assert cases[-1].restore is None
    reference = score(tiny_model_dir, write_jsonl(root / "reference.jsonl", ROWS), root / "whole", part_rows=PART_ROWS)
    assert reference["complete"]
    named, runs = _non_regular_inputs(root / "special", tiny_model_dir)
    inputs_of, resumes = {}, {}
    for case in cases:
        folder = root / case.name / "data"
        path = (write_jsonl if case.fmt == "jsonl" else write_parquet)(folder / f"rows.{case.fmt}", ROWS)
        inputs_of[case.name] = path
        args = ["score", tiny_model_dir, "-i", folder if case.folder else path, "-o", root / case.name / "out",
                "--part-rows", PART_ROWS, "--batch-tokens", 64, "--threads", 1]
        runs[case.name] = args + (["--engine", "ray", "--workers", 1] if case.ray else [])
        resumes[f"{case.name}_resume"] = args + ["--resume"]  # a run stopped under Ray resumes on the local engine
    process = _start_batch({**runs, **resumes}, root / "batch.log")
    try:
        stopped, kept = _stop_and_edit(process, cases, root, inputs_of)
        results = _results(process, root / "batch.log", timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    last = root / cases[-1].name / "out"  # its resume was refused: nothing in it may have changed
    kept[cases[-1].name] = (_parts(last), (last / "summary.json").exists())
    return {"root": root, "inputs": inputs_of, "stopped": stopped, "kept": kept, "results": results,
            "whole": root / "whole", "special": named}


def _stop_and_edit(process: subprocess.Popen, cases: list[Case], root: Path, inputs_of: dict) -> tuple[dict, dict]:
    """Each case: wait for its first part, SIGSTOP, edit, SIGCONT. While the last one is stopped, the runs before
    it have ended: their parts are noted and their inputs put back."""
    stopped, kept = {}, {}
    for case in cases:
        out, path = root / case.name / "out", inputs_of[case.name]
        original = path.read_bytes()
        assert _wait_for(lambda: _parts(out) or process.poll() is not None, 120), f"{case.name}: no first part"
        os.kill(process.pid, signal.SIGSTOP)
        try:
            stopped[case.name] = (_parts(out), (out / "summary.json").exists(), original)
            case.edit(path, original)
            if case is cases[-1]:
                for done in cases[:-1]:
                    done_out = root / done.name / "out"
                    kept[done.name] = (_parts(done_out), (done_out / "summary.json").exists())
                    done.restore(inputs_of[done.name], stopped[done.name][2])
        finally:
            os.kill(process.pid, signal.SIGCONT)
    return stopped, kept


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_an_input_changed_mid_run_is_one_line_naming_it_and_the_parts_before_are_kept(batch, case):
    if case.name not in batch["results"]:
        pytest.skip("needs Ray (pip install 'vexport[ray]')")
    before, finished, _ = batch["stopped"][case.name]
    assert before and not finished, f"{case.name}: the run was not stopped between two parts ({len(before)} parts)"
    assert len(before) < WINDOWS - 1, f"{case.name}: stopped too late to test anything ({len(before)} parts)"
    named = batch["inputs"][case.name].with_name(case.named) if case.named else batch["inputs"][case.name]
    one_line_error(_without_ray_logs(batch["results"][case.name]), str(named), CHANGED)
    kept, complete = batch["kept"][case.name]
    assert not complete  # the run never said it was complete
    assert {k: v for k, v in kept.items() if k in before} == before  # every part there at the stop is kept
    assert len(kept) < WINDOWS or case.name == "file_added"  # the others stopped at the next commit


def _without_ray_logs(result: dict) -> dict:
    """RESULT with Ray's own timestamped log lines (a cluster's token auth, Ray Data's execution) taken out."""
    lines = result["stderr"].splitlines(keepends=True)
    return {**result, "stderr": "".join(x for x in lines if not RAY_LOG.match(x))}


@pytest.mark.parametrize("case", [c for c in CASES if c.restore], ids=lambda c: c.name)
def test_resume_on_the_input_put_back_gives_every_row_once_with_the_values_of_one_run(batch, case):
    if case.name not in batch["results"]:
        pytest.skip("needs Ray (pip install 'vexport[ray]')")
    result = batch["results"][f"{case.name}_resume"]
    assert result["rc"] == 0, result
    out = batch["root"] / case.name / "out"
    assert_every_row_once(out, batch["whole"], ROWS)
    kept, _ = batch["kept"][case.name]
    assert {k: v for k, v in _parts(out).items() if k in kept} == kept  # resume scored only what was missing
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["parts_already_done"] == len(kept)


def test_resume_refuses_an_input_that_is_not_the_one_the_parts_came_from(batch):
    one_line_error(batch["results"]["left_edited_resume"], "--resume", "scored with a different input")
    assert not (batch["root"] / "left_edited" / "out" / "summary.json").exists()


# --- non-regular files ---------------------------------------------------------------------------------------------

NON_REGULAR = ("fifo_direct", "fifo_no_suffix", "dev_null", "dev_zero_link", "fifo_in_folder", "link_in_folder",
               "socket_in_folder")


def _non_regular_inputs(root: Path, model: Path) -> tuple[dict, dict]:
    """FIFOs, devices, links to a device and a socket, given directly or inside a folder beside a good file:
    ({case: (the path the error must name, what it must say)}, {case: its `vexport score` arguments})."""
    root.mkdir()
    os.mkfifo(root / "pipe.jsonl")
    os.mkfifo(root / "pipe")  # no suffix: was reported as a folder with no .jsonl or .parquet files
    (root / "zero.jsonl").symlink_to("/dev/zero")
    named = {"fifo_direct": (root / "pipe.jsonl", "is a FIFO"), "fifo_no_suffix": (root / "pipe", "is a FIFO"),
             "dev_null": (Path("/dev/null"), "is a character device"),
             "dev_zero_link": (root / "zero.jsonl", "is a character device (a link to /dev/zero)")}
    given = {name: path for name, (path, _) in named.items()}
    for name, make, inside, what in (("fifo_in_folder", os.mkfifo, "b.jsonl", "is a FIFO"),
                                     ("link_in_folder", lambda p: p.symlink_to("/dev/zero"), "sub/b.parquet",
                                      "is a character device"),
                                     ("socket_in_folder", _bind_socket, "b.jsonl", "is a socket")):
        write_jsonl(root / name / "a.jsonl", [{"text": "the cat sat"}])
        (root / name / "sub").mkdir()
        make(root / name / inside)
        named[name], given[name] = (root / name / inside, what), root / name
    runs = {name: ["score", model, "-i", given[name], "-o", root / f"{name}-out"] for name in named}
    return named, runs


def _bind_socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


@pytest.mark.parametrize("name", NON_REGULAR)
def test_a_non_regular_input_is_refused_by_name_at_once(batch, name):
    path, what = batch["special"][name]
    result = batch["results"][name]
    one_line_error(result, f"--input {path} {what}", "not a regular file")
    assert result["seconds"] < 30  # refused before anything opened it: a blocking open would hang the batch
    assert not (batch["root"] / "special" / f"{name}-out").exists()


def test_open_input_never_blocks_on_a_fifo_swapped_in_after_the_listing(tmp_path):
    """open_input is non-blocking until fstat says the file is regular: a FIFO with no writer is refused at once."""
    os.mkfifo(tmp_path / "late.jsonl")
    outcome = []

    def attempt():
        try:
            open_input(tmp_path / "late.jsonl")
        except VexportError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and "is a FIFO" in outcome[0]


# --- the hashes, in process ----------------------------------------------------------------------------------------

def test_a_jsonl_window_edited_after_the_file_was_opened_is_found_by_its_hash(tmp_path):
    """The stat checks pass while the file is open; the bytes read must still be the indexed ones (a file well
    over the reader's buffer, so that the last window is read from the disk after the edit)."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:-1] * 60 + ROWS[-1:])
    plan = index_input(path, PART_ROWS)
    reader = read_windows(plan, plan.windows(), 1 << 20)
    next(reader)  # the file is open now, positioned after window 0
    _edit_hiding_mtime(path, path.read_bytes())
    last = plan.windows()[-1]
    lines = f"lines {last.start + 1}-{last.stop} are not the bytes indexed"
    with pytest.raises(InputChangedError, match=f"{path}.*{lines}"):
        list(reader)


def test_bytes_appended_after_the_last_line_are_found_when_the_file_is_read(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:-1] * 40 + ROWS[-1:])
    plan = index_input(path, PART_ROWS)
    reader = read_windows(plan, plan.windows(), 1 << 20)
    next(reader)
    _append(path, b"")
    with pytest.raises(InputChangedError, match="bytes follow its last indexed line"):
        list(reader)


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_parquet_file_is_parsed_from_the_copy_that_was_hashed(tmp_path, monkeypatch, in_memory):
    """Rows come from one checked copy (memory or a temporary file); bytes unlike the indexed ones are refused,
    even where the stat check is fooled."""
    if not in_memory:
        monkeypatch.setattr(inputs, "SNAPSHOT_IN_MEMORY", 0)
    path = write_parquet(tmp_path / "rows.parquet", ROWS)
    plan = index_input(path, 5)
    rows = [json.loads(x) for _, lines in read_windows(plan, plan.windows(), 1 << 20) for x in lines]
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS]
    write_parquet(path, [dict(r, id=r["id"] + "x") for r in ROWS])
    fooled = dataclasses.replace(plan, files=(dataclasses.replace(plan.files[0],
                                                                  identity=inputs.identity(os.stat(path))),))
    with pytest.raises(InputChangedError, match="its bytes are not those indexed"):
        list(read_windows(fooled, fooled.windows(), 1 << 20))


def test_a_file_that_changes_while_it_is_indexed_is_refused(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    real = inputs._index_jsonl

    def index_then_edit(fh, part_rows, digest):
        result = real(fh, part_rows, digest)
        _append(path, b"")
        return result

    monkeypatch.setattr(inputs, "_index_jsonl", index_then_edit)
    with pytest.raises(InputChangedError, match=f"{path} changed while it was being indexed"):
        index_input(path, PART_ROWS)



def test_a_change_found_in_a_ray_read_task_is_the_causes_one_line(tmp_path):
    """Ray hands the driver a RayTaskError(InputChangedError): a VexportError too, whose text is the read task's
    traceback. The engine reports the cause's line, also when only the traceback text came back."""
    if not _has_ray():
        pytest.skip("needs Ray (pip install 'vexport[ray]')")
    import ray.exceptions

    from vexport.scoring.ray import _as_vexport_error

    cause = InputChangedError(inputs.changed_message(tmp_path / "rows.jsonl", "lines 7-8 are not the bytes indexed"))
    trace = f"Traceback (most recent call last):\n  File \"inputs.py\", line 1\n" \
            f"vexport.scoring.inputs.InputChangedError: {cause}"
    with_cause = ray.exceptions.RayTaskError("ReadWindow", trace, cause, pid=1, ip="127.0.0.1").as_instanceof_cause()
    for wrapped in (with_cause, ray.exceptions.RayTaskError("ReadWindow", trace, None, pid=1, ip="127.0.0.1")):
        got = _as_vexport_error(wrapped)
        assert type(got) is VexportError and str(got) == str(cause)
