"""The optimized ONNX graph (export/graph/fused.py): fused ONNX Runtime operators, correct under any padding.

References are each sequence scored alone: by transformers for float graphs, by the int4 torch runtime on the
same GPTQ checkpoint for int4 graphs (so quantization error never hides a padding bug).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from tests.helpers import run_cli
from vexport.batching import pad_batch
from vexport.export.onnx import export_onnx
from vexport.manifest import read_manifest
from vexport.backends.gptq import dequantized_linears
from vexport.parity import sqnr_db
from vexport.export.rtn import write_rtn_checkpoint
from vexport.runtime import load
from vexport.tiny import make_tiny_value_model

TEXTS = ["<|user|>\nHi\n<|assistant|>\nHello there, how can I help you with that today?", "Short.",
         "A middle sized sentence here, with a few more words."]
# kind: (atol, rtol, min SQNR dB) against each sequence alone in the reference
TOLERANCE = {"float32": (2e-5, 1e-4, 60.0), "float16": (None, None, 35.0), "int4": (1e-4, 1e-4, 60.0),
             "int4-act": (1e-4, 1e-4, 60.0), "int4-level4": (None, None, 15.0)}


@pytest.fixture(scope="module")
def graphs(tiny_gqa_model_dir, tmp_path_factory):
    """kind -> (reference folder, optimized ONNX folder). int4: an asymmetric RTN checkpoint; int4-act: RTN with
    act-order, where q/k/v have different column orders and so stay three MatMulNBits (GPTQ gives them one).
    Both in float compute, to compare at float32 tolerance; int4-level4 is the default int8-activation graph."""
    root = tmp_path_factory.mktemp("fused")
    gptq = write_rtn_checkpoint(tiny_gqa_model_dir, root / "gptq", group_size=32, sym=False)
    act = write_rtn_checkpoint(tiny_gqa_model_dir, root / "gptq-act", group_size=32, desc_act=True)
    return {"float32": (tiny_gqa_model_dir, export_onnx(tiny_gqa_model_dir, root / "fp32")),
            "float16": (tiny_gqa_model_dir, export_onnx(tiny_gqa_model_dir, root / "fp16", "float16")),
            "int4": (gptq, export_onnx(gptq, root / "int4", int4_accuracy_level=None)),
            "int4-act": (act, export_onnx(act, root / "int4-act", int4_accuracy_level=None)),
            "int4-level4": (gptq, export_onnx(gptq, root / "int4-level4"))}


def _batch(tokenizer, side: str):
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    if side == "none":  # equal lengths, no padding at all
        seqs = [seqs[0], seqs[0][::-1]]
    return seqs, pad_batch(seqs, tokenizer.pad_token_id, "right" if side == "none" else side)


@pytest.mark.parametrize("kind, side", [("float32", "left"), ("float32", "right"), ("float32", "none"),
                                        ("float16", "left"), ("float16", "right"), ("int4", "left"),
                                        ("int4", "right"), ("int4", "none"), ("int4-act", "left"),
                                        ("int4-level4", "left")])
def test_each_sequence_gets_its_values_alone(graphs, kind, side):
    reference, candidate = (load(folder) for folder in graphs[kind])
    seqs, (ids, mask) = _batch(candidate.tokenizer, side)
    got = candidate.values(ids, mask)
    atol, rtol, min_sqnr = TOLERANCE[kind]
    assert np.isfinite(got.numpy()).all()
    for row, seq in enumerate(seqs):
        with dequantized_linears(reference.runner.module):  # int4: float compute, as the graph
            alone = reference.values(torch.tensor([seq]))[0].numpy()
        ours = got[row][mask[row].bool()].numpy()
        assert sqnr_db(alone, ours) > min_sqnr, (kind, side, row)
        if atol is not None:
            np.testing.assert_allclose(ours, alone, atol=atol, rtol=rtol)
        if kind.startswith("int4"):  # the same graph on the sequence alone: padding changes nothing
            np.testing.assert_allclose(ours, candidate.values(torch.tensor([seq]))[0].numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["float32", "float16", "int4"])
def test_graph_uses_fused_operators(graphs, kind, tiny_gqa_model_dir):
    layers = json.loads((tiny_gqa_model_dir / "config.json").read_text())["num_hidden_layers"]
    folder = graphs[kind][1]
    graph = onnx.load(folder / "model.onnx", load_external_data=False)
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    assert counts["GroupQueryAttention"] == layers
    assert counts["SkipSimplifiedLayerNormalization"] == 2 * layers  # post-attention, next input / final norm
    linears = "MatMulNBits" if kind == "int4" else "MatMul"
    assert counts[linears] == 5 * layers + (0 if kind == "int4" else 1)  # qkv, o, gate, up, down (+ score)
    assert "Split" not in counts and "Where" in counts  # no copy of a fused gate/up; Where: the packing slots
    assert "Softmax" not in counts and "model.norm.weight" not in {t.name for t in graph.graph.initializer}
    options = read_manifest(folder).format_options
    assert options.get("matmul_nbits_accuracy_level", 0) == 0
    assert options["optimized"] is True and options["operator_counts"] == dict(sorted(counts.items()))


@pytest.mark.parametrize("kind", ["float32", "int4"])
def test_holes_and_all_padding_rows(graphs, kind):
    """Padding anywhere (a hole mid-sequence, both sides) and a row of padding only: real tokens get their
    values alone, and every output is finite."""
    reference, candidate = (load(folder) for folder in graphs[kind])
    seq = candidate.tokenizer(TEXTS[0])["input_ids"]
    ids = torch.tensor([[0, 0] + seq[:5] + [0, 0, 0] + seq[5:] + [0], [0] * (len(seq) + 6)])
    mask = (torch.arange(ids.shape[1]) >= 2) & (torch.arange(ids.shape[1]) < ids.shape[1] - 1)
    mask = torch.stack([mask, torch.zeros_like(mask)]).long()
    mask[0, 7:10] = 0
    got = candidate.runner.logits(ids, mask)[..., 0]
    assert torch.isfinite(got).all()
    with dequantized_linears(reference.runner.module):  # int4: float compute, as the graph
        alone = reference.values(torch.tensor([seq]))[0]
    torch.testing.assert_close(got[0][mask[0].bool()], alone, atol=1e-4, rtol=1e-4)


def test_act_order_gathers_copy_rows_and_skip_the_down_projection(graphs):
    """Act-order permutes activations as Transpose + Gather(axis 0) + Transpose (row copies, not ONNX Runtime's
    value-by-value last-axis Gather), and the down projection's permutation lives in the gate/up columns."""
    graph = onnx.load(graphs["int4-act"][1] / "model.onnx", load_external_data=False)
    gathers = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[1].endswith("_act_order")]
    assert gathers and all(helper.get_attribute_value(a) == 0 for n in gathers for a in n.attribute)
    assert not [n for n in gathers if "_down" in n.input[1]]
    producers = {out: n for n in graph.graph.node for out in n.output}
    assert all(producers[n.input[0]].op_type == "Transpose" for n in gathers)


def test_unfusable_head_dim_falls_back_to_plain(tmp_path):
    model = make_tiny_value_model(tmp_path / "odd", seed=2, hidden_size=96)  # head_dim 24: no GQA rotary
    folder = export_onnx(model, tmp_path / "onnx")
    assert read_manifest(folder).format_options["optimized"] is False
    ids = torch.tensor([[5, 9, 12, 40]])
    np.testing.assert_allclose(load(folder).values(ids), load(model).values(ids), atol=2e-5, rtol=1e-4)


def test_cli_no_optimize_keeps_the_plain_graph(tiny_model_dir, tmp_path):
    result = run_cli("export", tiny_model_dir, "--format", "onnx", "--no-optimize", "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    graph = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False)
    assert {o.domain for o in graph.opset_import} == {""}  # standard operators only: any ONNX runtime runs it
    assert read_manifest(tmp_path / "out").format_options["optimized"] is False


def test_int4_activations_default_to_int8_and_the_cli_can_keep_float(graphs, tmp_path):
    assert read_manifest(graphs["int4-level4"][1]).format_options["matmul_nbits_accuracy_level"] == 4
    gptq = graphs["int4"][0]
    result = run_cli("export", gptq, "--format", "onnx", "--float-activations", "--output", tmp_path / "float")
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "float").format_options["matmul_nbits_accuracy_level"] == 0
    graph = onnx.load(tmp_path / "float" / "model.onnx", load_external_data=False)
    levels = {helper.get_attribute_value(a) for n in graph.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == set()  # float compute: no accuracy_level attribute at all
