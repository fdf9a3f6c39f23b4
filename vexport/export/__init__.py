"""Exporters, one per format, and the export verb over them.

    vexport.export("runs/tiny", "runs/tiny-onnx", format="onnx", options=vexport.OnnxOptions(dtype="float16"))
    vexport.export("runs/tiny", "runs/tiny-gptq", options=vexport.GPTQOptions(group_size=32, samples=16))

``format`` is "onnx", "gptq" or "tensorrt" (by default the one ``options`` is for, else "onnx"); ``options``
is that format's options object (``vexport.export.options``; None: its defaults). Every format writes the
folder to a temporary sibling and renames it when complete; the result is OUTPUT.

This package is callable: ``vexport.export(...)`` is ``vexport.export.export(...)``, whichever of the two
``vexport.export`` names (the verb, or this package once a submodule is imported).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

from vexport.errors import InputError
from vexport.export.options import FORMATS, GPTQOptions, OnnxOptions, TensorRTOptions

__all__ = ["GPTQOptions", "OnnxOptions", "TensorRTOptions", "export"]

Options = OnnxOptions | GPTQOptions | TensorRTOptions


def export(model: str | os.PathLike, output: str | os.PathLike, format: str | None = None,
           options: Options | None = None, *, force: bool = False, progress: bool = False) -> Path:
    """Export MODEL (a value model folder or hub id; a GPTQ folder for onnx and tensorrt) to OUTPUT."""
    format, options = _resolve(format, options)
    if isinstance(options, OnnxOptions):
        from vexport.export.onnx import export_onnx

        return export_onnx(model, output, options.dtype, optimize=options.optimize, force=force,
                           allow_pickle=options.allow_pickle, int4_accuracy_level=options.int4_accuracy_level,
                           strict=options.strict, progress=progress)
    if isinstance(options, GPTQOptions):
        from vexport.export.gptq import export_gptq

        return export_gptq(model, output, options.solver(), value_calibration=options.value_calibration,
                           calibration=options.calibration, samples=options.samples, seq_len=options.seq_len,
                           seed=options.seed, device=options.device, force=force, allow_pickle=options.allow_pickle,
                           progress=progress, bits_budget=options.bits_budget)
    from vexport.export.tensorrt_chain import build_engine

    return build_engine(model, output, profile=options.profile, fp16=options.fp16,
                        int4=options.int4, reference=options.reference, force=force, progress=progress)


def _resolve(format: str | None, options: Options | None) -> tuple[str, Options]:
    """The format and its options: either may be left out; given both, they must agree."""
    by_type = {cls: name for name, cls in FORMATS.items()}
    if options is not None and type(options) not in by_type:
        raise InputError(f"options must be one of {', '.join(c.__name__ for c in by_type)}, "
                         f"got {type(options).__name__}")
    format = format if format is not None else by_type.get(type(options), "onnx")
    if format not in FORMATS:
        raise InputError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if options is None:
        return format, FORMATS[format]()
    if by_type[type(options)] != format:
        raise InputError(f"format {format} takes {FORMATS[format].__name__}, not {type(options).__name__}")
    return format, options


class _CallablePackage(types.ModuleType):
    """The type of this package: calling it runs ``export``."""

    def __call__(self, *args, **kwargs) -> Path:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
