"""The TensorRT chain: TensorRT-bound ONNX -> its parity check on ONNX Runtime -> the engine.

``build_engine`` exports the ONNX TensorRT will parse (``export/tensorrt_onnx.py``; or takes an existing
TensorRT-bound ONNX folder), checks it against its reference with ``vexport.check`` (a failure stops here:
no engine is built from a graph whose numerics are wrong), then has ``export/tensorrt.py`` build the engine
with that parity summary. It sits above both the checker and the engine writer, which know nothing of each
other.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vexport.artifact import check_output, staging_dir
from vexport.backends.tensorrt_env import require_tensorrt
from vexport.errors import VexportError
from vexport.export.tensorrt import ONNX_SUBDIR, TIMING_CACHE_FILE, ShapeProfile, write_engine
from vexport.manifest import MANIFEST_NAME, read_manifest

log = logging.getLogger(__name__)


def build_engine(model_or_onnx: str | os.PathLike, output: str | os.PathLike, *, profile: ShapeProfile = ShapeProfile(),
                 fp16: bool = True, int4: bool | None = False, reference: str | os.PathLike | None = None,
                 force: bool = False, progress: bool = False) -> Path:
    """Build OUTPUT/model.engine from a value model, a GPTQ folder (int4) or a TensorRT-bound ONNX folder.

    ``int4`` must match MODEL (a GPTQ folder, or an int4 TensorRT-bound ONNX); None takes it from MODEL."""
    require_tensorrt()
    profile.check(None)  # the order of the shapes now; max_position_embeddings once the config is read
    output = Path(output)
    check_output(output, force, inputs=(model_or_onnx, reference))
    cache = (output / TIMING_CACHE_FILE).read_bytes() if (output / TIMING_CACHE_FILE).is_file() else b""
    with staging_dir(output, force) as tmp:
        onnx_dir, reference = _trt_onnx(model_or_onnx, tmp / ONNX_SUBDIR, fp16, int4, reference, progress)
        profile.check(read_manifest(onnx_dir).model.get("max_position_embeddings"))
        write_engine(onnx_dir, tmp, profile, check_onnx(onnx_dir, reference, progress), cache)
    log.info("wrote the TensorRT engine to %s", output)
    return output


def _trt_onnx(model, folder: Path, fp16: bool, int4: bool | None, reference, progress: bool) -> tuple[Path, Any]:
    """An existing TensorRT-bound ONNX folder as it is, else the one exported from MODEL into FOLDER."""
    from vexport.export.tensorrt_onnx import export_tensorrt_onnx
    from vexport.quant.checkpoint import is_gptq_config

    path = Path(model)
    if (path / MANIFEST_NAME).is_file() and read_manifest(path).format == "onnx":
        manifest = read_manifest(path)
        if manifest.format_options.get("target") != "tensorrt":
            raise VexportError(f"{path} is an ONNX export for ONNX Runtime; pass the value model (or a GPTQ "
                               "folder for --int4) so the TensorRT-bound graph is exported")
        if int4 is not None and int4 != (manifest.precision == "int4"):
            raise VexportError(f"{path} has precision {manifest.precision}, which does not match --int4={int4}")
        return path, reference or manifest.source.get("model")
    from vexport.model import open_model

    gptq = is_gptq_config(open_model(model).config)
    if int4 is not None and int4 != gptq:
        raise VexportError(f"--int4 needs a GPTQ folder (vexport export --format gptq) and a GPTQ folder needs "
                           f"--int4; {model} does not match")
    dtype = "float16" if fp16 or gptq else "float32"
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
