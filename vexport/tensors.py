"""The tensors a value model's config.json implies, checked against its safetensors headers.

A ``LlamaForTokenClassification`` (or Mistral) with a given config has exactly one set of tensor names and
shapes. Checking them from the headers, before any weight is read, turns what would be a silently wrong export
(a q_proj of the wrong shape), a transformers traceback (a missing ``model.norm.weight``) or random weights filled
in by transformers (its "newly initialized" warning) into one line naming the tensor and the file.

A GPTQ v1 checkpoint (``quantization_config.quant_method: gptq``) holds each decoder Linear as ``qweight`` int32
[I/8, O], ``qzeros`` int32 [G, O/8], ``scales`` [G, O] and ``g_idx`` [I] instead of ``weight`` [O, I]; in a mixed
one (``quantization_config.dynamic``) a ``gptq_plan`` gives each Linear its (bits, group size), 8 bits packing
4 codes per word, or None for a Linear left float16 (``weight`` [O, I]).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vexport.errors import CorruptFileError, VexportError

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
TensorIndex = dict[str, tuple[Path, str, list[int]]]  # name -> (file, dtype, shape)
OPTIONAL = ("score.bias",)  # transformers' score Linear has a bias; a checkpoint without one means zeros
SHOWN_EXTRA = 3  # unused tensors named in the warning
GPTQPlan = Callable[[str], "tuple[int, int] | None"]  # full Linear name -> (bits, group size), None: float16


class WeightMismatchError(VexportError):
    """The weights do not match config.json: a tensor is missing, of the wrong shape, or given twice."""


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_biases(config: Any) -> tuple[bool, bool]:
    """(attention Linears have a bias, MLP Linears have a bias). Mistral's Linears never do, whatever its config
    says; Llama's follow ``attention_bias`` and ``mlp_bias``."""
    if config.model_type == "mistral":
        return False, False
    return bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))


def linear_shapes(config: Any) -> dict[str, tuple[int, int, bool]]:
    """Per decoder Linear (name inside a layer): (out_features, in_features, has bias)."""
    hidden, inter, d = config.hidden_size, config.intermediate_size, head_dim(config)
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attn_bias, mlp_bias = linear_biases(config)
    return {"self_attn.q_proj": (heads * d, hidden, attn_bias), "self_attn.k_proj": (kv * d, hidden, attn_bias),
            "self_attn.v_proj": (kv * d, hidden, attn_bias), "self_attn.o_proj": (hidden, heads * d, attn_bias),
            "mlp.gate_proj": (inter, hidden, mlp_bias), "mlp.up_proj": (inter, hidden, mlp_bias),
            "mlp.down_proj": (hidden, inter, mlp_bias)}


def expected_tensors(config: Any, gptq_group_size: int | None = None,
                     layers: int | None = None, gptq_plan: GPTQPlan | None = None) -> dict[str, Shape | None]:
    """Every tensor name the model reads, in load order, with its shape (None: a shape the config does not fix).

    ``gptq_group_size`` (an int, -1 for one group) switches the decoder Linears to GPTQ v1 tensors; ``layers``
    (default num_hidden_layers) limits the decoder layers listed."""
    hidden = config.hidden_size
    out: dict[str, Shape | None] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers if layers is None else layers):
        prefix = f"model.layers.{i}"
        out[f"{prefix}.input_layernorm.weight"] = (hidden,)
        out[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        for name, (rows, cols, bias) in linear_shapes(config).items():
            spec = (4, gptq_group_size) if gptq_plan is None or gptq_group_size is None else \
                gptq_plan(f"{prefix}.{name}")
            out.update(_linear(f"{prefix}.{name}", rows, cols, *(spec or (None, None))))
            if bias:
                out[f"{prefix}.{name}.bias"] = (rows,)
    out["model.norm.weight"] = (hidden,)
    out["score.weight"] = (config.num_labels, hidden)
    out["score.bias"] = (config.num_labels,)
    return out


def _linear(prefix: str, rows: int, cols: int, bits: int | None, group_size: int | None) -> dict[str, Shape | None]:
    if group_size is None:
        return {f"{prefix}.weight": (rows, cols)}
    groups = 1 if group_size == -1 else max(1, math.ceil(cols / group_size)) if group_size > 0 else None
    width = 32 // bits
    return {f"{prefix}.qweight": (cols // width, rows), f"{prefix}.qzeros": (groups, rows // width) if groups else None,
            f"{prefix}.scales": (groups, rows) if groups else None, f"{prefix}.g_idx": (cols,)}


def check_tensors(path: Path, config: Any, tensors: TensorIndex, gptq_group_size: int | None = None,
                  gptq_plan: GPTQPlan | None = None) -> None:
    """Every tensor the config implies must be present with its shape; unused tensors are logged."""
    # a layer has at least 9 tensors: past len(tensors) layers one is surely missing (and num_hidden_layers
    # 2**31 lists no 2**31 layers)
    expected = expected_tensors(config, gptq_group_size, min(config.num_hidden_layers, len(tensors) + 1), gptq_plan)
    missing = [name for name in expected if name not in tensors and name not in OPTIONAL]
    if missing:
        shape = expected[missing[0]]
        more = f" ({len(missing)} tensors config.json implies are missing)" if len(missing) > 1 else ""
        raise WeightMismatchError(
            f"{path}: the weights have no tensor {missing[0]}{_shape_note(shape)}, which config.json implies "
            f"(num_hidden_layers {config.num_hidden_layers}){more}")
    for name, shape in expected.items():
        if name in tensors and shape is not None and tuple(tensors[name][2]) != shape:
            file, _, found = tensors[name]
            raise WeightMismatchError(
                f"{file}: tensor {name} has shape {list(found)}, config.json implies {list(shape)} "
                f"({_dims(config)})")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        shown = ", ".join(extra[:SHOWN_EXTRA]) + (", ..." if len(extra) > SHOWN_EXTRA else "")
        log.warning("%s: %d tensor(s) no layer of the model uses are ignored: %s", path, len(extra), shown)


def _shape_note(shape: Shape | None) -> str:
    return f" (shape {list(shape)})" if shape is not None else ""


def _dims(config: Any) -> str:
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return (f"hidden_size {config.hidden_size}, num_attention_heads {config.num_attention_heads}, "
            f"num_key_value_heads {kv}, head_dim {head_dim(config)}, intermediate_size {config.intermediate_size}, "
            f"vocab_size {config.vocab_size}, num_labels {config.num_labels}")


def add_shard(tensors: TensorIndex, file: Path, header: dict[str, tuple[str, list[int]]]) -> None:
    """Add one shard's header to TENSORS; a tensor already given by another shard is refused."""
    for name, (dtype, shape) in header.items():
        if name in tensors:
            raise CorruptFileError(f"{file}: tensor {name} is also in {tensors[name][0]}: a tensor given by two "
                                   "shards is ambiguous")
        tensors[name] = (file, dtype, shape)
