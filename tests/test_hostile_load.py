"""Hostile inputs to the loader (vexport/runtime.py): tensors no backend should see, devices this machine lacks,
foreign graphs and folders that are not what they claim. Every case gives the same answer on every backend
(torch reference, GPTQ int4, ONNX Runtime), or one line naming the input, flag or file; the CLI exits 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.helpers import run_cli
from vexport.errors import InputError, ManifestError
from vexport.export.onnx import export_onnx
from vexport.manifest import file_entry, is_artifact
from vexport.export.rtn import write_rtn_checkpoint
from vexport.runtime import load

BACKENDS = ("torch", "gptq", "onnx")
ABSENT_GPU = f"cuda:{torch.cuda.device_count()}"  # one CUDA device more than this machine has (cuda:0 on a CPU one)


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hostile-load")
    return {"torch": tiny_model_dir, "onnx": export_onnx(tiny_model_dir, base / "onnx"),
            "gptq": write_rtn_checkpoint(tiny_model_dir, base / "gptq", group_size=32)}


@pytest.fixture(scope="module")
def models(folders):
    return {name: load(folders[name]) for name in BACKENDS}


class CountingRunner:
    """The real runner, counting the calls that reach it (to prove an empty batch never does); every other
    attribute is the runner's own."""

    def __init__(self, runner):
        self._runner, self.calls = runner, 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def logits(self, *args, **kwargs):
        self.calls += 1
        return self._runner.logits(*args, **kwargs)

    def values(self, *args, **kwargs):
        self.calls += 1
        return self._runner.values(*args, **kwargs)


def counted(model):
    """A ValueModel over MODEL's runner with its calls counted."""
    runner = CountingRunner(model.runner)
    return type(model)(runner, model.config, model.path, model.manifest), runner


def all_results(model, ids, mask):
    return {"logits": model(input_ids=ids, attention_mask=mask).logits, "values": model.values(ids, mask),
            "sequence_values": model.sequence_values(ids, mask)}


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=["no-rows", "no-tokens", "nothing"])
def test_empty_batches_return_empty_results_without_running(models, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    batch, length = shape
    for name in BACKENDS:
        model, runner = counted(models[name])
        got = all_results(model, ids, torch.ones_like(ids))
        assert got["logits"].shape == (batch, length, 1), name
        full = models[name](input_ids=torch.ones((1, 2), dtype=torch.long)).logits
        assert got["logits"].dtype == full.dtype == runner.logits_dtype, name  # empty or not: one dtype
        assert got["values"].shape == (batch, length) and got["values"].dtype == torch.float32, name
        assert got["sequence_values"].shape == (batch,) and torch.all(got["sequence_values"] == 0), name
        assert runner.calls == 0, f"{name}: an empty batch reached the backend"


def test_all_zero_mask_rows_are_zero_on_every_backend(models):
    ids = torch.tensor([[5, 9, 14, 20, 33], [7, 8, 9, 10, 11], [40, 41, 42, 43, 44]])
    mask = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    results = {}
    for name in BACKENDS:
        model, runner = counted(models[name])
        got = results[name] = all_results(model, ids, mask)
        for key, value in got.items():
            assert torch.all(value[[0, 2]] == 0), f"{name} {key}: a row with no real token is not 0"
        alone = model.values(ids[1:2, :3])[0]
        torch.testing.assert_close(got["values"][1, :3], alone, atol=1e-5, rtol=1e-5)
        assert torch.all(got["values"][1, 3:] == 0)
        torch.testing.assert_close(got["sequence_values"][1], alone[2])
        runner.calls = 0
        assert torch.all(model.values(ids, torch.zeros_like(mask)) == 0) and runner.calls == 0, name
    # the float backends agree on the real row (GPTQ is quantized: its zeros are checked above)
    torch.testing.assert_close(results["onnx"]["values"], results["torch"]["values"], atol=1e-4, rtol=1e-4)


def test_bool_and_float_masks_of_zeros_and_ones_are_accepted(models):
    ids = torch.tensor([[5, 9, 14, 20], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    for name in BACKENDS:
        expected = models[name].values(ids, mask)
        assert torch.equal(models[name].values(ids, mask.bool()), expected), name
        assert torch.equal(models[name].values(ids.numpy(), mask.float().numpy()), expected), name


@pytest.mark.parametrize("bad, shown", [(2, "value 2 at [1, 2]"), (-1, "value -1 at [1, 2]"),
                                        (0.5, "value 0.5 at [1, 2]"), (float("nan"), "value nan at [1, 2]")])
def test_mask_values_other_than_zero_and_one_are_refused(models, bad, shown):
    ids = torch.tensor([[5, 9, 14], [7, 8, 9]])
    mask = torch.ones(2, 3, dtype=torch.float32 if isinstance(bad, float) else torch.long)
    mask[1, 2] = bad
    for name in BACKENDS:
        for call in (models[name].values, models[name].sequence_values,
                     lambda i, m, model=models[name]: model(input_ids=i, attention_mask=m)):
            with pytest.raises(InputError, match="^attention_mask has " + re.escape(shown)):
                call(ids, mask)
    for name in ("torch", "gptq"):  # a KV-cached call (the torch backends) checks its mask's values too
        with pytest.raises(InputError, match="^attention_mask has " + re.escape(shown)):
            models[name](input_ids=ids, attention_mask=mask, use_cache=True)


@pytest.mark.parametrize("ids, mask, message", [
    ([[5, 1000, 9]], None, r"input_ids has token id 1000, outside the vocabulary \[0, 1000\) \(the largest id is 999\)"),
    ([[5, -3, 9]], None, r"input_ids has token id -3, outside the vocabulary"),
    ([[5, 6, 9], [1, 2, 3]], [[1, 1, 1]], r"attention_mask \(1, 3\) does not match input_ids \(2, 3\)"),
    ([[5, 6, 9]], [[1, 1]], r"attention_mask \(1, 2\) does not match input_ids \(1, 3\)"),
    ([[5, 6, 9], [1, 2]], None, r"input_ids is not a tensor"),
    ([[True, False]], None, r"input_ids must be an integer tensor"),
    ([5, 6, 9], None, r"input_ids must be an integer tensor \[batch, sequence\], got \(3,\)"),
], ids=["id-too-large", "id-negative", "mask-rows", "mask-length", "ragged", "bool-ids", "1-d"])
def test_bad_ids_and_shapes_are_refused_alike(models, ids, mask, message):
    for name in BACKENDS:
        assert models[name].config.vocab_size == 1000
        with pytest.raises(InputError, match=message):
            models[name].values(ids, mask)


def test_load_refuses_devices_this_machine_lacks(folders):
    with pytest.raises(InputError, match=r"^device 'cdua' is not a device \(available here: cpu"):
        load(folders["torch"], device="cdua")
    with pytest.raises(InputError, match=rf"^device {ABSENT_GPU}: this machine has .* \(available here: cpu"):
        load(folders["onnx"], device=ABSENT_GPU)
    with pytest.raises(InputError, match=r"^device 'meta': vexport runs on cpu or cuda"):
        load(folders["gptq"], device="meta")
    assert load(folders["onnx"], device=torch.device("cpu")).device.type == "cpu"


# --- folders that are not what they claim ---
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _identity_graph(path: Path) -> None:
    """A valid ONNX graph that is not a value model: y = Identity(x)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def foreign(folders, tmp_path_factory) -> dict[str, Path]:
    """Each kind of misleading folder, and the line every command must give for it."""
    base = tmp_path_factory.mktemp("foreign")
    graph = _copy(folders["onnx"], base / "foreign-graph")  # another valid graph, its manifest entry rewritten
    _identity_graph(graph / "model.onnx")
    (graph / "model.onnx.data").unlink()
    data = json.loads((graph / "manifest.json").read_text())
    files = {**{k: v for k, v in data["files"].items() if k != "model.onnx.data"},
             "model.onnx": file_entry(graph / "model.onnx", "model")}
    _edit_manifest(graph, files=files)
    no_manifest = _copy(folders["onnx"], base / "no-manifest")
    (no_manifest / "manifest.json").unlink()
    gptq_as_onnx = _copy(folders["onnx"], base / "says-gptq")
    _edit_manifest(gptq_as_onnx, format="gptq")
    onnx_as_gptq = _copy(folders["gptq"], base / "says-onnx")
    _edit_manifest(onnx_as_gptq, format="onnx")
    gptq_no_manifest = _copy(folders["gptq"], base / "gptq-no-manifest")
    (gptq_no_manifest / "manifest.json").unlink()
    return {"graph": graph, "no-manifest": no_manifest, "says-gptq": gptq_as_onnx, "says-onnx": onnx_as_gptq,
            "gptq-no-manifest": gptq_no_manifest}


MESSAGES = {
    "graph": r"foreign-graph/model.onnx: the graph lacks inputs input_ids, attention_mask \(its inputs: x\); "
             r"lacks output logits \(its outputs: y\): not the graph manifest.json describes$",
    "no-manifest": r"no-manifest has model.onnx but no manifest.json: not a complete vexport artifact",
    "says-gptq": r"says-gptq/manifest.json says format 'gptq', but the folder holds an ONNX graph \(model.onnx\)",
    "says-onnx": r"says-onnx/manifest.json says format 'onnx', but the folder holds GPTQ weights \(model-0000",
    "gptq-no-manifest": r"gptq-no-manifest is a GPTQ checkpoint with no manifest.json",
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_load_names_what_the_folder_lacks(foreign, kind):
    with pytest.raises(ManifestError, match=MESSAGES[kind]):
        load(foreign[kind])


def test_is_artifact_decides_once(folders, foreign, tmp_path):
    assert is_artifact(folders["onnx"]) and is_artifact(foreign["graph"])
    assert not is_artifact(folders["torch"])
    assert not is_artifact(tmp_path / "absent") and not is_artifact(folders["onnx"] / "manifest.json")
    for kind in ("no-manifest", "gptq-no-manifest"):
        with pytest.raises(ManifestError, match=MESSAGES[kind]):
            is_artifact(foreign[kind])


# --- the CLI: --device and the folders above through export, check, score and info ---
_BATCH = """
import contextlib, io, json, sys, traceback
from vexport.cli import app
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app(args=argv, prog_name="vexport")
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code, err = "traceback", io.StringIO(traceback.format_exc())
    results.append({"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_cli_batch(cases: list[list[str]], cwd: Path) -> list[dict]:
    """Several `vexport ARGS` in one fresh interpreter (each run is the real CLI app; imports are paid once)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-c", _BATCH, json.dumps(cases)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _one_error_line(result: dict, pattern: str, what: str) -> None:
    assert result["rc"] == 2, f"{what}: exit {result['rc']}\n{result['stderr'][-1500:]}"
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result["stderr"], f"{what}: {result['stderr'][-1500:]}"
    assert re.search(pattern, lines[0]), f"{what}: {lines[0]!r} does not match {pattern!r}"


def test_cli_device_and_foreign_folders(folders, foreign, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": 1, "text": "the cat sat"}) + "\n")
    out = tmp_path / "out"
    # the real `python -m vexport` once (info: the lightest command), then the rest in one interpreter
    done = run_cli("info", foreign["no-manifest"])
    _one_error_line({"rc": done.returncode, "stderr": done.stderr}, "^error: .*" + MESSAGES["no-manifest"], "info")
    device = r"^error: --device {}: this machine has .* \(available here: cpu".format(ABSENT_GPU)
    cases = {  # what: (argv, the error line)
        "export --device cdua": (["export", folders["torch"], "-o", out / "e0", "--device", "cdua"],
                                 r"^error: --device 'cdua' is not a device \(available here: cpu"),
        "check --device": (["check", folders["onnx"], "-r", folders["torch"], "--device", ABSENT_GPU], device),
        "score --device": (["score", folders["onnx"], "-i", rows, "-o", out / "s0", "--device", "cdua"],
                           r"^error: --device 'cdua' is not a device"),
        "export --device": (["export", folders["torch"], "-o", out / "e1", "-f", "gptq", "--device", ABSENT_GPU],
                            device),
    }
    for kind, pattern in MESSAGES.items():
        error = "^error: .*" + pattern.removesuffix("$")
        cases[f"check {kind}"] = (["check", foreign[kind], "-r", folders["torch"], "--no-verify-hashes"], error)
        cases[f"score {kind}"] = (["score", foreign[kind], "-i", rows, "-o", out / kind], error)
        if kind not in ("graph", "no-manifest"):  # info reads no graph (and no-manifest ran above)
            cases[f"info {kind}"] = (["info", foreign[kind]], error)
    results = run_cli_batch([[str(a) for a in argv] for argv, _ in cases.values()], cwd=tmp_path)
    for (what, (_, pattern)), result in zip(cases.items(), results):
        _one_error_line(result, pattern, what)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == [], "a refused command wrote its output"

