"""ONNX export of tiny value models against transformers itself, on real ONNX Runtime sessions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from vexport.batching import pad_batch
from vexport.export.onnx import export_onnx
from vexport.parity import sqnr_db
from vexport.runtime import load


@pytest.fixture(scope="module", params=["tiny_model_dir", "tiny_gqa_model_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {dtype: export_onnx(model_dir, root / dtype, dtype) for dtype in ("float32", "float16")}


def _batch(tokenizer, side):
    texts = ["<|user|>\nHi\n<|assistant|>\nHello there, how can I help?", "Short.", "A middle sized sentence here."]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    return seqs, pad_batch(seqs, tokenizer.pad_token_id, side)


@pytest.mark.parametrize("dtype, min_sqnr", [("float32", 60.0), ("float16", 35.0)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(model_dir, exports, dtype, min_sqnr, side):
    """Each sequence of a padded batch gets the values transformers gives it scored alone (float32 reference)."""
    reference, candidate = load(model_dir), load(exports[dtype])
    seqs, (ids, mask) = _batch(candidate.tokenizer, side)
    got = candidate.values(ids, mask)
    for row, seq in enumerate(seqs):
        alone = reference.values(torch.tensor([seq]))[0].numpy()
        ours = got[row][mask[row].bool()].numpy()
        assert sqnr_db(alone, ours) > min_sqnr
        if dtype == "float32":
            np.testing.assert_allclose(ours, alone, atol=2e-5, rtol=1e-4)


def test_logits_follow_hf_convention(exports):
    model = load(exports["float32"])
    out = model(input_ids=torch.tensor([[1, 5, 9, 12]]), attention_mask=torch.tensor([[1, 1, 1, 1]]))
    assert isinstance(out.logits, torch.Tensor) and out.logits.shape == (1, 4, 1)
    assert out.logits.dtype == torch.float32 and out.logits.device == model.device


def test_graph_io_and_external_data(exports):
    folder = exports["float16"]
    graph = onnx.load(folder / "model.onnx", load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    out_dims = [d.dim_param or d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert graph.graph.output[0].name == "logits" and out_dims == ["batch", "sequence", 1]
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(t.data_type == onnx.TensorProto.FLOAT16 for t in external)
    assert (folder / "model.onnx").stat().st_size < 200_000  # the weights are not inline


def test_manifest_describes_the_artifact(exports, model_dir):
    manifest = json.loads((exports["float32"] / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["precision"] == "float32"
    assert manifest["format_options"]["opset"] == 17
    assert manifest["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert manifest["outputs"][0]["shape"] == ["batch", "sequence", 1]
    assert set(manifest["source"]["weights"]) == {"model.safetensors"}
    assert len(manifest["source"]["weights"]["model.safetensors"]["sha256"]) == 64
    for name in ("model.onnx", "model.onnx.data", "config.json", "tokenizer.json"):
        assert manifest["files"][name]["size"] == (exports["float32"] / name).stat().st_size
    assert {"torch", "transformers", "onnx"} <= set(manifest["versions"])


def test_failed_export_leaves_nothing(model_dir, tmp_path, monkeypatch):
    import vexport.export.onnx as module

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(module, "copy_support_files", explode)
    with pytest.raises(RuntimeError):
        export_onnx(model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("optimize", [True, False], ids=["fused", "plain"])
def test_pickle_weights_export_with_their_score_bias(tiny_model_dir, tmp_path, optimize):
    """An --allow-pickle export reads the weights through transformers' module: the graph must keep the
    checkpoint's score bias (it has no safetensors header to say there is one), so values equal transformers'."""
    from tests.helpers import make_pickle_only

    folder = make_pickle_only(tiny_model_dir, tmp_path / "pickle")
    bias = float(torch.load(folder / "pytorch_model.bin")["score.bias"][0])
    assert abs(bias) > 0.05  # a bias that dropping would show
    out = export_onnx(folder, tmp_path / "onnx", optimize=optimize, allow_pickle=True)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = load(folder, device="cpu", allow_pickle=True).values(ids)
    exported = load(out, device="cpu").values(ids)
    torch.testing.assert_close(exported, reference, atol=1e-4, rtol=1e-4)
