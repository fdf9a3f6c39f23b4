"""vexport.load as a drop-in for AutoModelForTokenClassification.from_pretrained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForTokenClassification

from vexport.errors import InputError, ManifestError
from vexport.export.onnx import export_onnx
from vexport.runtime import load


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir, tmp_path_factory):
    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("rt") / "onnx")


def test_reference_matches_transformers(tiny_model_dir):
    hf = AutoModelForTokenClassification.from_pretrained(tiny_model_dir).eval()
    ours = load(tiny_model_dir)
    ids = torch.tensor([[1, 7, 8, 9, 10], [1, 20, 30, 40, 50]])
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    torch.testing.assert_close(ours(input_ids=ids).logits, expected)
    assert ours.format == "torch" and ours.precision == "float32" and ours.device.type == "cpu"


def test_drop_in_surface(onnx_dir):
    model = load(onnx_dir).eval()
    assert model.config.num_labels == 1 and model.format == "onnx"
    ids = torch.tensor([[1, 7, 8, 9], [1, 20, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    values = model.values(ids, mask)
    assert values.dtype == torch.float32 and values.shape == (2, 4)
    assert torch.all(values[1, 2:] == 0)  # padding positions are zero
    last = model.sequence_values(ids, mask)
    torch.testing.assert_close(last, torch.stack([values[0, 3], values[1, 1]]))
    assert model.tokenizer.pad_token_id is not None


def test_sequence_values_under_left_padding(onnx_dir):
    model = load(onnx_dir)
    right = model.sequence_values(torch.tensor([[1, 7, 8, 0]]), torch.tensor([[1, 1, 1, 0]]))
    left = model.sequence_values(torch.tensor([[0, 1, 7, 8]]), torch.tensor([[0, 1, 1, 1]]))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ids, mask, message", [
    (torch.tensor([1, 2, 3]), None, "input_ids must be"),
    (torch.tensor([[1.0, 2.0]]), None, "input_ids must be"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]]), "does not match"),
    (torch.tensor([[1, 10**6]]), None, "outside the vocabulary"),
    (torch.ones((1, 513), dtype=torch.long), None, "max_position_embeddings"),
])
def test_bad_inputs(onnx_dir, ids, mask, message):
    with pytest.raises(InputError, match=message):
        load(onnx_dir).values(ids, mask)


def test_unknown_kwargs_are_refused(onnx_dir):
    with pytest.raises(InputError, match="labels"):
        load(onnx_dir)(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[0.0, 1.0]]))


def _broken_copy(onnx_dir, tmp_path, edit):
    folder = tmp_path / "copy"
    shutil.copytree(onnx_dir, folder)
    edit(folder)
    return folder


def test_newer_manifest_refused(onnx_dir, tmp_path):
    def bump(folder):
        data = json.loads((folder / "manifest.json").read_text())
        data["manifest_version"] = 2
        (folder / "manifest.json").write_text(json.dumps(data))

    with pytest.raises(ManifestError, match="newer than this vexport"):
        load(_broken_copy(onnx_dir, tmp_path, bump))


def test_missing_and_resized_files_refused(onnx_dir, tmp_path):
    folder = _broken_copy(onnx_dir, tmp_path, lambda f: (f / "model.onnx.data").unlink())
    with pytest.raises(ManifestError, match="model.onnx.data"):
        load(folder)
    with open(onnx_dir / "model.onnx.data", "rb") as fh:
        data = fh.read()
    folder2 = tmp_path / "resized"
    shutil.copytree(onnx_dir, folder2)
    (folder2 / "model.onnx.data").write_bytes(data[:-4096])
    with pytest.raises(ManifestError, match="bytes"):
        load(folder2)


def test_unknown_format_refused(onnx_dir, tmp_path):
    def other(folder):
        data = json.loads((folder / "manifest.json").read_text())
        data["format"] = "tflite"
        (folder / "manifest.json").write_text(json.dumps(data))

    with pytest.raises(ManifestError, match="tflite"):
        load(_broken_copy(onnx_dir, tmp_path, other))
