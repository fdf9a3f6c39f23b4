"""vexport/manifest.py at unit level: Manifest.write/read_manifest round trips, every refusal of read_manifest
(missing or oversized files, bad JSON, wrong or future manifest_version, missing fields, each field of the wrong
type, bad files entries), is_artifact and check_format_files on hand-built folders, and the small helpers
(file_entry, sha256_file, library_versions, now_iso). Real files under tmp_path; nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import re
from importlib import metadata
from pathlib import Path

import pytest

from vexport import safety
from vexport.errors import ManifestError
from vexport.manifest import (MANIFEST_NAME, MANIFEST_VERSION, MAX_MANIFEST_BYTES, Manifest, check_format_files,
                              file_entry, is_artifact, library_versions, now_iso, read_manifest, sha256_file)

GRAPH = b"not really an onnx graph, but bytes with a size and a hash"


def onnx_manifest(folder: Path, **changes) -> Manifest:
    """A valid ONNX manifest for FOLDER, whose model.onnx is written here."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(GRAPH)
    fields = {"format": "onnx", "precision": "float32", "source": {"model_id": "tiny"}, "model": {"vocab_size": 8},
              "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
              "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 1]}],
              "files": {"model.onnx": file_entry(folder / "model.onnx", "model")},
              "format_options": {"graph": "model.onnx", "opset": 17}, "versions": {"python": "3"},
              "created": "2024-01-01T00:00:00+00:00"}
    return Manifest(**{**fields, **changes})


def write_json(folder: Path, data) -> Path:
    """FOLDER/manifest.json holding DATA (a dict edited from a valid manifest, or raw text/bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def edited(tmp_path: Path, **changes) -> Path:
    """An artifact folder whose manifest.json is a valid one with CHANGES applied (a value of ... drops the key)."""
    folder = tmp_path / "artifact"
    data = onnx_manifest(folder).to_dict()
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    write_json(folder, data)
    return folder


def refused(folder: Path, pattern: str) -> str:
    """read_manifest raises a one-line ManifestError matching PATTERN; returns the message."""
    with pytest.raises(ManifestError, match=pattern) as info:
        read_manifest(folder)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------- write and read back
def test_write_then_read_round_trips(tmp_path):
    manifest = onnx_manifest(tmp_path / "a", parity={"max_abs_diff": 1e-6})
    path = manifest.write(tmp_path / "a")
    assert path == tmp_path / "a" / MANIFEST_NAME
    assert read_manifest(tmp_path / "a") == manifest
    assert manifest.to_dict()["manifest_version"] == MANIFEST_VERSION


def test_write_is_sorted_json_with_a_newline_and_leaves_no_temporary(tmp_path):
    folder = tmp_path / "a"
    onnx_manifest(folder).write(folder)
    text = (folder / MANIFEST_NAME).read_text()
    assert text.endswith("}\n")
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_NAME, "model.onnx"]


def test_write_replaces_an_existing_manifest(tmp_path):
    folder = tmp_path / "a"
    onnx_manifest(folder, precision="float16").write(folder)
    onnx_manifest(folder, precision="int4").write(folder)
    assert read_manifest(folder).precision == "int4"


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    """The rename fails (manifest.json is a folder): the error propagates and no manifest.json.tmp is left."""
    folder = tmp_path / "a"
    manifest = onnx_manifest(folder)
    (folder / MANIFEST_NAME).mkdir()
    with pytest.raises(OSError):
        manifest.write(folder)
    assert not (folder / "manifest.json.tmp").exists()
    assert (folder / MANIFEST_NAME).is_dir()


def test_optional_fields_take_their_defaults(tmp_path):
    folder = edited(tmp_path, parity=..., created=..., versions=..., format_options=...)
    manifest = read_manifest(folder)
    assert (manifest.parity, manifest.created, manifest.versions, manifest.format_options) == (None, "", {}, {})


def test_unknown_keys_are_ignored(tmp_path):
    """A version-1 manifest with keys a later release of version 1 added still reads."""
    folder = edited(tmp_path, added_later={"x": 1})
    assert read_manifest(folder).format == "onnx"


def test_read_manifest_accepts_a_str_folder(tmp_path):
    folder = edited(tmp_path)
    assert read_manifest(str(folder)).files["model.onnx"]["size"] == len(GRAPH)


# ------------------------------------------------------------------------------- read_manifest: the file
def test_a_missing_folder_is_refused(tmp_path):
    refused(tmp_path / "absent", rf"^{re.escape(str(tmp_path / 'absent'))} does not exist$")


def test_a_file_is_not_an_artifact_folder(tmp_path):
    (tmp_path / "model.onnx").write_bytes(GRAPH)
    refused(tmp_path / "model.onnx", "model.onnx is a file, not an artifact folder")


def test_a_folder_without_manifest_is_refused(tmp_path):
    refused(tmp_path, f"{re.escape(str(tmp_path))} has no manifest.json: not a vexport artifact folder")


def test_a_folder_of_exported_files_without_manifest_says_so(tmp_path):
    (tmp_path / "model.onnx").write_bytes(GRAPH)
    refused(tmp_path, "has model.onnx but no manifest.json: not a complete vexport artifact")


def test_a_manifest_that_is_a_folder_is_missing(tmp_path):
    (tmp_path / MANIFEST_NAME).mkdir()
    refused(tmp_path, "has no manifest.json")


def test_an_oversized_manifest_is_refused_unread(tmp_path):
    """Larger than MAX_MANIFEST_BYTES (a sparse file: never held in memory)."""
    with open(tmp_path / MANIFEST_NAME, "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    refused(tmp_path, rf"manifest.json is {MAX_MANIFEST_BYTES + 1} bytes, more than a manifest can be")


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"[" * 100_000,
                                  b'{"manifest_version": ' + b"1" * 5000 + b"}", b""],
                         ids=["syntax", "not-utf8", "bom", "deep", "huge-int", "empty"])
def test_unreadable_json_is_refused(tmp_path, data):
    write_json(tmp_path, data)
    refused(tmp_path, r"manifest.json is not readable JSON \(")


@pytest.mark.parametrize("data", [[], "a string", 1, None])
def test_json_that_is_not_an_object_is_refused(tmp_path, data):
    write_json(tmp_path, json.dumps(data))
    refused(tmp_path, "manifest.json is not a JSON object$")


# -------------------------------------------------------------------------- read_manifest: the version
@pytest.mark.parametrize("version", [..., None, "1", 1.0, True, 0, -1, [1]])
def test_an_invalid_manifest_version_is_refused(tmp_path, version):
    refused(edited(tmp_path, manifest_version=version), r"manifest.json has no valid manifest_version \(a whole")


@pytest.mark.parametrize("version", [MANIFEST_VERSION + 1, 2**70])
def test_a_newer_manifest_version_asks_for_an_upgrade(tmp_path, version):
    message = refused(edited(tmp_path, manifest_version=version),
                      rf"manifest_version {version}, newer than this vexport reads \({MANIFEST_VERSION}\)")
    assert "pip install -U vexport" in message


def test_the_version_is_checked_before_the_fields(tmp_path):
    """A future manifest may drop or retype fields: the user is told to upgrade, not that a field is wrong."""
    write_json(tmp_path, {"manifest_version": MANIFEST_VERSION + 1, "files": "another layout"})
    refused(tmp_path, "newer than this vexport reads")


# --------------------------------------------------------------------------- read_manifest: the fields
def test_missing_fields_are_all_named_sorted(tmp_path):
    folder = edited(tmp_path, format=..., files=..., inputs=...)
    refused(folder, r"manifest.json lacks field\(s\): files, format, inputs$")


@pytest.mark.parametrize("key, value, kind", [
    ("format", 1, "int"), ("precision", None, "NoneType"), ("source", [], "list"), ("model", "tiny", "str"),
    ("inputs", {}, "dict"), ("outputs", "logits", "str"), ("files", ["model.onnx"], "list"),
    ("format_options", [], "list"), ("versions", "1.0", "str"), ("parity", [], "list"), ("created", 0, "int"),
])
def test_each_field_of_the_wrong_type_is_named(tmp_path, key, value, kind):
    refused(edited(tmp_path, **{key: value}), rf"manifest.json: field '{key}' has the wrong type \({kind}\)$")


@pytest.mark.parametrize("key", ["inputs", "outputs"])
@pytest.mark.parametrize("entry", ["input_ids", {"name": "x", "dtype": "int64"}, None, []])
def test_io_entries_need_name_dtype_and_shape(tmp_path, key, entry):
    refused(edited(tmp_path, **{key: [entry]}), f"every {key} entry must be an object with name, dtype and shape")


@pytest.mark.parametrize("entry", ["12", None, [], {"sha256": "0" * 64}, {"size": "12", "sha256": "0" * 64},
                                   {"size": -1, "sha256": "0" * 64}, {"size": 1.0, "sha256": "0" * 64},
                                   {"size": True, "sha256": "0" * 64}])
def test_files_entries_need_a_valid_size(tmp_path, entry):
    refused(edited(tmp_path, files={"model.onnx": entry}), "files entry 'model.onnx' has no valid size$")


@pytest.mark.parametrize("digest", [None, 0, "0" * 63, "0" * 65, "A" * 64, "g" * 64, " " + "0" * 63],
                         ids=["none", "int", "short", "long", "upper", "not-hex", "space"])
def test_files_entries_need_a_lowercase_hex_sha256(tmp_path, digest):
    entry = {"size": 1, "role": "model"} if digest is None else {"size": 1, "sha256": digest}
    refused(edited(tmp_path, files={"model.onnx": entry}), "files entry 'model.onnx' has no valid sha256$")


def test_a_long_file_name_is_cut_in_the_message(tmp_path):
    name = "a" * 150 + "TAIL.onnx"
    message = refused(edited(tmp_path, files={name: {"size": -1, "sha256": "0" * 64}}), "has no valid size")
    assert "a" * 100 in message and "TAIL" not in message


def test_an_empty_files_object_reads(tmp_path):
    """read_manifest checks types only; which files a format needs is check_format_files' decision."""
    assert read_manifest(edited(tmp_path, files={})).files == {}


# ---------------------------------------------------------------------------------------------- is_artifact
def test_is_artifact_for_a_folder_with_a_manifest(tmp_path):
    write_json(tmp_path, "not even JSON")  # is_artifact decides by the file's presence; read_manifest reads it
    assert is_artifact(tmp_path) and is_artifact(str(tmp_path))


@pytest.mark.parametrize("kind", ["absent", "file", "empty", "hf-model", "manifest-folder"])
def test_is_artifact_is_false_for_other_paths(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("{}")
    elif kind != "absent":
        path.mkdir()
    if kind == "hf-model":
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (path / "model.safetensors").write_bytes(b"")
    if kind == "manifest-folder":
        (path / MANIFEST_NAME).mkdir()
    assert is_artifact(path) is False


def test_is_artifact_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_json(tmp_path / "artifact", {})
    assert is_artifact("~/artifact")


@pytest.mark.parametrize("name", ["model.onnx", "model.engine", "rank0.plan"])
def test_exported_files_without_a_manifest_raise(tmp_path, name):
    """An export's own files but no manifest.json: a broken artifact, never read as a Hugging Face model."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ManifestError, match=rf"has {re.escape(name)} but no manifest.json"):
        is_artifact(tmp_path)


@pytest.mark.parametrize("method", ["gptq", "GPTQ"])
def test_a_gptq_checkpoint_without_a_manifest_raises(tmp_path, method):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": method}}))
    with pytest.raises(ManifestError, match="is a GPTQ checkpoint with no manifest.json.*--format onnx"):
        is_artifact(tmp_path)
    refused(tmp_path, "is a GPTQ checkpoint with no manifest.json")  # read_manifest says the same


@pytest.mark.parametrize("config", [b"{bad json", b"\xff\xff", b"[" * 100_000, b'{"x": ' + b"1" * 5000 + b"}", b"[]",
                                    b'{"quantization_config": "gptq"}', b'{"quantization_config": {}}',
                                    b'{"quantization_config": {"quant_method": "awq"}}'])
def test_an_odd_config_is_left_to_the_model_reader(tmp_path, config):
    """Not an artifact: model.py reports the broken config.json (checking links first)."""
    (tmp_path / "config.json").write_bytes(config)
    assert is_artifact(tmp_path) is False


def test_a_config_symlink_is_not_followed(tmp_path):
    (tmp_path / "elsewhere.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").symlink_to(tmp_path / "elsewhere.json")
    assert is_artifact(tmp_path / "model") is False


def test_an_oversized_config_is_not_read(tmp_path):
    with open(tmp_path / "config.json", "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    assert is_artifact(tmp_path) is False


# ---------------------------------------------------------------------------------------- check_format_files
def test_check_format_files_accepts_each_format_with_its_files(tmp_path):
    entry = {"size": 1, "sha256": "0" * 64}
    check_format_files(tmp_path, onnx_manifest(tmp_path / "onnx"))
    check_format_files(tmp_path, onnx_manifest(tmp_path / "trt", format="tensorrt", files={"model.engine": entry},
                                               format_options={"engine": "model.engine"}))
    check_format_files(tmp_path, onnx_manifest(tmp_path / "gptq", format="gptq", format_options={},
                                               files={"config.json": entry, "model-00001.safetensors": entry}))


def test_a_graph_not_in_the_files_is_refused(tmp_path):
    """format_options.graph names a file the manifest does not list (model.onnx is listed, but not as the graph)."""
    manifest = onnx_manifest(tmp_path, format_options={"graph": "other.onnx"})
    with pytest.raises(ManifestError, match=r"manifest.json says format 'onnx', but the folder lists none of its "
                                            r"files: the manifest does not describe this folder$"):
        check_format_files(tmp_path, manifest)


@pytest.mark.parametrize("graph", [None, ["model.onnx"], {"name": "model.onnx"}, 1])
def test_a_graph_option_that_is_no_file_name_is_refused(tmp_path, graph):
    folder = tmp_path / "a"
    manifest = onnx_manifest(folder, format_options={"graph": graph}, files={})
    (folder / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="says format 'onnx', but the folder lists none of its files"):
        check_format_files(folder, manifest)


def test_a_tensorrt_manifest_over_an_onnx_folder_names_the_graph(tmp_path):
    manifest = onnx_manifest(tmp_path, format="tensorrt", format_options={"engine": "model.engine"})
    with pytest.raises(ManifestError, match=r"says format 'tensorrt', but the folder holds an ONNX graph \(model"):
        check_format_files(tmp_path, manifest)


def test_a_gptq_manifest_over_an_engine_names_the_engine(tmp_path):
    """The engine is found in the folder (not only in the files listed)."""
    (tmp_path / "model.plan").write_bytes(b"engine")
    manifest = onnx_manifest(tmp_path / "a", format="gptq", files={}, format_options={})
    with pytest.raises(ManifestError, match=r"says format 'gptq', but the folder holds a TensorRT engine "
                                            r"\(model.plan\)"):
        check_format_files(tmp_path, manifest)


# ------------------------------------------------------------------------------------------------- helpers
def test_file_entry_records_size_hash_and_role(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_entry(path, "weights") == {"size": 3000, "sha256": hashlib.sha256(b"abc" * 1000).hexdigest(),
                                           "role": "weights"}


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_sha256_file_matches_hashlib_and_safety(tmp_path, chunk):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * 40)
    assert sha256_file(path, chunk) == hashlib.sha256(path.read_bytes()).hexdigest() == safety.sha256_file(path)


def test_a_file_entry_passes_verification(tmp_path):
    """What file_entry records is what safety.verify_file (the loader's check) accepts."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights")
    safety.verify_file(path, file_entry(path, "weights"))


def test_library_versions_names_python_and_every_installed_package():
    """Exactly python and the packages of _VERSIONED_PACKAGES that are installed, each at its installed version."""
    import vexport.manifest as module

    installed = {}
    for name in module._VERSIONED_PACKAGES:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    assert {"torch", "transformers", "safetensors"} <= installed.keys()
    assert library_versions() == {"python": platform.python_version(), **installed}


def test_now_iso_is_utc_to_the_second():
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    stamp = now_iso()
    parsed = dt.datetime.fromisoformat(stamp)
    assert stamp.endswith("+00:00") and parsed.microsecond == 0
    assert before <= parsed <= dt.datetime.now(dt.timezone.utc)
