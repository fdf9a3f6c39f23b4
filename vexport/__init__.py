"""vexport: export RLHF value models to fast formats and prove the values did not change.

The public verbs: ``load`` (any artifact or Hugging Face value model), ``export_onnx``, ``export_gptq``,
``check`` and ``check_many``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_VERBS = {"load": "vexport.runtime", "export_onnx": "vexport.export.onnx", "export_gptq": "vexport.export.gptq",
          "check": "vexport.checker", "check_many": "vexport.checker"}

__all__ = ["__version__", *_VERBS]


def __getattr__(name: str):
    """Import a verb's module only when it is used, so `import vexport` stays light."""
    if name in _VERBS:
        return getattr(importlib.import_module(_VERBS[name]), name)
    raise AttributeError(f"module 'vexport' has no attribute {name!r}")
