"""`vexport score` against hostile inputs (issue 21): non-finite values, outputs that overlap an input, models
without a tokenizer, resume after changed model files or a damaged part, binary text and huge ids, Ray
addresses where nothing answers, and the --help layout.

The CLI cases run in ONE subprocess (`run_batch`): a fresh interpreter that calls the real `vexport` app once
per case, as a user's shell would, recording each exit code, stdout and stderr. Everything a case needs is
prepared before that subprocess starts; each test then checks its own case.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, copy_model
from tests.scoring_helpers import write_jsonl
from vexport.errors import VexportError
from vexport.scoring import read_errors, read_scores, score

NAN_TOKEN, INF_TOKEN = "@", "#"  # single byte-level tokens of the tiny tokenizer (ids 35 and 6)
TEXTS = ["the cat sat on a warm mat", "rain fell over the quiet city", "an @ in the middle", "every student",
         "a # sign", "bread is good", "the capital of France is Paris", "yes or no"]
NON_FINITE_ROWS = [i for i, t in enumerate(TEXTS) if NAN_TOKEN in t or INF_TOKEN in t]
NEW_TOKEN = "<vexport-new-token>"  # added to a tokenizer copy: its id is past the model's vocabulary

_BATCH = r"""
import contextlib, io, json, sys, time, traceback
from vexport.cli import app

results = {}
for name, args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app(args, prog_name="vexport")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc(file=err)
            code = 1
    results[name] = {"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                     "seconds": time.perf_counter() - start}
print("RESULTS " + json.dumps(results))
"""


def run_batch(cases: dict[str, list]) -> dict[str, dict]:
    """Each case's `vexport ARGS` in one fresh interpreter, in order: {name: {rc, stdout, stderr, seconds}}."""
    plan = json.dumps([[name, [str(a) for a in args]] for name, args in cases.items()])
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _BATCH, plan], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(line.removeprefix("RESULTS "))


def one_line_error(result: dict, *needles: str) -> str:
    """Exit code 2 and one line on stderr, no traceback, holding every NEEDLE."""
    assert result["rc"] == 2, result
    lines = [x for x in result["stderr"].splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result["stderr"], result
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poison(folder: Path) -> Path:
    """Token NAN_TOKEN's embedding row set to NaN and INF_TOKEN's to inf."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    embedding = weights["model.embed_tokens.weight"]
    for token, value in ((NAN_TOKEN, float("nan")), (INF_TOKEN, float("inf"))):
        (token_id,) = tokenizer(token, add_special_tokens=False)["input_ids"]
        embedding[token_id] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _without_tokenizer(artifact: Path) -> Path:
    """An exported artifact whose tokenizer files are gone, and gone from its manifest too (so it verifies)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (artifact / name).unlink()
        del manifest["files"][name]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    return artifact


def _with_new_token(folder: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([NEW_TOKEN])
    tokenizer.save_pretrained(folder)
    return folder


def _corrupt_middle(part: Path) -> None:
    """Flip bytes in the middle of a Parquet file, its footer left intact."""
    data = bytearray(part.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    part.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """Every model, input and output the CLI cases need, built before the one subprocess runs them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vexport.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("hostile")
    w = {"root": root, "model": copy_model(tiny_model_dir, root / "model")}
    w["rows"] = write_jsonl(root / "data" / "rows.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)])
    w["nan_model"] = _poison(copy_model(tiny_model_dir, root / "nan-model"))
    w["no_tokenizer"] = copy_model(tiny_model_dir, root / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (w["no_tokenizer"] / name).unlink()
    w["broken_tokenizer"] = copy_model(tiny_model_dir, root / "broken-tokenizer")
    (w["broken_tokenizer"] / "tokenizer.json").write_text("{ not a tokenizer")
    (root / "rerun").mkdir()  # an empty folder a failed start must leave empty
    w["artifact"] = _without_tokenizer(export_onnx(tiny_model_dir, root / "onnx-artifact"))
    w["vocab_model"] = _with_new_token(copy_model(tiny_model_dir, root / "vocab-model"))
    w["vocab_rows"] = write_jsonl(root / "vocab.jsonl", [{"text": "the cat"}, {"text": "a mat"},
                                                         {"text": f"the {NEW_TOKEN} sat"}, {"text": "rain"}])
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")

    # finished outputs to resume; models whose template or config changes after the first run
    score(w["model"], w["rows"], root / "done", part_rows=3)
    shutil.copytree(root / "done", root / "previous")  # a previous score output for --force to replace
    (root / "previous" / "notes.txt").write_text("kept")  # not a file scoring writes: --force leaves it
    for key, edit in (("template_model", "chat_template.jinja"), ("config_model", "config.json")):
        w[key] = copy_model(tiny_model_dir, root / key)
        score(w[key], w["rows"], root / f"{key}-out", part_rows=3)
        path = w[key] / edit
        if edit == "config.json":
            config = json.loads(path.read_text())
            path.write_text(json.dumps({**config, "vexport_note": "edited after the first run"}))
        else:
            path.write_text(path.read_text().replace("<|assistant|>", "<|bot|>"))
    score(w["model"], w["rows"], root / "corrupt", part_rows=3, per_token=True)
    w["corrupt_part"] = sorted((root / "corrupt").glob("part-*.parquet"))[1]
    _corrupt_middle(w["corrupt_part"])

    # binary text and ids past int64: a uint64 Parquet column, and JSONL integers
    texts = [b"the cat sat", b"caf\xc3\xa9 and bread", b"bad \xff\xfe bytes", "plain string".encode()]
    ids = pa.array([1, 2**63, 2**64 - 1, 7], type=pa.uint64())
    pq.write_table(pa.table({"id": ids, "text": pa.array(texts, type=pa.binary())}), root / "binary.parquet")
    w["binary"] = root / "binary.parquet"
    w["big_ids"] = write_jsonl(root / "big-ids.jsonl", [{"id": 1, "text": "the cat"}, {"id": 2**63, "text": "a mat"},
                                                        {"id": -(2**63), "text": "rain"}, {"id": 2**70, "text": "no"}])
    return w


@pytest.fixture(scope="module")
def results(world):
    w, root = world, world["root"]
    ray_args = ["--engine", "ray", "--ray-address", f"127.0.0.1:{closed_port()}"]
    cases = {
        "non_finite": ["score", w["nan_model"], "-i", w["rows"], "-o", root / "nan-out", "--part-rows", "3"],
        "force_previous_output": ["score", w["nan_model"], "-i", w["rows"], "-o", root / "previous", "--force"],
        "non_finite_strict": ["score", w["nan_model"], "-i", w["rows"], "-o", root / "strict-out", "--strict"],
        "output_is_model": ["score", w["model"], "-i", w["rows"], "-o", w["model"], "--force"],
        "output_in_model": ["score", w["model"], "-i", w["rows"], "-o", w["model"] / "scores", "--force"],
        "output_holds_input": ["score", w["model"], "-i", w["rows"], "-o", w["rows"].parent, "--force"],
        "output_is_input": ["score", w["model"], "-i", w["rows"].parent, "-o", w["rows"].parent, "--force"],
        "output_in_input": ["score", w["model"], "-i", w["rows"].parent, "-o", w["rows"].parent / "scores"],
        "force_foreign": ["score", w["model"], "-i", w["rows"], "-o", root / "foreign", "--force"],
        "no_tokenizer": ["score", w["no_tokenizer"], "-i", w["rows"], "-o", root / "no-tok-out"],
        "artifact_no_tokenizer": ["score", w["artifact"], "-i", w["rows"], "-o", root / "artifact-out"],
        "broken_tokenizer": ["score", w["broken_tokenizer"], "-i", w["rows"], "-o", root / "rerun"],
        "rerun_after_failed_start": ["score", w["model"], "-i", w["rows"], "-o", root / "rerun"],
        "vocabulary": ["score", w["vocab_model"], "-i", w["vocab_rows"], "-o", root / "vocab-out"],
        "resume_finished": ["score", w["model"], "-i", w["rows"], "-o", root / "done", "--part-rows", "3",
                            "--resume"],
        "resume_template": ["score", w["template_model"], "-i", w["rows"], "-o", root / "template_model-out",
                            "--part-rows", "3", "--resume"],
        "resume_config": ["score", w["config_model"], "-i", w["rows"], "-o", root / "config_model-out",
                          "--part-rows", "3", "--resume"],
        "resume_corrupt": ["score", w["model"], "-i", w["rows"], "-o", root / "corrupt", "--part-rows", "3",
                           "--per-token", "--resume"],
        "binary": ["score", w["model"], "-i", w["binary"], "-o", root / "binary-out"],
        "big_ids": ["score", w["model"], "-i", w["big_ids"], "-o", root / "big-ids-out", "--part-rows", "2"],
        "big_ids_resume": ["score", w["model"], "-i", w["big_ids"], "-o", root / "big-ids-out", "--part-rows", "2",
                           "--resume"],
        "ray_unreachable": ["score", w["model"], "-i", w["rows"], "-o", root / "ray-out", *ray_args],
        "help_score": ["score", "--help"],
        "help_check": ["check", "--help"],
        "help_main": ["--help"],
    }
    if not _has_ray():
        del cases["ray_unreachable"]
    return run_batch(cases)


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


# 1. non-finite values
def test_non_finite_rows_go_to_errors_jsonl_never_into_a_part(results, world):
    assert results["non_finite"]["rc"] == 0, results["non_finite"]
    out = world["root"] / "nan-out"
    assert {e["row"]: e["reason"] for e in read_errors(out)} == {
        i: "non-finite value (NaN or inf)" for i in NON_FINITE_ROWS}
    assert f"rejected {len(NON_FINITE_ROWS)}" in results["non_finite"]["stdout"]


def test_strict_stops_at_the_first_non_finite_row_naming_file_and_line(results, world):
    first = NON_FINITE_ROWS[0]
    one_line_error(results["non_finite_strict"], "--strict", f"rows.jsonl:{first + 1} (row {first})",
                   "non-finite value (NaN or inf)")
    assert not (world["root"] / "strict-out").exists()  # failed before its first part: nothing left behind


# 2. output safety
@pytest.mark.parametrize("case, how", [("output_is_model", "is the input"), ("output_in_model", "is inside the input"),
                                       ("output_holds_input", "contains the input"),
                                       ("output_is_input", "is the input"),
                                       ("output_in_input", "is inside the input")])  # without --force too
def test_force_never_writes_into_or_over_an_input(results, world, tiny_model_dir, case, how):
    one_line_error(results[case], "--output", how)
    assert sorted(p.name for p in world["model"].iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
    assert world["rows"].read_text().count("\n") == len(TEXTS)
    assert not (world["model"] / "scores").exists() and not (world["rows"].parent / "scores").exists()


def test_force_replaces_a_previous_score_output_but_refuses_any_other_folder(results, world):
    assert results["force_previous_output"]["rc"] == 0, results["force_previous_output"]
    previous = world["root"] / "previous"
    assert [e["row"] for e in read_errors(previous)] == NON_FINITE_ROWS  # the NaN model's run replaced it
    assert len(list(previous.glob("part-*"))) == 1 and (previous / "notes.txt").read_text() == "kept"
    one_line_error(results["force_foreign"], "--force", str(world["root"] / "foreign"), "notes.txt",
                   "not a vexport score output")
    assert (world["root"] / "foreign" / "notes.txt").read_text() == "mine"


def test_a_failed_start_leaves_nothing_so_a_plain_rerun_works(results, world):
    one_line_error(results["broken_tokenizer"], str(world["broken_tokenizer"]), "tokenizer does not load")
    assert results["rerun_after_failed_start"]["rc"] == 0, results["rerun_after_failed_start"]
    assert len(read_scores(world["root"] / "rerun")) == len(TEXTS)


# 3. tokenizer and vocabulary
def test_a_model_without_a_tokenizer_is_one_line_naming_the_folder(results, world):
    one_line_error(results["no_tokenizer"], str(world["no_tokenizer"]), "has no tokenizer")
    assert not (world["root"] / "no-tok-out").exists()


def test_an_artifact_without_a_tokenizer_is_refused_naming_the_folder(results, world):
    one_line_error(results["artifact_no_tokenizer"], f"{world['artifact']} has no tokenizer")
    assert not (world["root"] / "artifact-out").exists()


def test_a_token_id_past_the_vocabulary_names_the_row(results):
    one_line_error(results["vocabulary"], "vocab.jsonl:3 (row 2)", "token id 1000", "outside the model's vocabulary")


# 4. resume
def test_resume_on_a_finished_output_says_nothing_is_left(results, world):
    result = results["resume_finished"]
    assert result["rc"] == 0, result
    assert result["stdout"].startswith("nothing left to score"), result["stdout"]
    assert "0/0" not in result["stderr"] and "tokens/s" not in result["stdout"] + result["stderr"]


@pytest.mark.parametrize("case, changed", [
    ("resume_template", ("chat template changed", "chat_template.jinja changed")),
    ("resume_config", ("config.json changed",))])
def test_resume_refuses_a_model_whose_tokenizer_template_or_config_changed(results, case, changed):
    line = one_line_error(results[case], "--resume", "other model files", *changed)
    assert "tokenizer.json" not in line  # only what changed is named


def test_a_part_damaged_mid_file_is_found_by_resume_and_by_read_scores(results, world):
    part = world["corrupt_part"]
    one_line_error(results["resume_corrupt"], "--resume", str(part), "does not match the sha256")
    with pytest.raises(VexportError, match="does not match the sha256") as caught:
        read_scores(part.parent)
    assert "\n" not in str(caught.value)
    hashes = part.parent / "checksums.jsonl"
    assert sum(part.name in line for line in hashes.read_text().splitlines()) == 1
    kept = [line for line in hashes.read_text().splitlines() if part.name not in line]
    hashes.write_text("".join(line + "\n" for line in kept))  # no record (a part copied alone): pyarrow's checks
    part.write_bytes(part.read_bytes()[:len(part.read_bytes()) // 2] + part.read_bytes()[-8:])
    with pytest.raises(VexportError, match=f"{part.name}: not a readable scoring part"):
        read_scores(part.parent)


# 5. Parquet binary text and huge ids
def test_binary_text_is_decoded_as_utf8_and_uint64_ids_are_kept(results, world):
    from transformers import AutoTokenizer

    assert results["binary"]["rc"] == 0, results["binary"]
    table = read_scores(world["root"] / "binary-out")
    assert str(table.schema.field("id").type) == "uint64"
    assert table["id"].to_pylist() == [1, 2**63, 7]
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    lengths = [len(tokenizer(t)["input_ids"]) for t in ("the cat sat", "café and bread", "plain string")]
    assert table["num_tokens"].to_pylist() == lengths  # the text, never "b'...'"
    assert read_errors(world["root"] / "binary-out") == [{"row": 2, "reason": "not valid UTF-8"}]


def test_jsonl_ids_past_int64_are_rejected_rows_and_resume_still_works(results, world):
    assert results["big_ids"]["rc"] == 0, results["big_ids"]
    out = world["root"] / "big-ids-out"
    assert read_scores(out)["id"].to_pylist() == [1, -(2**63)]
    errors = read_errors(out)
    assert [e["row"] for e in errors] == [1, 3] and all("does not fit the id column" in e["reason"] for e in errors)
    assert results["big_ids_resume"]["rc"] == 0 and "nothing left" in results["big_ids_resume"]["stdout"]


# 6. Ray
@pytest.mark.skipif(not _has_ray(), reason="needs Ray Data: pip install 'vexport[ray]'")
def test_an_unreachable_ray_address_is_one_line_within_seconds(results, world):
    result = results["ray_unreachable"]
    one_line_error(result, "--ray-address 127.0.0.1:", "cannot reach the Ray cluster")
    assert result["seconds"] < 30, result["seconds"]
    assert not (world["root"] / "ray-out").exists()


def test_a_ray_worker_that_cannot_load_the_model_reports_the_cause():
    """The exception chain Ray Data raises when an actor's constructor fails (Ray 2.60, seen on a local
    cluster): an ActorDiedError whose text is the worker's traceback, caused by an empty SystemException."""
    ray = pytest.importorskip("ray", reason="needs Ray Data: pip install 'vexport[ray]'")
    from ray.data.exceptions import SystemException

    from vexport.scoring.ray import _as_vexport_error

    def chain(raised: BaseException) -> BaseException:
        try:
            raise raised
        except BaseException:
            text = traceback.format_exc()
        died = ray.exceptions.RayActorError(error_msg="The actor died because of an error raised in its creation "
                                            f"task, \x1b[36mray::MapWorker(MapBatches(WindowActor)).__init__()"
                                            f"\x1b[39m (pid=1, ip=127.0.0.1)\n{text}", actor_init_failed=True)
        died.__cause__ = SystemException()
        return died

    error = _as_vexport_error(chain(VexportError("/models/m has no tokenizer (none of tokenizer.json)")))
    assert type(error) is VexportError and str(error) == "/models/m has no tokenizer (none of tokenizer.json)"
    error = _as_vexport_error(chain(FileNotFoundError(2, "No such file or directory", "/models/m/config.json")))
    assert str(error).startswith("a Ray worker could not start: FileNotFoundError: [Errno 2] No such file")


# 8. --help
def test_help_shows_no_type_for_flags_and_names_arguments_in_capitals(results):
    for case in ("help_score", "help_check", "help_main"):
        assert results[case]["rc"] == 0, results[case]
        assert "<bool>" not in results[case]["stdout"] and "{" not in results[case]["stdout"], results[case]["stdout"]
    assert "Usage: vexport score [OPTIONS] MODEL" in results["help_score"]["stdout"]
    assert "Usage: vexport check [OPTIONS] DIR..." in results["help_check"]["stdout"]
    pickle_line = next(x for x in results["help_check"]["stdout"].splitlines() if "--allow-pickle" in x)
    assert "pickle (.bin) reference weights" in pickle_line


# 7. two ONNX Runtime distributions in one environment
def test_loading_warns_once_when_onnxruntime_and_onnxruntime_gpu_are_both_installed(tmp_path, monkeypatch, caplog):
    """The other distribution added as pip leaves one, a dist-info folder on sys.path (importlib.metadata's view)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from vexport.backends import onnxrt

    def installed(name: str) -> bool:
        try:
            return distribution(name) is not None
        except PackageNotFoundError:
            return False

    onnxrt.warn_if_two_runtimes.cache_clear()
    with caplog.at_level("WARNING", logger="vexport.backends.onnxrt"):
        onnxrt.warn_if_two_runtimes()
    if not (installed("onnxruntime") and installed("onnxruntime-gpu")):
        assert not caplog.records  # one runtime: no warning
    caplog.clear()
    other = "onnxruntime-gpu" if installed("onnxruntime") else "onnxruntime"
    info = tmp_path / f"{other.replace('-', '_')}-1.99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {other}\nVersion: 1.99.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    onnxrt.warn_if_two_runtimes.cache_clear()
    with caplog.at_level("WARNING", logger="vexport.backends.onnxrt"):
        onnxrt.warn_if_two_runtimes()
        onnxrt.warn_if_two_runtimes()
    onnxrt.warn_if_two_runtimes.cache_clear()
    (record,) = caplog.records
    assert f"{other} 1.99.0" in record.getMessage() and onnxrt.GPU_INSTALL in record.getMessage()
