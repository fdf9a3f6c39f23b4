"""One options object per export format: what ``vexport.export(model, output, format=..., options=...)`` takes.

Each holds the settings of its format and the policy that follows from them (e.g. int8 activations mean
MatMulNBits ``accuracy_level`` 4), so the exporters get plain values. Every field carries its help text (and,
where the rule does not give it, its flag), and ``vexport export`` makes one flag per field from them, as
transformers' HfArgumentParser does: a setting is written once, here, and the CLI cannot drift from the API.
The flag of ``seq_len`` is ``--seq-len``; a bool defaulting to True is ``--x/--no-x``, to False ``--x``.
"""

from __future__ import annotations

import os
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from vexport.errors import InputError, VexportError

if TYPE_CHECKING:
    from vexport.export.tensorrt import ShapeProfile
    from vexport.quant import stream


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
            cli_type: type | None = None) -> Any:
    """A field of an options class with what ``vexport export`` needs to show it as a flag: HELP, and FLAG
    (click's declaration, e.g. "--a/--b") or CHOICES or CLI_TYPE (the flag's type, where the default's type
    is not it, e.g. None) where the rule does not give them."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli_type": cli_type})


@dataclass(frozen=True)
class OnnxOptions:
    """``format="onnx"``: the graph for ONNX Runtime (or, with ``optimize=False``, any ONNX runtime)."""

    dtype: str = setting("float32", "weight/activation dtype.", choices=("float32", "float16"))
    optimize: bool = setting(True, "ONNX Runtime's fused graph (default), or the plain opset-17 graph any "
                             "runtime runs.")
    int8_activations: bool = setting(True, "from a GPTQ folder: int8 activations in MatMulNBits (default; "
                                     "faster on CPU, 0.2 dB of added error on a trained 135M model) or float "
                                     "compute (the checkpoint's exact numerics).",
                                     flag="--int8-activations/--float-activations")
    allow_pickle: bool = setting(False, "load pickle (.bin) weights.")
    strict: bool = setting(False, "refuse NaN or infinite weights (default: a warning naming the first).")

    @property
    def int4_accuracy_level(self) -> int | None:
        """MatMulNBits' ``accuracy_level``: 4 (int8 activations, faster on CPU) or None (float compute)."""
        from vexport.export.onnx import INT4_ACCURACY_LEVEL

        return INT4_ACCURACY_LEVEL if self.int8_activations else None


@dataclass(frozen=True)
class GPTQOptions:
    """``format="gptq"``: streaming GPTQ on calibration text, value-aware calibration, a GPTQ v1 checkpoint."""

    bits: int = setting(4, "bits per weight (4).")
    group_size: int = setting(128, "group size, -1 per channel.")
    desc_act: bool = setting(True, "act-order (g_idx).")
    sym: bool = setting(True, "symmetric grid.")
    value_calibration: bool = setting(True, "fit each Linear to the float model's outputs and refit the fp16 "
                                      "head.")
    calibration: str | os.PathLike | None = setting(None, "calibration JSONL (default: the built-in chat text).",
                                                    cli_type=os.PathLike)
    samples: int = setting(128, "calibration windows.")
    seq_len: int = setting(512, "tokens per window.")
    seed: int = setting(0, "order of the calibration items (the windows cut from them).")
    device: str | None = setting(None, "where GPTQ runs: cuda or cpu (default: cuda when there is one).",
                                 cli_type=str)
    allow_pickle: bool = setting(False, "load pickle (.bin) weights.")
    dynamic: Any = setting(None, "per-module plan: a JSON file of GPTQModel `dynamic` overrides ('+:REGEX': "
                           "{bits, group_size}, '-:REGEX': {} left float16), matched on full module names.",
                           cli_type=os.PathLike)
    bits_budget: float | None = setting(None, "average stored bits per decoder Linear weight (4-bit g128 is "
                                        "4.16): 8-bit g32 where the value sensitivity pays most per bit.",
                                        cli_type=float)

    def solver(self) -> "stream.GPTQOptions":
        """The quantizer's own settings (``vexport.quant.stream.GPTQOptions``); ``dynamic`` read and checked."""
        from vexport.quant.dynamic import load_dynamic
        from vexport.quant.stream import GPTQOptions as SolverOptions

        return SolverOptions(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act,
                             dynamic=load_dynamic(self.dynamic))


Shape = "tuple[int, int] | str"  # (batch, sequence), or "BATCH,SEQUENCE" as the flags spell it (kept as a tuple)


@dataclass(frozen=True)
class TensorRTOptions:
    """``format="tensorrt"``: TensorRT-bound ONNX, its ONNX Runtime parity check, then the engine.

    MODEL is a value model, a GPTQ folder (int4 weights) or a TensorRT-bound ONNX folder. ``int4`` need not be
    given: None follows the model (a GPTQ folder is int4); True or False must match it."""

    min_shape: Shape = setting((1, 1), "smallest BATCH,SEQUENCE.")
    opt_shape: Shape = setting((8, 1024), "BATCH,SEQUENCE tuned for.")
    max_shape: Shape = setting((16, 2048), "largest BATCH,SEQUENCE.")
    fp16: bool = setting(True, "float16 activations.")
    int4: bool | None = setting(None, "int4 weights from a GPTQ folder (default: follow MODEL).",
                                flag="--int4/--no-int4", cli_type=bool)
    reference: str | os.PathLike | None = setting(None, "model for the ONNX check (default: MODEL).", cli_type=str)

    def __post_init__(self):  # a shape given as text ("8,1024", as the flags take it) is parsed here
        for f in (f for f in fields(self) if f.name.endswith("_shape")):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, parse_shape(value, flag_of(f)) if isinstance(value, str) else tuple(value))

    @property
    def profile(self) -> "ShapeProfile":
        from vexport.export.tensorrt import ShapeProfile

        return ShapeProfile(self.min_shape, self.opt_shape, self.max_shape)


def parse_shape(text: str, flag: str) -> tuple[int, int]:
    """'B,T' -> (B, T); anything else is an error naming FLAG."""
    try:
        batch, seq = (int(part) for part in text.split(","))
    except ValueError:
        raise VexportError(f"{flag} must be BATCH,SEQUENCE (two integers), got {text!r}") from None
    return batch, seq


FORMATS = {"onnx": OnnxOptions, "gptq": GPTQOptions, "tensorrt": TensorRTOptions}


def flag_of(f: Field) -> str:
    """The flag of options field F as ``vexport export`` declares it: its own (``--a/--b``), else ``--x/--no-x``
    for a bool defaulting to True, else ``--x``."""
    name = "--" + f.name.replace("_", "-")
    return f.metadata["flag"] or (f"{name}/--no-{name[2:]}" if f.default is True else name)


def options_for(format: str, settings: dict[str, Any]) -> OnnxOptions | GPTQOptions | TensorRTOptions:
    """FORMAT's options object from SETTINGS, a flat dict of every format's fields (what the CLI collects; None:
    not given, the field's default): the fields FORMAT's class has are taken; another format's field set to other
    than its default is refused by its flag (``--group-size`` on an ONNX export would silently do nothing)."""
    cls = FORMATS[format]
    own = {f.name for f in fields(cls)}
    settings = {name: value for name, value in settings.items() if value is not None}
    for other, other_cls in FORMATS.items():
        for f in fields(other_cls):
            if f.name not in own and f.name in settings and settings[f.name] != f.default:
                raise InputError(f"{flag_of(f)} is a setting of --format {other}; --format {format} "
                                 f"does not take it")
    return cls(**{name: settings[name] for name in own if name in settings})
