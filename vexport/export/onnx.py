"""ONNX export: graph from the config, weights streamed tensor by tensor into external data.

Host memory stays near the largest single tensor (plus its transposed copy), not the whole model: each
tensor is read from its safetensors shard, cast, transposed if it is a Linear weight, appended to
``model.onnx.data`` and freed before the next one is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
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
                allow_pickle: bool = False, strict: bool = False, progress: bool = False) -> Path:
    """Export a value model to OUTPUT/model.onnx (+ external data, config, tokenizer, manifest.json).

    ``optimize`` (the default) writes ONNX Runtime's fused graph (export/graph/fused.py); ``optimize=False`` the
    plain opset-17 graph that any ONNX runtime runs. ``int4_accuracy_level`` is MatMulNBits' ``accuracy_level`` in
    the optimized int4 graph (4, the default: int8 activations on CPU; None: float compute, the checkpoint's exact
    numerics). NaN or infinite weights are logged as a warning naming the first such tensor; ``strict`` refuses
    them (nothing is written)."""
    if dtype not in _TORCH_DTYPE:
        raise VexportError(f"--dtype {dtype} is not supported for onnx (choose float32 or float16)")
    output = Path(output)
    check_output(output, force, inputs=(model,))
    source = open_model(model, allow_pickle=allow_pickle)
    reason = fusable(source.config) if optimize else None
    if reason:
        log.warning("writing the plain ONNX graph: %s", reason)
    optimized = optimize and reason is None
    # A GPTQ source folder gives MatMulNBits Linears (export/graph/int4_ort.py); the plain graph computes them in
    # float, as the runtimes that run it do.
    level = int4_accuracy_level if optimized else None
    int4 = MatMulNBitsEmitter(source, level) if is_gptq_config(source.config) else None
    graph, weights = _build(source, dtype, int4, optimized)
    precision, options = dtype, _format_options(graph, optimized)
    if int4 is not None:
        add_contrib_opset(graph)
        precision, options = "int4", {**options, **int4.format_options(dtype)}
    finite = FiniteCheck(tensor_reader(source), source.path, strict)
    if strict and not source.pickle:  # refused before anything is written
        finite.scan(sorted(source.tensors), dtype)
    with staging_dir(output, force) as tmp:
        write_weights(graph, weights, finite, tmp / DATA_FILE, dtype, progress, finite.written)
        onnx.save_model(graph, tmp / GRAPH_FILE)
        onnx.checker.check_model(str(tmp / GRAPH_FILE))
        copy_support_files(source.path, tmp)
        write_manifest(tmp, "onnx", precision, source, _io_spec(), options, progress)
    finite.report()
    log.info("wrote %s", output)
    return output


class FiniteCheck:
    """A tensor reader that notes (or, ``strict``, refuses) NaN and infinite values: in the checkpoint's tensors as
    read, and in the arrays written (a float16 cast can overflow to inf)."""

    def __init__(self, read: Callable[[str], torch.Tensor], folder: Path, strict: bool):
        self.read, self.folder, self.strict = read, folder, strict
        self.bad: list[tuple[str, str]] = []  # (tensor, what is wrong with it)

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.read(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            self._found(name)
        return tensor

    def scan(self, names: list[str], dtype: str) -> None:
        """Read every tensor in NAMES and check it, and that its cast to DTYPE stays finite."""
        limit = torch.finfo(_TORCH_DTYPE[dtype]).max
        for name in names:
            tensor = self(name)
            if tensor.is_floating_point() and tensor.numel() and float(tensor.abs().max()) > limit:
                self._found(name, f"has values beyond the {dtype} range (infinite once cast)")

    def written(self, spec: WeightSpec, array) -> None:
        if isinstance(array, np.ndarray) and array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
            self._found(spec.source, f"holds NaN or infinite values as written in {array.dtype}")

    def _found(self, name: str, why: str = "holds NaN or infinite values") -> None:
        if self.strict:
            raise VexportError(f"{self.folder}: tensor {name} {why} (refused under --strict)")
        if name not in [bad for bad, _ in self.bad]:
            self.bad.append((name, why))

    def report(self) -> None:
        if self.bad:
            more = f" (and {len(self.bad) - 1} more tensors)" if len(self.bad) > 1 else ""
            log.warning("%s: tensor %s %s%s; exported as is (--strict refuses)", self.folder, *self.bad[0], more)


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
