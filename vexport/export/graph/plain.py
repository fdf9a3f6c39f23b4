"""The value model as an ONNX graph, built node by node from the config (no tracing).

Standard ONNX operators only (opset 17), so any ONNX runtime runs it. Numerics follow Hugging Face's Llama:
RMSNorm computes the inverse RMS in float32 and casts back before the weight multiply, rotary tables are
computed in float32, attention softmax runs in float32. Position ids follow the attention mask, so left-,
right- and un-padded batches give each sequence the values it gets alone.

Weights are not part of this module: `build_graph` names each initializer it needs and its shape, and the
writer (export/onnx.py) streams them into external data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vexport.errors import NotAValueModelError
from vexport.model import attention_window, rope_parameters, rope_type
from vexport.tensors import linear_biases

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
_ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_MASKED = -1.0e9  # additive bias for masked keys; finite so a fully masked (padding) row gives no NaN


@dataclass(frozen=True)
class WeightSpec:
    """One initializer: where it comes from in the checkpoint and how it is stored in the graph."""

    name: str  # initializer name in the graph
    source: str  # tensor name in the checkpoint
    transpose: bool = False  # Linear weights are stored [in, out] so the graph multiplies without a Transpose
    make: Callable[[Callable[[str], Any]], np.ndarray] | None = None  # custom: read -> array (e.g. int4 repacking)


# A Linear emitter: (builder, x, checkpoint prefix, node name, has bias) -> output name. The default is a MatMul
# over the dense weight; the int4 graph passes one that emits MatMulNBits from GPTQ tensors.
LinearEmitter = Callable[["GraphBuilder", str, str, str, bool], str]
# A head emitter: (builder, last hidden state, config, score has bias) -> logits before the float32 Cast. The default
# is HF's final RMSNorm then the score Linear; the TensorRT-bound graph passes a folded head (export/tensorrt_onnx.py).
HeadEmitter = Callable[["GraphBuilder", str, Any, bool], str]


@dataclass
class GraphBuilder:
    dtype: str
    linear: LinearEmitter
    nodes: list = field(default_factory=list)
    constants: list = field(default_factory=list)
    weights: list[WeightSpec] = field(default_factory=list)
    _count: int = 0
    _const_names: set = field(default_factory=set)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs) -> str | list[str]:
        self._count += 1
        names = [f"{op_type.lower()}_{self._count}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"n{self._count}_{op_type}",
                                           domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, name: str, value: np.ndarray) -> str:
        """A small inline constant; the same name twice is the same constant."""
        if name not in self._const_names:
            self._const_names.add(name)
            self.constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, source: str, transpose: bool = False, make=None) -> str:
        self.weights.append(WeightSpec(name, source, transpose, make))
        return name

    @property
    def onnx_dtype(self) -> int:
        return _ONNX_DTYPE[self.dtype]


# Rope types whose inverse frequencies and scaling are fixed by the config: one table, exact at every position.
# 'dynamic' and 'longrope' recompute them from the longest sequence of the batch, which no fixed graph can.
EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
_LENGTH_DEPENDENT_ROPE = {
    "dynamic": "rescales its frequencies with the batch's longest sequence",
    "longrope": "switches to its long factors when the batch's longest sequence passes "
                "original_max_position_embeddings",
}


def rotary_tables(config) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin scaling, computed by transformers' own rotary module; rope types
    the graph cannot express exactly are refused by name."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kind = rope_type(config)
    if kind in _LENGTH_DEPENDENT_ROPE:
        raise NotAValueModelError(f"rope_type {kind!r} {_LENGTH_DEPENDENT_ROPE[kind]}: not supported by the ONNX "
                                  f"export (supported rope types: {', '.join(EXACT_ROPE_TYPES)})")
    if kind not in EXACT_ROPE_TYPES:
        raise NotAValueModelError(f"rope_type {kind[:40]!r} is not supported by the ONNX export "
                                  f"(supported: {', '.join(EXACT_ROPE_TYPES)})")
    rotary = LlamaRotaryEmbedding(config)
    inv_freq = rotary.inv_freq.float().numpy()
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if 2 * inv_freq.size != dim:
        factor = rope_parameters(config).get("partial_rotary_factor")
        raise NotAValueModelError(f"rope_type {kind!r} with partial_rotary_factor {factor} rotates {2 * inv_freq.size} "
                                  f"of the {dim} dimensions of each head: not supported by the ONNX export")
    return inv_freq, float(rotary.attention_scaling)


def build_graph(config, dtype: str, score_bias: bool, linear: LinearEmitter | None = None,
                head: HeadEmitter | None = None) -> tuple[onnx.ModelProto, list[WeightSpec]]:
    """The graph without weight data, and the list of weights it expects, in order of first use."""
    b = GraphBuilder(dtype, linear or dense_linear)
    b.const("one_i64", np.array([1], np.int64))
    b.const("zero_i64", np.array(0, np.int64))
    positions = b.op("Sub", b.op("CumSum", "attention_mask", b.const("axis1", np.array(1, np.int64))), "one_i64")
    positions = b.op("Max", positions, "zero_i64")
    cos, sin = _rotary(b, config, positions)
    bias = _attention_bias(b, attention_window(config))
    hidden = b.op("Gather", b.weight("embed_tokens", "model.embed_tokens.weight"), "input_ids", axis=0)
    for i in range(config.num_hidden_layers):
        hidden = _decoder_layer(b, config, i, hidden, cos, sin, bias)
    logits = (head or dense_head)(b, hidden, config, score_bias)
    b.nodes.append(helper.make_node("Cast", [logits], [OUTPUT_NAME], name="logits_float32", to=TensorProto.FLOAT))
    return make_model(b), b.weights


def dense_head(b: GraphBuilder, hidden: str, config, score_bias: bool) -> str:
    """HF's final RMSNorm, then the score Linear (+ bias)."""
    normed = rms_norm(b, hidden, "model.norm.weight", "final_norm", config.rms_norm_eps)
    logits = b.op("MatMul", normed, b.weight("score_weight", "score.weight", transpose=True))
    return b.op("Add", logits, b.weight("score_bias", "score.bias")) if score_bias else logits


def make_model(b: GraphBuilder) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in INPUT_NAMES]
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", "sequence", 1])
    graph = helper.make_graph(b.nodes, "value_model", inputs, [output], initializer=b.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vexport")
    model.ir_version = 8
    return model


def _rotary(b: GraphBuilder, config, positions: str) -> tuple[str, str]:
    inv_freq, scaling = rotary_tables(config)
    freqs = b.op("Mul", b.op("Unsqueeze", b.op("Cast", positions, to=TensorProto.FLOAT), b.const("axis_last", np.array([-1], np.int64))),
                 b.const("inv_freq", inv_freq.reshape(1, 1, -1)))
    emb = b.op("Concat", freqs, freqs, axis=-1)
    tables = []
    for fn in ("Cos", "Sin"):
        table = b.op("Mul", b.op(fn, emb), b.const(f"rope_scaling_{fn}", np.array(scaling, np.float32)))
        table = b.op("Cast", table, to=b.onnx_dtype)
        tables.append(b.op("Unsqueeze", table, "one_i64"))  # [B, 1, T, head_dim]
    return tables[0], tables[1]


def _attention_bias(b: GraphBuilder, window: int | None = None) -> str:
    """float32 [B, 1, T, T]: 0 where query i may attend key j (j <= i, i - j < WINDOW when there is a sliding
    window, as transformers' sliding mask, and j is a real token), else -1e9."""
    length = b.op("Gather", b.op("Shape", "input_ids"), "one_i64")  # [1]
    length = b.op("Squeeze", length, b.const("axis0", np.array([0], np.int64)))
    idx = b.op("Range", "zero_i64", length, b.const("step1", np.array(1, np.int64)))
    keys, queries = b.op("Unsqueeze", idx, "axis0"), b.op("Unsqueeze", idx, "one_i64")
    causal = b.op("LessOrEqual", keys, queries)
    if window is not None:
        near = b.op("Less", b.op("Sub", queries, keys), b.const("sliding_window", np.array(window, np.int64)))
        causal = b.op("And", causal, near)
    real = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.const("axes12", np.array([1, 2], np.int64))),
                to=TensorProto.BOOL)
    allowed = b.op("And", causal, real)
    return b.op("Where", allowed, b.const("zero_f32", np.array(0.0, np.float32)),
                b.const("masked_f32", np.array(_MASKED, np.float32)))


def rms_norm(b: GraphBuilder, x: str, source: str, name: str, eps: float) -> str:
    x32 = b.op("Cast", x, to=TensorProto.FLOAT)
    var = b.op("ReduceMean", b.op("Mul", x32, x32), axes=[-1], keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.const(f"{name}_eps", np.array(eps, np.float32)))))
    normed = b.op("Cast", b.op("Mul", x32, inv), to=b.onnx_dtype)
    return b.op("Mul", b.weight(f"{name}_weight", source), normed)


def dense_linear(b: GraphBuilder, x: str, source: str, name: str, bias: bool) -> str:
    """x @ W^T (+ b) with W stored transposed, [in, out]."""
    y = b.op("MatMul", x, b.weight(f"{name}_weight", f"{source}.weight", transpose=True))
    return b.op("Add", y, b.weight(f"{name}_bias", f"{source}.bias")) if bias else y


def _decoder_layer(b: GraphBuilder, config, i: int, hidden: str, cos: str, sin: str, bias: str) -> str:
    prefix = f"model.layers.{i}"
    normed = rms_norm(b, hidden, f"{prefix}.input_layernorm.weight", f"l{i}_input_norm", config.rms_norm_eps)
    hidden = b.op("Add", hidden, _attention(b, config, i, normed, cos, sin, bias))
    normed = rms_norm(b, hidden, f"{prefix}.post_attention_layernorm.weight", f"l{i}_post_norm",
                       config.rms_norm_eps)
    return b.op("Add", hidden, _mlp(b, config, i, normed))


def _mlp(b: GraphBuilder, config, i: int, x: str) -> str:
    prefix, bias = f"model.layers.{i}.mlp", linear_biases(config)[1]
    gate = b.linear(b, x, f"{prefix}.gate_proj", f"l{i}_gate", bias)
    up = b.linear(b, x, f"{prefix}.up_proj", f"l{i}_up", bias)
    act = b.op("Mul", gate, b.op("Sigmoid", gate))
    return b.linear(b, b.op("Mul", act, up), f"{prefix}.down_proj", f"l{i}_down", bias)


def _heads(b: GraphBuilder, x: str, heads: int, head_dim: int, name: str) -> str:
    shape = b.const(f"{name}_shape", np.array([0, 0, heads, head_dim], np.int64))
    return b.op("Transpose", b.op("Reshape", x, shape), perm=[0, 2, 1, 3])  # [B, heads, T, head_dim]


def _rope(b: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    half = head_dim // 2
    first = b.op("Slice", x, b.const(f"s0_{half}", np.array([0], np.int64)),
                 b.const(f"s1_{half}", np.array([half], np.int64)), b.const("axis3", np.array([3], np.int64)))
    second = b.op("Slice", x, f"s1_{half}", b.const(f"s2_{half}", np.array([head_dim], np.int64)), "axis3")
    rotated = b.op("Concat", b.op("Neg", second), first, axis=3)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _repeat_kv(b: GraphBuilder, x: str, heads: int, kv_heads: int, head_dim: int, i: int) -> str:
    if heads == kv_heads:
        return x
    expanded = b.op("Unsqueeze", x, b.const(f"l{i}_axis2", np.array([2], np.int64)))  # [B, kv, 1, T, d]
    shape = b.op("Concat", b.op("Shape", expanded, end=2),
                 b.const(f"l{i}_rep", np.array([heads // kv_heads], np.int64)), b.op("Shape", expanded, start=3),
                 axis=0)
    return b.op("Reshape", b.op("Expand", expanded, shape), b.const(f"l{i}_kv_shape", np.array([0, heads, -1, head_dim], np.int64)))


def _attention(b: GraphBuilder, config, i: int, x: str, cos: str, sin: str, bias: str) -> str:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prefix, qkv_bias = f"model.layers.{i}.self_attn", linear_biases(config)[0]
    q = _heads(b, b.linear(b, x, f"{prefix}.q_proj", f"l{i}_q", qkv_bias), heads, head_dim, f"l{i}_q")
    k = _heads(b, b.linear(b, x, f"{prefix}.k_proj", f"l{i}_k", qkv_bias), kv_heads, head_dim, f"l{i}_k")
    v = _heads(b, b.linear(b, x, f"{prefix}.v_proj", f"l{i}_v", qkv_bias), kv_heads, head_dim, f"l{i}_v")
    q, k = _rope(b, q, cos, sin, head_dim), _rope(b, k, cos, sin, head_dim)
    k = _repeat_kv(b, k, heads, kv_heads, head_dim, i)
    v = _repeat_kv(b, v, heads, kv_heads, head_dim, i)
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    scores = b.op("Mul", b.op("Cast", scores, to=TensorProto.FLOAT),
                  b.const(f"l{i}_scale", np.array(head_dim ** -0.5, np.float32)))
    probs = b.op("Cast", b.op("Softmax", b.op("Add", scores, bias), axis=-1), to=b.onnx_dtype)
    out = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    out = b.op("Reshape", out, b.const(f"l{i}_merge", np.array([0, 0, heads * head_dim], np.int64)))
    return b.linear(b, out, f"{prefix}.o_proj", f"l{i}_o", qkv_bias)
