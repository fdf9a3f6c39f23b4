"""TensorRT engines from the TensorRT-bound ONNX (export/tensorrt_onnx.py), with TensorRT's Python API (10.x+).

``write_engine`` builds one from an ONNX folder whose parity on ONNX Runtime the caller has checked
(``vexport.export.tensorrt_chain`` runs export, check and build in that order). The steps, each one call of
the documented API:
1. the ONNX folder's parity summary is given (``vexport.check`` against its reference, run before), so the
   graph's numerics are known before TensorRT sees it;
2. ``trt.OnnxParser`` fills a STRONGLY_TYPED network (types come from the ONNX: float16 activations, INT4
   weights behind blocked DequantizeLinear), so no precision flags are set;
3. one optimization profile over (batch, sequence) for both inputs;
4. a timing cache: loaded from OUTPUT/timing.cache when OUTPUT already holds one, saved next to the engine;
5. ``build_serialized_network`` -> OUTPUT/model.engine; the engine's layer list (IEngineInspector) goes to
   OUTPUT/layers.json, and the GPU (name, compute capability) and TensorRT version into manifest.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vexport.artifact import OWNER_FILE
from vexport.backends.tensorrt_env import gpu_identity, require_tensorrt
from vexport.errors import VexportError
from vexport.export.common import copy_support_files
from vexport.export.graph.plain import INPUT_NAMES
from vexport.export.onnx import GRAPH_FILE
from vexport.manifest import Manifest, file_entry, library_versions, now_iso, read_manifest

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
LAYERS_FILE = "layers.json"
ONNX_SUBDIR = "onnx"


@dataclass(frozen=True)
class ShapeProfile:
    """(batch, sequence) at the profile's minimum, optimum and maximum."""

    min: tuple[int, int] = (1, 1)
    opt: tuple[int, int] = (8, 1024)
    max: tuple[int, int] = (16, 2048)

    def check(self, max_positions: int | None) -> None:
        for i, axis in enumerate(("batch", "sequence")):
            lo, mid, hi = self.min[i], self.opt[i], self.max[i]
            if not 1 <= lo <= mid <= hi:
                raise VexportError(f"shape profile {axis}: need 1 <= min {lo} <= opt {mid} <= max {hi}")
        if max_positions and self.max[1] > max_positions:
            raise VexportError(f"--max-shape sequence {self.max[1]} exceeds max_position_embeddings {max_positions}")


def write_engine(onnx_dir: Path, folder: Path, profile: ShapeProfile, parity: dict[str, Any],
                 timing_cache: bytes = b"") -> None:
    """Build the engine of the TensorRT-bound ONNX in ONNX_DIR into FOLDER (engine, timing cache, layer list,
    config, tokenizer, manifest). PARITY is the ONNX graph's parity summary, checked by the caller
    (``vexport.export.tensorrt_chain``), recorded in the manifest as ``onnx_parity``."""
    trt = require_tensorrt()
    onnx_manifest = read_manifest(onnx_dir)
    profile.check(onnx_manifest.model.get("max_position_embeddings"))
    plan, timing_cache = _build_plan(trt, onnx_dir / GRAPH_FILE, profile, timing_cache)
    (folder / ENGINE_FILE).write_bytes(plan)
    (folder / TIMING_CACHE_FILE).write_bytes(timing_cache)
    (folder / LAYERS_FILE).write_text(json.dumps(inspect_layers(_deserialize(trt, plan)), indent=1) + "\n")
    copy_support_files(onnx_dir, folder)
    _write_engine_manifest(folder, onnx_manifest, profile, parity, onnx_dir)


def _build_plan(trt, graph: Path, profile: ShapeProfile, cache: bytes) -> tuple[bytes, bytes]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VexportError(f"TensorRT could not parse {graph}: {errors}")
    config = builder.create_builder_config()
    shapes = builder.create_optimization_profile()
    for name in INPUT_NAMES:
        shapes.set_shape(name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(shapes)
    config.set_timing_cache(config.create_timing_cache(cache), ignore_mismatch=False)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names and fused ops in layers.json
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise VexportError(f"TensorRT failed to build an engine from {graph} (see the log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _deserialize(trt, plan: bytes):
    return trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)


def inspect_layers(engine) -> list[str]:
    """The engine's layers after fusion, by name (IEngineInspector): shows what the folded head became."""
    import tensorrt as trt

    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return [layer if isinstance(layer, str) else layer.get("Name", "") for layer in info.get("Layers", [])]


def _write_engine_manifest(folder: Path, onnx_manifest: Manifest, profile: ShapeProfile, parity: dict,
                           onnx_dir: Path) -> None:
    files = {p.name: file_entry(p, _role(p.name)) for p in sorted(folder.iterdir())
             if p.is_file() and p.name != OWNER_FILE}
    options = {"engine": ENGINE_FILE, "timing_cache": TIMING_CACHE_FILE, "layers": LAYERS_FILE,
               "onnx": ONNX_SUBDIR if onnx_dir.parent == folder else str(onnx_dir), "onnx_parity": parity, "strongly_typed": True,
               "profile": {"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)},
               "head": onnx_manifest.format_options.get("head"), **gpu_identity()}
    manifest = Manifest(format="tensorrt", precision=onnx_manifest.precision, source=onnx_manifest.source,
                        model=onnx_manifest.model, inputs=onnx_manifest.inputs, outputs=onnx_manifest.outputs,
                        files=files, format_options=options, versions=library_versions(), created=now_iso())
    manifest.write(folder)


def _role(name: str) -> str:
    if name in (ENGINE_FILE, TIMING_CACHE_FILE):
        return "model"
    return "tokenizer" if name.startswith(("tokenizer", "special_tokens", "chat_template")) else "config"
