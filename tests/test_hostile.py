"""Hostile model and artifact folders (vexport/safety.py): each is refused through the CLI with exit code 2, one
line naming the file, nothing written, and nothing outside the folder opened.

The file outside every folder is a named pipe: opening it for reading blocks until a writer comes, so a
vexport that opened it would hang and the subprocess timeout would fail the test (tests run as root, which
ignores file modes, and atime is unreliable under relatime, so neither can prove a file stayed unread).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import onnx
import pytest

from tests.helpers import copy_model, hub_snapshot, leftovers, make_pickle_only, run_cli
from vexport.errors import ManifestError, VexportError
from vexport.manifest import sha256_file

CLI_TIMEOUT = 120  # seconds; a vexport that opened the sentinel pipe would block here


@pytest.fixture(scope="module")
def onnx_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    from vexport.export.onnx import export_onnx

    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("hostile") / "onnx")


@pytest.fixture
def sentinel(tmp_path) -> Path:
    """A named pipe beside the hostile folders: opening it would hang the process that does."""
    path = tmp_path / "outside.bin"
    os.mkfifo(path)
    return path


def refused(*args, needle: str) -> str:
    """Run the CLI; it must exit 2 with one line naming NEEDLE and no traceback. Returns the line."""
    try:
        result = run_cli(*args, timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vexport {' '.join(map(str, args))} hung: it opened the sentinel pipe outside the folder")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def check_refused(folder: Path, reference: Path, needle: str) -> None:
    report = folder.parent / "report.json"
    refused("check", folder, "--reference", reference, "--report", report, needle=needle)
    assert not report.exists()


def export_refused(folder: Path, needle: str) -> None:
    out = folder.parent / "out"
    refused("export", folder, "--output", out, needle=needle)
    assert not out.exists() and leftovers(out.parent) == []


def still_a_pipe(path: Path) -> None:
    assert stat.S_ISFIFO(path.stat().st_mode)


def rehash(folder: Path, *names: str) -> None:
    """Record the current size and sha256 of NAMES in the manifest (a tamperer who also edits the manifest)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name),
                                   "role": "model"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def point_external_data(folder: Path, location: str) -> None:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(graph, str(folder / "model.onnx"))
    rehash(folder, "model.onnx")


# ------------------------------------------------------------------------------------- model folders
def test_shard_index_naming_outside_is_refused(tiny_model_dir, tmp_path, sentinel):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {"score.weight": "../outside.bin", "model.norm.weight": "model-00001-of-00001.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    export_refused(folder, "../outside.bin")
    still_a_pipe(sentinel)


def test_weight_symlink_leading_out_is_refused(tiny_model_dir, tmp_path, sentinel):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(sentinel)
    export_refused(folder, "model.safetensors")
    still_a_pipe(sentinel)


def test_tokenizer_symlink_leading_out_is_refused(tiny_model_dir, tmp_path, sentinel):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(sentinel)
    export_refused(folder, "tokenizer.json")


def test_truncated_weight_file_is_refused(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    export_refused(folder, "model.safetensors")


def test_pickle_only_folder_is_refused(tiny_model_dir, tmp_path):
    folder = make_pickle_only(tiny_model_dir, tmp_path / "model")
    line = refused("export", folder, "--output", tmp_path / "out", needle="pytorch_model.bin")
    assert "--allow-pickle" in line and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- artifact folders
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_external_data_outside_is_refused(onnx_artifact, tiny_model_dir, tmp_path, sentinel, where):
    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    point_external_data(folder, "../outside.bin" if where == "relative" else str(sentinel))
    check_refused(folder, tiny_model_dir, "outside.bin")
    still_a_pipe(sentinel)


def test_external_data_symlink_leading_out_is_refused(onnx_artifact, tiny_model_dir, tmp_path, sentinel):
    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    (folder / "model.onnx.data").unlink()
    (folder / "model.onnx.data").symlink_to(sentinel)
    check_refused(folder, tiny_model_dir, "model.onnx.data")
    still_a_pipe(sentinel)


def test_manifest_naming_outside_is_refused(onnx_artifact, tiny_model_dir, tmp_path, sentinel):
    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../outside.bin"] = {"size": 0, "sha256": "0" * 64, "role": "model"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    check_refused(folder, tiny_model_dir, "../outside.bin")
    still_a_pipe(sentinel)


def test_flipped_byte_is_refused_unless_hashes_are_skipped(onnx_artifact, tiny_model_dir, tmp_path):
    from vexport import runtime

    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx.data").write_bytes(bytes(data))
    check_refused(folder, tiny_model_dir, "model.onnx.data")
    with pytest.raises(ManifestError, match="sha256"):
        runtime.load(folder)
    assert runtime.load(folder, verify_hashes=False).format == "onnx"  # the user's explicit opt-out


def test_truncated_artifact_file_is_refused(onnx_artifact, tiny_model_dir, tmp_path):
    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    with open(folder / "model.onnx.data", "r+b") as fh:
        fh.truncate(fh.seek(0, os.SEEK_END) - 4096)
    check_refused(folder, tiny_model_dir, "model.onnx.data")


def test_unlisted_weight_file_is_refused(onnx_artifact, tmp_path):
    from vexport import runtime

    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    (folder / "extra.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ManifestError, match="extra.safetensors"):
        runtime.load(folder)


@pytest.mark.parametrize("change", ["future_version", "not_json", "files_not_object", "bad_size"])
def test_broken_manifest_is_refused(onnx_artifact, tmp_path, change):
    from vexport import runtime

    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    if change == "future_version":
        manifest["manifest_version"] = 99
    elif change == "files_not_object":
        manifest["files"] = ["model.onnx"]
    elif change == "bad_size":
        manifest["files"]["model.onnx"]["size"] = "12"
    text = "{not json" if change == "not_json" else json.dumps(manifest)
    (folder / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="manifest.json"):
        runtime.load(folder)


def test_manifest_missing_is_refused_by_info(onnx_artifact, tmp_path):
    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    (folder / "manifest.json").unlink()
    refused("info", folder, needle="manifest.json")


# ------------------------------------------------------------------------------------- the API itself
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "C:\\x", "", "a\0b"])
def test_inside_refuses_escapes(tmp_path, name):
    from vexport.safety import inside

    with pytest.raises(VexportError):
        inside(tmp_path, name)


def test_inside_allows_hub_cache_blobs(tmp_path):
    from vexport.safety import inside

    _, snapshot = hub_snapshot(tmp_path)
    assert inside(snapshot, "config.json") == snapshot / "config.json"


# --------------------------------------------------------------------------------- GPTQ checkpoints
@pytest.fixture(scope="module")
def gptq_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from vexport.export.rtn import write_rtn_checkpoint

    return write_rtn_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("hostile") / "gptq", group_size=32)


@pytest.mark.parametrize("change", ["qweight_shape", "g_idx_range"])
def test_gptq_tensors_of_inconsistent_shapes_are_refused(gptq_dir, tmp_path, change):
    from safetensors.torch import load_file, save_file

    from vexport.backends.gptq import GPTQRunner

    folder = shutil.copytree(gptq_dir, tmp_path / "gptq")
    name = "model.layers.0.mlp.down_proj." + ("qweight" if change == "qweight_shape" else "g_idx")
    shard = next(p for p in folder.glob("*.safetensors") if name in load_file(p))
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-1].clone() if change == "qweight_shape" else tensors[name] + 1000
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(VexportError, match="down_proj" if change == "qweight_shape" else "g_idx"):
        GPTQRunner(folder, device="cpu")


def test_backend_file_outside_the_listed_files_is_refused(onnx_artifact, tmp_path, sentinel):
    from vexport import runtime

    folder = shutil.copytree(onnx_artifact, tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_options"]["graph"] = "../outside.bin"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="outside.bin"):
        runtime.load(folder)
    still_a_pipe(sentinel)
