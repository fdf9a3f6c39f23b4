"""The reference backend: the Hugging Face model itself, run with position ids that follow the mask."""

from __future__ import annotations

from vexport.backends.base import ModuleRunner
from vexport.batching import position_ids

__all__ = ["TorchRunner", "position_ids"]


class TorchRunner(ModuleRunner):
    """Runs a transformers ``*ForTokenClassification`` module; returns logits [B, T, 1] on its device.

    ``values`` goes through ``vexport.head.ValueHead``: on CUDA (with triton) the final norm and the score
    are one fused kernel, and ``index`` scores only the tokens asked for.
    """

    name = "torch"
