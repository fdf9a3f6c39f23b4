"""The optimized value-model graph: ONNX Runtime's fused contrib operators, built node by node from the config.

Per decoder layer: one MatMul for Q/K/V (weights concatenated along the output axis), ``GroupQueryAttention``
with rotary inside, one ``SkipSimplifiedLayerNormalization`` that adds the residual and normalizes, one MatMul
for gate/up, and the down projection. The final norm's weight is folded into the score head:
``score(w_norm * n) = n @ (w_norm ⊙ w_score)^T + b``, computed in float32 and cast once.

Any padding: GroupQueryAttention derives key lengths from ``seqlens_k``, which assumes right padding. Here every
row claims the full length (``seqlens_k = T - 1``), rotary reads explicit ``position_ids`` (the attention-mask
cumsum, as in the plain graph) and an additive ``attention_bias`` masks padded keys, so left-, right- and
un-padded batches give each sequence the values it gets alone.

Runs on ONNX Runtime (CPU and CUDA providers); the plain graph (export/onnx_graph.py) runs anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from vexport.export.onnx_graph import OUTPUT_NAME, GraphBuilder, WeightSpec, make_model, rms_norm, rotary_tables
from vexport.export.onnx_int4 import CONTRIB_DOMAIN, add_contrib_opset

log = logging.getLogger(__name__)

# A fused Linear emitter: (builder, x, checkpoint prefixes sharing x, node name, has bias) -> output name with the
# outputs of the prefixes concatenated along the last axis. Keywords: ``out_order`` permutes the output columns
# and ``x_in_order`` says x arrives permuted by the emitter's ``input_order(prefix)`` already (int4 act-order).
FusedLinear = Callable[..., str]
_MASKED = {"float32": -1.0e9, "float16": -6.0e4}  # finite, so fully masked padding rows give no NaN
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
                      linear: FusedLinear | None = None) -> tuple[onnx.ModelProto, list[WeightSpec]]:
    """The fused graph without weight data, and the weights it expects, in order of first use."""
    b = GraphBuilder(dtype, linear=None)
    fused = linear or dense_fused_linear
    positions, bias, seqlens, total = _attention_inputs(b, dtype)
    cos, sin = _rotary_caches(b, config, dtype)
    hidden = b.op("Gather", b.weight("embed_tokens", "model.embed_tokens.weight"), "input_ids", axis=0)
    normed = rms_norm(b, hidden, "model.layers.0.input_layernorm.weight", "l0_input_norm", config.rms_norm_eps)
    attention = (positions, bias, seqlens, total, cos, sin)
    for i in range(config.num_hidden_layers):
        normed, hidden = _decoder_layer(b, config, i, normed, hidden, attention, fused)
    logits = b.op("MatMul", normed, b.weight("score_weight", "score.weight", make=_folded_score(dtype)))
    if score_bias:
        logits = b.op("Add", logits, b.weight("score_bias", "score.bias"))
    b.nodes.append(helper.make_node("Cast", [logits], [OUTPUT_NAME], name="logits_float32", to=TensorProto.FLOAT))
    model = make_model(b)
    add_contrib_opset(model)
    return model, b.weights


def _attention_inputs(b: GraphBuilder, dtype: str) -> tuple[str, str, str, str]:
    """Position ids from the mask, the additive padding+causal bias, and GQA's full-length seqlens_k/total."""
    b.const("one_i64", np.array([1], np.int64))
    b.const("zero_i64", np.array(0, np.int64))
    positions = b.op("Sub", b.op("CumSum", "attention_mask", b.const("axis1", np.array(1, np.int64))), "one_i64")
    positions = b.op("Max", positions, "zero_i64")
    shape = b.op("Shape", "input_ids")
    length = b.op("Squeeze", b.op("Gather", shape, "one_i64"), b.const("axis0", np.array([0], np.int64)))
    idx = b.op("Range", "zero_i64", length, b.const("step1", np.array(1, np.int64)))
    causal = b.op("LessOrEqual", b.op("Unsqueeze", idx, "axis0"), b.op("Unsqueeze", idx, "one_i64"))
    real = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.const("axes12", np.array([1, 2], np.int64))),
                to=TensorProto.BOOL)
    bias = b.op("Where", b.op("And", causal, real), b.const("zero_bias", np.array(0.0, _NP[dtype])),
                b.const("masked_bias", np.array(_MASKED[dtype], _NP[dtype])))  # [B, 1, T, T]
    batch = b.op("Slice", shape, b.const("s0", np.array([0], np.int64)), "one_i64")
    total = b.op("Cast", length, to=TensorProto.INT32)
    seqlens = b.op("Expand", b.op("Sub", total, b.const("one_i32", np.array(1, np.int32))), batch)
    return positions, bias, seqlens, total


def _rotary_caches(b: GraphBuilder, config, dtype: str) -> tuple[str, str]:
    """cos/sin [max_positions, head_dim / 2], computed in float32 as transformers does, then cast."""
    inv_freq, scaling = rotary_tables(config)
    freqs = np.arange(config.max_position_embeddings, dtype=np.float32)[:, None] * inv_freq[None, :]
    caches = []
    for name, fn in (("cos_cache", np.cos), ("sin_cache", np.sin)):
        table = (fn(freqs) * np.float32(scaling)).astype(_NP[dtype])
        caches.append(b.weight(name, "model.embed_tokens.weight", make=lambda read, t=table: t))
    return caches[0], caches[1]


def _skip_norm(b: GraphBuilder, x: str, residual: str, gamma: str, eps: float, name: str) -> tuple[str, str]:
    """(normalized residual + x, residual + x) from one SkipSimplifiedLayerNormalization."""
    normed, total = f"{name}_out", f"{name}_sum"
    b.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, residual, gamma],
                                    [normed, "", "", total], name=name, domain=CONTRIB_DOMAIN, epsilon=eps))
    return normed, total


def _decoder_layer(b: GraphBuilder, config, i: int, normed: str, hidden: str, attention: tuple,
                   fused: FusedLinear) -> tuple[str, str]:
    """One layer from its normalized input; returns the next normalized input and the residual stream."""
    prefix, eps = f"model.layers.{i}", config.rms_norm_eps
    qkv_bias, mlp_bias = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
    qkv = fused(b, normed, [f"{prefix}.self_attn.{p}_proj" for p in "qkv"], f"l{i}_qkv", qkv_bias)
    attn = _gqa(b, config, qkv, attention, i)
    out = fused(b, attn, [f"{prefix}.self_attn.o_proj"], f"l{i}_o", qkv_bias)
    gamma = b.weight(f"l{i}_post_norm_weight", f"{prefix}.post_attention_layernorm.weight")
    normed, hidden = _skip_norm(b, out, hidden, gamma, eps, f"l{i}_post_norm")
    # silu(gate) * up is elementwise, so the down projection's act-order permutation (int4) moves into the
    # gate/up output columns for free and its input needs no gather
    down_order = _input_order(fused, f"{prefix}.mlp.down_proj")
    gate_up = fused(b, normed, [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], f"l{i}_gate_up", mlp_bias,
                    out_order=down_order)
    split = b.const(f"split_{config.intermediate_size}", np.array([config.intermediate_size] * 2, np.int64))
    gate, up = b.op("Split", gate_up, split, outputs=2, axis=-1)
    act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    down = fused(b, act, [f"{prefix}.mlp.down_proj"], f"l{i}_down", mlp_bias, x_in_order=down_order is not None)
    last = i == config.num_hidden_layers - 1
    gamma = (b.const("final_norm_ones", np.ones(config.hidden_size, _NP[b.dtype])) if last else
             b.weight(f"l{i + 1}_input_norm_weight", f"model.layers.{i + 1}.input_layernorm.weight"))
    return _skip_norm(b, down, hidden, gamma, eps, "final_norm" if last else f"l{i + 1}_input_norm")


def _gqa(b: GraphBuilder, config, qkv: str, attention: tuple, i: int) -> str:
    positions, bias, seqlens, total, cos, sin = attention
    inputs = [qkv, "", "", "", "", seqlens, total, cos, sin, positions, bias]
    return b.op("GroupQueryAttention", *inputs, outputs=3, domain=CONTRIB_DOMAIN,
                num_heads=config.num_attention_heads, kv_num_heads=config.num_key_value_heads,
                do_rotary=1, rotary_interleaved=0, scale=float(head_dim(config) ** -0.5))[0]


def _input_order(fused: FusedLinear, prefix: str) -> np.ndarray | None:
    order = getattr(getattr(fused, "__self__", None), "input_order", None)
    return order(prefix) if order else None


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


def _concat_t(weights: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
    """[out_i, in] tensors -> [in, sum(out_i)] in DTYPE."""
    return torch.cat([w.to(dtype) for w in weights], dim=0).t().contiguous().numpy()


def _folded_score(dtype: str) -> Callable[[Callable[[str], torch.Tensor]], np.ndarray]:
    """[hidden, labels]: the final norm weight times the score weight, in float32, cast once."""
    def make(read: Callable[[str], torch.Tensor]) -> np.ndarray:
        folded = read("model.norm.weight").float()[None, :] * read("score.weight").float()
        return folded.t().contiguous().to(_TORCH[dtype]).numpy()

    return make
