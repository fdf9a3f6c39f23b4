"""The TensorRT-bound ONNX: the plain graph at opset 21 with a folded score head (and blocked INT4 for GPTQ).

ONNX Runtime runs this folder like any ONNX artifact (format "onnx", ``format_options.target: tensorrt``), so
its numerics are checked with ``vexport check`` before TensorRT ever sees it (export/tensorrt.py).

- float16 / float32: the plain graph (export/graph/plain.py) in that dtype.
- int4 (a GPTQ folder): every decoder Linear is a blocked INT4 ``DequantizeLinear`` + ``MatMul``
  (export/graph/int4_trt.py), float16 activations.
- Folded head: ``RMSNorm(x) @ score`` is computed as ``(x @ (norm_weight * score)) * rsqrt(mean(x^2) + eps)``
  in float32 (+ bias), so the normalised hidden states ``[B, T, H]`` are never a tensor of the graph: only the
  row statistic ``[B, T, 1]`` and the dot product ``[B, T, 1]`` are.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from vexport.artifact import check_output, staging_dir
from vexport.errors import VexportError
from vexport.export.common import copy_support_files, value_io_spec, write_manifest
from vexport.export.graph.int4_trt import BlockedDequantEmitter
from vexport.export.graph.plain import build_graph
from vexport.export.graph.weights import folded_score, tensor_reader, write_weights
from vexport.export.onnx import DATA_FILE, GRAPH_FILE
from vexport.model import open_model
from vexport.quant.checkpoint import is_gptq_config

log = logging.getLogger(__name__)

TRT_OPSET = 21  # blocked DequantizeLinear with INT4 (block_size attribute)
TRT_IR_VERSION = 10  # INT4 tensors
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16}


def export_tensorrt_onnx(model: str | os.PathLike, output: str | os.PathLike, dtype: str = "float16", *,
                         force: bool = False, progress: bool = False) -> Path:
    """Write the TensorRT-bound ONNX of MODEL (a value model, or a GPTQ folder for int4) to OUTPUT."""
    if dtype not in _TORCH_DTYPE:
        raise VexportError(f"dtype {dtype} is not supported for the TensorRT-bound ONNX (float32 or float16)")
    output = Path(output)
    check_output(output, force, inputs=(model,))
    source = open_model(model)
    int4 = BlockedDequantEmitter(source) if is_gptq_config(source.config) else None
    graph, weights = build_graph(source.config, dtype, source.score_has_bias, linear=int4, head=folded_head)
    upgrade_to_opset21(graph)
    with staging_dir(output, force) as tmp:
        write_weights(graph, weights, tensor_reader(source), tmp / DATA_FILE, dtype, progress)
        onnx.save_model(graph, tmp / GRAPH_FILE)
        onnx.checker.check_model(str(tmp / GRAPH_FILE))
        copy_support_files(source.path, tmp)
        options = _format_options(graph, dtype, int4)
        write_manifest(tmp, "onnx", "int4" if int4 else dtype, source, value_io_spec(), options, progress)
    log.info("wrote the TensorRT-bound ONNX to %s", output)
    return output


def folded_head(b, hidden: str, config, score_bias: bool) -> str:
    """float32 logits ``(x @ (w * score)) * rsqrt(mean(x^2) + eps) (+ bias)``: no normalised [B, T, H] tensor."""
    x32 = b.op("Cast", hidden, to=TensorProto.FLOAT)
    var = b.op("ReduceMean", b.op("Mul", x32, x32), axes=[-1], keepdims=1)
    eps = b.const("head_eps", np.array(config.rms_norm_eps, np.float32))
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, eps)))
    dot = b.op("MatMul", x32, b.weight("score_folded", "score.weight", make=folded_score))
    logits = b.op("Mul", dot, inv)
    if score_bias:
        logits = b.op("Add", logits, b.weight("score_bias_f32", "score.bias",
                                              make=lambda read: read("score.bias").float().numpy()))
    return logits


def upgrade_to_opset21(model: onnx.ModelProto) -> None:
    """Opset 17 -> 21 for the ops the graph uses: only Reduce* changed (axes became an input in opset 18)."""
    for node in model.graph.node:
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if node.op_type.startswith("Reduce") and axes is not None:
            name = f"{node.name}_axes"
            model.graph.initializer.append(numpy_helper.from_array(np.array(axes.ints, np.int64), name))
            node.input.append(name)
            node.attribute.remove(axes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = TRT_OPSET
    model.ir_version = TRT_IR_VERSION


def _format_options(graph: onnx.ModelProto, dtype: str, int4: BlockedDequantEmitter | None) -> dict:
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    options = {"graph": GRAPH_FILE, "external_data": DATA_FILE, "opset": TRT_OPSET, "optimized": False,
               "target": "tensorrt", "head": "folded", "activation_dtype": dtype,
               "operator_counts": dict(sorted(ops.items()))}
    return {**options, **int4.format_options(dtype)} if int4 else options
