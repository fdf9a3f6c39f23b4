"""TensorRT engines from the TensorRT-bound ONNX (export/onnx_trt.py), with TensorRT's Python API (10.x+).

The steps, each one call of the documented API:
1. the ONNX folder is checked on ONNX Runtime against its reference (``vexport.check``), so the graph's
   numerics are known before TensorRT sees it;
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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vexport.artifact import OWNER_FILE, check_output, staging_dir
from vexport.errors import MissingDependencyError, VexportError
from vexport.export.common import copy_support_files
from vexport.export.onnx import GRAPH_FILE
from vexport.export.onnx_graph import INPUT_NAMES
from vexport.manifest import MANIFEST_NAME, Manifest, file_entry, library_versions, now_iso, read_manifest

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
LAYERS_FILE = "layers.json"
ONNX_SUBDIR = "onnx"
INSTALL_HINT = "pip install 'vexport[tensorrt]' (TensorRT 10 or newer) on a machine with an NVIDIA GPU and CUDA"


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


def parse_shape(text: str, flag: str) -> tuple[int, int]:
    """'B,T' -> (B, T)."""
    try:
        batch, seq = (int(part) for part in text.split(","))
    except ValueError:
        raise VexportError(f"{flag} must be BATCH,SEQUENCE (two integers), got {text!r}") from None
    return batch, seq


def require_tensorrt():
    """The tensorrt module, or a one-line MissingDependencyError saying what is missing and how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(f"TensorRT is not installed (import tensorrt failed): {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or int(str(trt.__version__).split(".")[0]) < 10:
        raise MissingDependencyError(f"tensorrt {getattr(trt, '__version__', '?')} is not TensorRT 10+: {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(f"TensorRT needs a CUDA GPU and torch sees none: {INSTALL_HINT}")
    return trt


def gpu_identity(device_index: int = 0) -> dict[str, str]:
    """What an engine is tied to: the GPU's name and compute capability, and the TensorRT version."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}",
            "tensorrt_version": trt.__version__}


def build_engine(model_or_onnx: str | os.PathLike, output: str | os.PathLike, *, profile: ShapeProfile = ShapeProfile(),
                 fp16: bool = True, int4: bool = False, reference: str | os.PathLike | None = None,
                 force: bool = False, progress: bool = False) -> Path:
    """Build OUTPUT/model.engine from a value model, a GPTQ folder (int4) or a TensorRT-bound ONNX folder."""
    trt = require_tensorrt()
    profile.check(None)  # the order of the shapes now; max_position_embeddings once the config is read
    output = Path(output)
    check_output(output, force, inputs=(model_or_onnx, reference))
    cache = (output / TIMING_CACHE_FILE).read_bytes() if (output / TIMING_CACHE_FILE).is_file() else b""
    with staging_dir(output, force) as tmp:
        onnx_dir, reference = _trt_onnx(model_or_onnx, tmp / ONNX_SUBDIR, fp16, int4, reference, progress)
        onnx_manifest = read_manifest(onnx_dir)
        profile.check(onnx_manifest.model.get("max_position_embeddings"))
        parity = check_onnx(onnx_dir, reference, progress)
        plan, cache = _build_plan(trt, onnx_dir / GRAPH_FILE, profile, cache)
        (tmp / ENGINE_FILE).write_bytes(plan)
        (tmp / TIMING_CACHE_FILE).write_bytes(cache)
        (tmp / LAYERS_FILE).write_text(json.dumps(inspect_layers(_deserialize(trt, plan)), indent=1) + "\n")
        copy_support_files(onnx_dir, tmp)
        _write_engine_manifest(tmp, onnx_manifest, profile, parity, onnx_dir)
    log.info("wrote the TensorRT engine to %s", output)
    return output


def _trt_onnx(model, folder: Path, fp16: bool, int4: bool, reference, progress: bool) -> tuple[Path, Any]:
    """An existing TensorRT-bound ONNX folder as it is, else the one exported from MODEL into FOLDER."""
    from vexport.export.onnx_trt import export_tensorrt_onnx
    from vexport.quant.checkpoint import is_gptq_config

    path = Path(model)
    if (path / MANIFEST_NAME).is_file() and read_manifest(path).format == "onnx":
        manifest = read_manifest(path)
        if manifest.format_options.get("target") != "tensorrt":
            raise VexportError(f"{path} is an ONNX export for ONNX Runtime; pass the value model (or a GPTQ "
                               "folder for --int4) so the TensorRT-bound graph is exported")
        if int4 != (manifest.precision == "int4"):
            raise VexportError(f"{path} has precision {manifest.precision}, which does not match --int4={int4}")
        return path, reference or manifest.source.get("model")
    from vexport.model import open_model

    if int4 != is_gptq_config(open_model(model).config):
        raise VexportError(f"--int4 needs a GPTQ folder (vexport export --format gptq) and a GPTQ folder needs "
                           f"--int4; {model} does not match")
    dtype = "float16" if fp16 or int4 else "float32"
    return export_tensorrt_onnx(model, folder, dtype, progress=progress), reference or model


def check_onnx(onnx_dir: Path, reference, progress: bool = False) -> dict[str, Any]:
    """The parity check on ONNX Runtime of the graph TensorRT will parse; a failure stops the build."""
    from vexport.checker import check

    if reference is None or not Path(str(reference)).exists():
        raise VexportError(f"no reference model for the ONNX Runtime check of {onnx_dir} (pass --reference)")
    outcome = check(onnx_dir, reference, device=_ort_device(), progress=progress)
    if not outcome.result.passed:
        raise VexportError(f"the TensorRT-bound ONNX {onnx_dir} fails its ONNX Runtime parity check against "
                           f"{reference}: {'; '.join(outcome.result.failures)}; no engine was built")
    return outcome.result.summary()


def _ort_device() -> str:
    """cuda where ONNX Runtime has its CUDA provider (onnxruntime-gpu), else cpu (slow for large models)."""
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


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
