"""The optimized value-model graph: ONNX Runtime's fused contrib operators, built node by node from the config.

Per decoder layer: one MatMul for Q/K/V (weights concatenated along the output axis), ``GroupQueryAttention``
with rotary inside, one ``SkipSimplifiedLayerNormalization`` that adds the residual and normalizes, MatMuls for
gate and up, and the down projection. The final norm's weight is folded into the score head:
``score(w_norm * n) = n @ (w_norm ⊙ w_score)^T + b``, computed in float32 and cast once.

Any padding: GroupQueryAttention reads each row's key length from ``seqlens_k`` and assumes right padding. The
graph first packs every row's real tokens to the front (``ScatterElements`` by the attention-mask cumsum, so left
padding, right padding and holes all work), runs the layers at positions 0..n-1 with ``seqlens_k = n - 1`` and no
attention bias, and puts the values back in the input's layout (``GatherElements``): each sequence gets the
values it gets alone, and attention does no [B, 1, T, T] mask work.

Runs on ONNX Runtime (CPU and CUDA providers); the plain graph (export/graph/plain.py) runs anywhere.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from vexport.export.graph.contrib import CONTRIB_DOMAIN, add_contrib_opset
from vexport.export.graph.plain import OUTPUT_NAME, GraphBuilder, WeightSpec, make_model, rms_norm, rotary_tables
from vexport.export.graph.weights import folded_score
from vexport.model import attention_window
from vexport.tensors import linear_biases

log = logging.getLogger(__name__)



class FusedLinears(Protocol):
    """How the fused graph emits its Linears: dense (``DenseLinears``) or int4 (``MatMulNBitsEmitter``)."""

    def fused(self, b: GraphBuilder, x: str, prefixes: list[str], name: str, bias: bool, *,
              out_order: np.ndarray | None = None, x_in_order: bool = False) -> str:
        """x times the Linears of PREFIXES (which share x), outputs concatenated along the last axis.
        ``out_order`` permutes the output columns; ``x_in_order`` says x arrives permuted by
        ``input_order(prefix)`` already (int4 act-order)."""

    def input_order(self, prefix: str) -> np.ndarray | None:
        """The permutation the Linear's input needs (None: in order already)."""


_NP = {"float32": np.float32, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16}
ROTARY_HEAD_MULTIPLE = 16  # GroupQueryAttention's rotary (CPU) needs head_dim % 16 == 0


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def fusable(config) -> str | None:
    """None when the fused graph can express this config, else the reason it cannot."""
    if head_dim(config) % ROTARY_HEAD_MULTIPLE:
        return f"head_dim {head_dim(config)} is not a multiple of {ROTARY_HEAD_MULTIPLE} (GroupQueryAttention rotary)"
    if config.num_attention_heads % config.num_key_value_heads:
        return "num_attention_heads is not a multiple of num_key_value_heads"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    return None


def build_fused_graph(config, dtype: str, score_bias: bool,
                      linears: FusedLinears | None = None) -> tuple[onnx.ModelProto, list[WeightSpec]]:
    """The fused graph without weight data, and the weights it expects, in order of first use."""
    b = GraphBuilder(dtype, linear=None)
    linears = linears if linears is not None else DenseLinears()
    packed_ids, slots, positions, seqlens, total = _packed_inputs(b)
    cos, sin = _rotary_caches(b, config, dtype)
    hidden = b.op("Gather", b.weight("embed_tokens", "model.embed_tokens.weight"), packed_ids, axis=0)
    normed = rms_norm(b, hidden, "model.layers.0.input_layernorm.weight", "l0_input_norm", config.rms_norm_eps)
    attention = (positions, seqlens, total, cos, sin)
    for i in range(config.num_hidden_layers):
        normed, hidden = _decoder_layer(b, config, i, normed, hidden, attention, linears)
    folded = b.weight("score_weight", "score.weight", make=lambda read: folded_score(read, dtype))
    logits = b.op("MatMul", normed, folded)
    if score_bias:
        logits = b.op("Add", logits, b.weight("score_bias", "score.bias"))
    logits = b.op("Cast", logits, to=TensorProto.FLOAT)
    b.nodes.append(helper.make_node("GatherElements", [logits, b.op("Unsqueeze", slots, "axis_last")], [OUTPUT_NAME],
                                    name="logits_in_input_layout", axis=1))
    model = make_model(b)
    add_contrib_opset(model)
    return model, b.weights


def _packed_inputs(b: GraphBuilder) -> tuple[str, str, str, str, str]:
    """Input ids with every row's real tokens packed to the front, each input position's slot in that packing
    ``[B, T]``, position ids (0..T-1), GQA's ``seqlens_k`` (real tokens - 1) and total length."""
    one, axis1 = b.const("one_i64", np.array(1, np.int64)), b.const("axis1", np.array(1, np.int64))
    b.const("axis_last", np.array([-1], np.int64))
    real = b.op("Cast", "attention_mask", to=TensorProto.BOOL)
    mask = b.op("Cast", real, to=TensorProto.INT64)  # any nonzero mask value counts as a real token
    before = b.op("CumSum", mask, axis1)
    count = b.op("ReduceSum", mask, "axis_last", keepdims=1)  # [B, 1]
    pads_before = b.op("CumSum", b.op("Sub", one, mask), axis1)
    slot_real, slot_pad = b.op("Sub", before, one), b.op("Sub", b.op("Add", count, pads_before), one)
    slots = b.op("Where", real, slot_real, slot_pad)  # a permutation of 0..T-1 in every row
    packed = b.op("ScatterElements", "input_ids", slots, "input_ids", axis=1)
    shape = b.op("Shape", "input_ids")
    length = b.op("Squeeze", b.op("Gather", shape, b.const("index1", np.array([1], np.int64))),
                  b.const("axis0", np.array([0], np.int64)))
    zero = b.const("zero_i64_scalar", np.array(0, np.int64))
    positions = b.op("Expand", b.op("Unsqueeze", b.op("Range", zero, length, one), "axis0"), shape)
    total = b.op("Cast", length, to=TensorProto.INT32)
    seqlens = b.op("Cast", b.op("Max", b.op("Squeeze", b.op("Sub", count, one), "axis_last"), zero),
                   to=TensorProto.INT32)  # an all-padding row still sees one key: finite values
    return packed, slots, positions, seqlens, total


def _rotary_caches(b: GraphBuilder, config, dtype: str) -> tuple[str, str]:
    """cos/sin [T, head_dim / 2] for positions 0..T-1 of this call, computed in the graph in float32 as
    transformers does, then cast: nothing scales with max_position_embeddings."""
    inv_freq, scaling = rotary_tables(config)
    length = b.op("Squeeze", b.op("Gather", b.op("Shape", "input_ids"), "index1"), "axis0")
    positions = b.op("Cast", b.op("Range", "zero_i64_scalar", length, "one_i64"), to=TensorProto.FLOAT)
    freqs = b.op("Mul", b.op("Unsqueeze", positions, "axis_last"), b.const("inv_freq", inv_freq[None, :]))
    scale = b.const("rope_scaling", np.array(scaling, np.float32))
    return tuple(b.op("Cast", b.op("Mul", b.op(fn, freqs), scale), to=b.onnx_dtype) for fn in ("Cos", "Sin"))


def _skip_norm(b: GraphBuilder, x: str, residual: str, gamma: str, eps: float, name: str) -> tuple[str, str]:
    """(normalized residual + x, residual + x) from one SkipSimplifiedLayerNormalization."""
    normed, total = f"{name}_out", f"{name}_sum"
    b.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, residual, gamma],
                                    [normed, "", "", total], name=name, domain=CONTRIB_DOMAIN, epsilon=eps))
    return normed, total


def _decoder_layer(b: GraphBuilder, config, i: int, normed: str, hidden: str, attention: tuple,
                   linears: FusedLinears) -> tuple[str, str]:
    """One layer from its normalized input; returns the next normalized input and the residual stream."""
    prefix, eps = f"model.layers.{i}", config.rms_norm_eps
    qkv_bias, mlp_bias = linear_biases(config)
    qkv = linears.fused(b, normed, [f"{prefix}.self_attn.{p}_proj" for p in "qkv"], f"l{i}_qkv", qkv_bias)
    attn = _gqa(b, config, qkv, attention, i)
    out = linears.fused(b, attn, [f"{prefix}.self_attn.o_proj"], f"l{i}_o", qkv_bias)
    gamma = b.weight(f"l{i}_post_norm_weight", f"{prefix}.post_attention_layernorm.weight")
    normed, hidden = _skip_norm(b, out, hidden, gamma, eps, f"l{i}_post_norm")
    # gate and up as two MatMuls over the same input: one fused MatMul needs a Split that copies its output, 2-4%
    # of the layer at 8x256 on CPU. silu(gate) * up is elementwise, so the down projection's act-order
    # permutation (int4) moves into the gate and up output columns for free and its input needs no gather.
    down_order = linears.input_order(f"{prefix}.mlp.down_proj")
    gate, up = (linears.fused(b, normed, [f"{prefix}.mlp.{p}_proj"], f"l{i}_{p}", mlp_bias,
                              out_order=down_order)
                for p in ("gate", "up"))
    act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    down = linears.fused(b, act, [f"{prefix}.mlp.down_proj"], f"l{i}_down", mlp_bias,
                         x_in_order=down_order is not None)
    last = i == config.num_hidden_layers - 1
    gamma = (b.const("final_norm_ones", np.ones(config.hidden_size, _NP[b.dtype])) if last else
             b.weight(f"l{i + 1}_input_norm_weight", f"model.layers.{i + 1}.input_layernorm.weight"))
    return _skip_norm(b, down, hidden, gamma, eps, "final_norm" if last else f"l{i + 1}_input_norm")


def _gqa(b: GraphBuilder, config, qkv: str, attention: tuple, i: int) -> str:
    positions, seqlens, total, cos, sin = attention
    inputs = [qkv, "", "", "", "", seqlens, total, cos, sin, positions]
    window = attention_window(config)  # the last WINDOW keys, as transformers (matched against it in the tests)
    return b.op("GroupQueryAttention", *inputs, outputs=3, domain=CONTRIB_DOMAIN,
                num_heads=config.num_attention_heads, kv_num_heads=config.num_key_value_heads,
                do_rotary=1, rotary_interleaved=0, scale=float(head_dim(config) ** -0.5),
                local_window_size=window if window is not None else -1)[0]


def dense_fused_linear(b: GraphBuilder, x: str, prefixes: list[str], name: str, bias: bool, *,
                       out_order: None = None, x_in_order: bool = False) -> str:
    """x @ [W_1; W_2; ...]^T (+ b): one MatMul over the Linears' weights concatenated along the output axis."""
    if out_order is not None or x_in_order:
        raise ValueError("dense Linears have no input order to fold")
    dtype = _TORCH[b.dtype]
    weight = b.weight(f"{name}_weight", f"{prefixes[0]}.weight",
                      make=lambda read: _concat_t([read(f"{p}.weight") for p in prefixes], dtype))
    y = b.op("MatMul", x, weight)
    if not bias:
        return y
    fused_bias = b.weight(f"{name}_bias", f"{prefixes[0]}.bias",
                          make=lambda read: torch.cat([read(f"{p}.bias") for p in prefixes]).to(dtype).numpy())
    return b.op("Add", y, fused_bias)


class DenseLinears:
    """Float Linears for the fused graph: ``dense_fused_linear``; their inputs need no permutation."""

    fused = staticmethod(dense_fused_linear)

    def input_order(self, prefix: str) -> None:
        return None


def _concat_t(weights: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
    """[out_i, in] tensors -> [in, sum(out_i)] in DTYPE."""
    return torch.cat([w.to(dtype) for w in weights], dim=0).t().contiguous().numpy()
