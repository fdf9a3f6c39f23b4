"""The CLI as a user runs it (subprocess): exit codes, one-line errors, and nothing half-written left behind."""

from __future__ import annotations

import json

import pytest

from tests.helpers import copy_model, edit_config, leftovers, make_causal_lm, make_pickle_only, run_cli


def assert_bad_input(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("error:")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_written(tmp_path, output) -> None:
    assert not output.exists()
    assert leftovers(output.parent) == []


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "onnx"
    result = run_cli("export", tiny_model_dir, "--format", "onnx", "--output", out)
    assert result.returncode == 0, result.stderr
    return out


def test_export_writes_complete_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model.onnx", "model.onnx.data", "manifest.json", "config.json", "tokenizer.json"} <= names
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["precision"] == "float32"
    assert leftovers(exported.parent) == []


def test_check_passes_and_writes_reports(exported, tiny_model_dir, tmp_path):
    report = tmp_path / "parity.json"
    result = run_cli("check", exported, "--reference", tiny_model_dir, "--report", report)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    data = json.loads(report.read_text())
    assert data["parity"]["passed"] is True and data["parity"]["sqnr_db"] > 60
    assert data["reference"]["device"] == "cpu" and data["reference"]["dtype"] == "float32"
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True


def test_check_fails_with_exit_1_against_another_model(exported, tiny_gqa_model_dir):
    result = run_cli("check", exported, "--reference", tiny_gqa_model_dir, "--report", exported.parent / "bad.md")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout
    assert "FAIL" in (exported.parent / "bad.md").read_text()


def test_info_shows_manifest(exported):
    result = run_cli("info", exported)
    assert result.returncode == 0, result.stderr
    assert "onnx" in result.stdout and "float32" in result.stdout and "LlamaForTokenClassification" in result.stdout


def test_existing_output_needs_force(exported, tiny_model_dir):
    before = (exported / "manifest.json").read_text()
    result = run_cli("export", tiny_model_dir, "--output", exported)
    assert_bad_input(result, "--output", "--force")
    assert (exported / "manifest.json").read_text() == before


def test_force_replaces_output(tiny_model_dir, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "manifest.json").write_text('{"manifest_version": 1, "format": "onnx"}')  # --force replaces artifacts only
    result = run_cli("export", tiny_model_dir, "--output", out, "--force", "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["precision"] == "float16"
    assert leftovers(tmp_path) == []


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_bad_input(run_cli("export", tmp_path / "nope", "--output", out), "nope", "does not exist")
    assert_nothing_written(tmp_path, out)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_bad_input(run_cli("export", tmp_path / "empty", "--output", out), "config.json")
    assert_nothing_written(tmp_path, out)


def test_causal_lm_is_not_a_value_model(tiny_model_dir, tmp_path):
    model = make_causal_lm(tiny_model_dir, tmp_path / "causal")
    out = tmp_path / "out"
    assert_bad_input(run_cli("export", model, "--output", out), "causal LM", "not a value model")
    assert_nothing_written(tmp_path, out)


def test_num_labels_must_be_one(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "two")
    edit_config(model, id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    out = tmp_path / "out"
    assert_bad_input(run_cli("export", model, "--output", out), "num_labels 2")
    assert_nothing_written(tmp_path, out)


def test_pickle_weights_refused_without_flag(tiny_model_dir, tmp_path):
    model = make_pickle_only(tiny_model_dir, tmp_path / "pickle")
    out = tmp_path / "out"
    assert_bad_input(run_cli("export", model, "--output", out), "pytorch_model.bin", "--allow-pickle")
    assert_nothing_written(tmp_path, out)
    result = run_cli("export", model, "--output", out, "--allow-pickle")
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tiny_model_dir, tmp_path, damage):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13\x37" * 64)
    out = tmp_path / "out"
    assert_bad_input(run_cli("export", model, "--output", out), "model.safetensors")
    assert_nothing_written(tmp_path, out)


def test_unknown_dtype_names_the_flag(tiny_model_dir, tmp_path):
    result = run_cli("export", tiny_model_dir, "--output", tmp_path / "out", "--dtype", "int3")
    assert result.returncode == 2
    assert "--dtype" in result.stderr
    assert not (tmp_path / "out").exists()


def test_check_on_a_folder_without_manifest(tiny_model_dir, tmp_path):
    (tmp_path / "plain").mkdir()
    result = run_cli("check", tmp_path / "plain", "--reference", tiny_model_dir)
    assert_bad_input(result, "config.json")


def test_check_bad_threshold_and_prompts(exported, tiny_model_dir, tmp_path):
    assert_bad_input(run_cli("check", exported, "--reference", tiny_model_dir, "--threshold", "sqnr"), "--threshold")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert_bad_input(run_cli("check", exported, "--reference", tiny_model_dir, "--prompts", prompts), "p.jsonl")


def test_newer_manifest_version_is_refused(exported, tmp_path):
    folder = copy_model(exported, tmp_path / "future")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["manifest_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_bad_input(run_cli("info", folder), "manifest_version 99", "upgrade")


def test_export_flags_are_the_options_fields_with_their_defaults():
    """`vexport export` makes its flags from the options classes: every field is one flag whose default is the
    field's, so the CLI and `vexport.export(...)` cannot drift apart."""
    from dataclasses import fields

    import typer.main

    from vexport.cli import app
    from vexport.export.options import FORMATS, options_for

    command = typer.main.get_command(app).commands["export"]
    flags = {param.name: param for param in command.params}
    cli_defaults = {}
    for name, cls in FORMATS.items():
        for f in fields(cls):
            assert f.name in flags, f"{cls.__name__}.{f.name} has no flag"
            cli_defaults[f.name] = flags[f.name].default
        assert options_for(name, cli_defaults) == cls(), name
    assert set(flags) - set(cli_defaults) == {"model", "output", "format", "force"}
    assert flags["int8_activations"].opts == ["--int8-activations"]
    assert flags["int8_activations"].secondary_opts == ["--float-activations"]
    assert flags["allow_pickle"].opts == ["--allow-pickle"] and not flags["allow_pickle"].secondary_opts
    assert flags["int4"].default is None and flags["int4"].secondary_opts == ["--no-int4"]
    assert flags["min_shape"].show_default == "1,1" and flags["max_shape"].show_default == "16,2048"


def test_a_flag_of_another_format_is_refused_by_name(tiny_model_dir, tmp_path):
    out = tmp_path / "onnx"
    result = run_cli("export", tiny_model_dir, "--format", "onnx", "--group-size", "32", "--output", out)
    assert_bad_input(result, "--group-size is a setting of --format gptq; --format onnx does not take it")
    assert_nothing_written(tmp_path, out)
    from vexport.export.options import GPTQOptions, options_for

    assert options_for("gptq", {"group_size": 32, "dtype": "float32", "min_shape": None}) == GPTQOptions(group_size=32)


def test_tensorrt_shape_flags_parse_and_name_the_flag():
    from vexport.errors import VexportError
    from vexport.export.options import TensorRTOptions

    profile = TensorRTOptions(min_shape="1,1", opt_shape="4,64", max_shape=(8, 128)).profile
    assert (profile.min, profile.opt, profile.max) == ((1, 1), (4, 64), (8, 128))
    with pytest.raises(VexportError, match="--opt-shape must be BATCH,SEQUENCE"):
        TensorRTOptions(opt_shape="4x64")


def test_bad_shape_flag_is_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "engine"
    result = run_cli("export", tiny_model_dir, "--format", "tensorrt", "--max-shape", "16", "--output", out)
    assert_bad_input(result, "--max-shape")
    assert_nothing_written(tmp_path, out)
