"""ONNX export: graph from the config, weights streamed tensor by tensor into external data.

Host memory stays near the largest single tensor (plus its transposed copy), not the whole model: each
tensor is read from its safetensors shard, cast, transposed if it is a Linear weight, appended to
``model.onnx.data`` and freed before the next one is read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import torch

from vexport.artifact import check_output, staging_dir
from vexport.errors import VexportError
from vexport.export.common import copy_support_files, write_manifest
from vexport.export.graph.contrib import add_contrib_opset
from vexport.export.graph.fused import build_fused_graph, fusable
from vexport.export.graph.int4_ort import MatMulNBitsEmitter
from vexport.export.graph.plain import INPUT_NAMES, OPSET, OUTPUT_NAME, WeightSpec, build_graph
from vexport.export.graph.weights import tensor_reader, write_weights
from vexport.model import ModelSource, open_model
from vexport.quant.checkpoint import is_gptq_config

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16}
# MatMulNBits accuracy_level of the optimized int4 graph. 4: ONNX Runtime's CPU kernel multiplies int8-quantized
# activations (per token and block) with the int4 codes, 1.6x the float-compute speed at 1x64 on the project's
# 2-core CPU (scripts/bench_onnx_cpu.py), and keeps the GPTQ export's fidelity (trained SmolLM2-135M value model,
# built-in evaluation set: 10.94 dB against the float reference, 11.16 dB with float compute, 5.24 dB for
# round-to-nearest). None: float compute, the checkpoint's exact numerics (106 dB against the int4 torch runtime).
# CUDA ignores the attribute.
INT4_ACCURACY_LEVEL: int | None = 4


def export_onnx(model: str | os.PathLike, output: str | os.PathLike, dtype: str = "float32", *,
                optimize: bool = True, int4_accuracy_level: int | None = INT4_ACCURACY_LEVEL, force: bool = False,
                allow_pickle: bool = False, progress: bool = False) -> Path:
    """Export a value model to OUTPUT/model.onnx (+ external data, config, tokenizer, manifest.json).

    ``optimize`` (the default) writes ONNX Runtime's fused graph (export/graph/fused.py); ``optimize=False`` the
    plain opset-17 graph that any ONNX runtime runs. ``int4_accuracy_level`` is MatMulNBits' ``accuracy_level`` in
    the optimized int4 graph (4, the default: int8 activations on CPU; None: float compute, the checkpoint's exact
    numerics)."""
    if dtype not in _TORCH_DTYPE:
        raise VexportError(f"--dtype {dtype} is not supported for onnx (choose float32 or float16)")
    output = Path(output)
    check_output(output, force)
    source = open_model(model, allow_pickle=allow_pickle)
    reason = fusable(source.config) if optimize else None
    if reason:
        log.warning("writing the plain ONNX graph: %s", reason)
    optimized = optimize and reason is None
    # --- int4: a GPTQ source folder gives MatMulNBits Linears (export/graph/int4_ort.py); the plain graph computes
    # them in float, as the runtimes that run it do ---
    level = int4_accuracy_level if optimized else None
    int4 = MatMulNBitsEmitter(source, level) if is_gptq_config(source.config) else None
    graph, weights = _build(source, dtype, int4, optimized)
    precision, options = dtype, _format_options(graph, optimized)
    if int4 is not None:
        add_contrib_opset(graph)
        precision, options = "int4", {**options, **int4.format_options(dtype)}
    # --- end int4 ---
    with staging_dir(output, force) as tmp:
        write_weights(graph, weights, tensor_reader(source), tmp / DATA_FILE, dtype, progress)
        onnx.save_model(graph, tmp / GRAPH_FILE)
        onnx.checker.check_model(str(tmp / GRAPH_FILE))
        copy_support_files(source.path, tmp)
        write_manifest(tmp, "onnx", precision, source, _io_spec(), options, progress)
    log.info("wrote %s", output)
    return output


def _io_spec() -> tuple[list[dict], list[dict]]:
    inputs = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in INPUT_NAMES]
    outputs = [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", "sequence", 1]}]
    return inputs, outputs


def _build(source: ModelSource, dtype: str, int4: MatMulNBitsEmitter | None,
           optimized: bool) -> tuple[onnx.ModelProto, list[WeightSpec]]:
    """The fused graph (``optimized``) or the plain one."""
    if optimized:
        return build_fused_graph(source.config, dtype, source.score_has_bias, linears=int4)
    return build_graph(source.config, dtype, source.score_has_bias, linear=int4)


def _format_options(graph: onnx.ModelProto, optimized: bool) -> dict:
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"graph": GRAPH_FILE, "external_data": DATA_FILE, "opset": OPSET, "optimized": optimized,
            "runtime": "onnxruntime" if optimized else "any", "operator_counts": dict(sorted(ops.items()))}
