"""One options object per export format: what ``vexport.export(model, output, format=..., options=...)`` takes.

Each holds the settings of its format and the policy that follows from them (e.g. int8 activations mean
MatMulNBits ``accuracy_level`` 4), so the CLI only builds one and the exporters get plain values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vexport.export.tensorrt import ShapeProfile
    from vexport.quant import stream


@dataclass(frozen=True)
class OnnxOptions:
    """``format="onnx"``: the graph for ONNX Runtime (or, with ``optimize=False``, any ONNX runtime)."""

    dtype: str = "float32"  # weights and activations: float32 or float16
    optimize: bool = True  # ONNX Runtime's fused graph; False: the plain opset-17 graph
    int8_activations: bool = True  # from a GPTQ folder: MatMulNBits with int8 activations, else float compute
    allow_pickle: bool = False  # load pickle (.bin) weights
    strict: bool = False  # refuse NaN or infinite weights (default: a warning naming the first)

    @property
    def int4_accuracy_level(self) -> int | None:
        """MatMulNBits' ``accuracy_level``: 4 (int8 activations, faster on CPU) or None (float compute)."""
        from vexport.export.onnx import INT4_ACCURACY_LEVEL

        return INT4_ACCURACY_LEVEL if self.int8_activations else None


@dataclass(frozen=True)
class GPTQOptions:
    """``format="gptq"``: streaming GPTQ on calibration text, value-aware calibration, a GPTQ v1 checkpoint."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    desc_act: bool = True  # act-order (g_idx)
    sym: bool = True  # symmetric grid
    value_calibration: bool = True  # fit each Linear to the float model's outputs, then refit the float16 head
    calibration: str | os.PathLike | None = None  # calibration JSONL (None: the built-in chat text)
    samples: int = 128  # calibration windows
    seq_len: int = 512  # tokens per window
    seed: int = 0
    device: str | None = None  # where GPTQ runs: cuda or cpu (None: cuda when there is one)
    allow_pickle: bool = False

    def solver(self) -> "stream.GPTQOptions":
        """The quantizer's own settings (``vexport.quant.stream.GPTQOptions``)."""
        from vexport.quant.stream import GPTQOptions as SolverOptions

        return SolverOptions(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act)


@dataclass(frozen=True)
class TensorRTOptions:
    """``format="tensorrt"``: TensorRT-bound ONNX, its ONNX Runtime parity check, then the engine.

    MODEL is a value model, a GPTQ folder (int4 weights) or a TensorRT-bound ONNX folder. ``int4`` need not be
    given: None follows the model (a GPTQ folder is int4); True or False must match it."""

    profile: "ShapeProfile | None" = None  # (batch, sequence) min/opt/max; None: ShapeProfile()'s defaults
    fp16: bool = True  # float16 activations
    int4: bool | None = None
    reference: str | os.PathLike | None = None  # the model the ONNX is checked against (None: MODEL)


FORMATS = {"onnx": OnnxOptions, "gptq": GPTQOptions, "tensorrt": TensorRTOptions}
