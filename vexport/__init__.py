"""vexport: export RLHF value models to fast formats and prove the values did not change.

The public verbs: ``load`` (any artifact or Hugging Face value model), ``export`` (with ``OnnxOptions``,
``GPTQOptions`` or ``TensorRTOptions``), ``check`` and ``check_many``, ``score``; and the per-format
``export_onnx`` and ``export_gptq``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_VERBS = {"load": "vexport.runtime", "export_onnx": "vexport.export.onnx", "export_gptq": "vexport.export.gptq",
          "check": "vexport.checker", "check_many": "vexport.checker", "score": "vexport.scoring",
          "OnnxOptions": "vexport.export.options", "GPTQOptions": "vexport.export.options",
          "TensorRTOptions": "vexport.export.options"}

__all__ = ["__version__", "export", *_VERBS]


def __getattr__(name: str):
    """Import a verb's module only when it is used, so `import vexport` stays light."""
    if name == "export":  # the package vexport.export is callable: vexport.export(model, output, format=...)
        return importlib.import_module("vexport.export")
    if name in _VERBS:
        return getattr(importlib.import_module(_VERBS[name]), name)
    raise AttributeError(f"module 'vexport' has no attribute {name!r}")
