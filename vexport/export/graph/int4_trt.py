"""int4 for TensorRT: each decoder Linear of a GPTQ v1 checkpoint as a blocked ``DequantizeLinear`` + ``MatMul``.

This is the form TensorRT documents for weight-only int4 (explicit quantization, strongly typed network):
an INT4 weight initializer ``[K, N]`` (two codes per byte, the first element in the low nibble), fp16 scales
``[K / block, N]`` and ``DequantizeLinear(axis=0, block_size=block)`` (ONNX opset 21) feeding a ``MatMul``.

TensorRT's IDequantizeLayer accepts only zero zero-points (symmetric int4 in [-8, 7]), so the GPTQ codes
``q`` in [0, 15] are stored as ``q - 8`` and the zero point moves out of the dequantization::

    W = (q - z) * s = (q - 8) * s + (8 - z) * s
    x @ W = x @ DQ(q - 8, s) + blocksum(x) @ c,    c[b, n] = (8 - z[b, n]) * s[b, n]

For a symmetric checkpoint (every ``z == 8``) the correction term is absent and the graph is exactly the
documented form. For an asymmetric one, ``blocksum(x)`` is a Reshape to ``[B, T, K / block, block]`` and a
ReduceSum; the correction is a small ``[K / block, N]`` MatMul.

Blocks and act-order follow export/graph/int4_ort.py (``plan_blocks``): input columns are sorted by group with one
``Gather`` on the activations, a block never straddles a group, and here the block also divides K.

A mixed checkpoint (``quantization_config.dynamic``, quant/dynamic.py): TensorRT documents blocked
``DequantizeLinear`` for INT4 weights only (INT8 weights are per-tensor or per-channel), so an 8-bit Linear is a
float ``MatMul`` on its dequantized weight (the exact values the checkpoint stands for, in the graph dtype), and
a Linear left float16 is a float ``MatMul`` on its ``.weight``; both are counted in ``format_options``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from vexport.errors import VexportError
from vexport.export.graph.int4_ort import BlockPlan, plan_blocks
from vexport.export.graph.weights import PackedInt4, pack_int4, unpack_int4
from vexport.model import ModelSource
from vexport.quant.checkpoint import gptq_options, module_quant
from vexport.quant.dynamic import ModuleQuant
from vexport.quant.pack import dequantize_gptq_v1, unpack_gptq_v1

log = logging.getLogger(__name__)

__all__ = ["SIGNED_OFFSET", "BlockedDequantEmitter", "PackedInt4", "blocked_int4_tensors", "pack_int4",
           "trt_block_plan", "unpack_int4"]

SIGNED_OFFSET = 8  # GPTQ codes 0..15 become TensorRT's symmetric int4 -8..7
_NP_DTYPE = {"float32": np.float32, "float16": np.float16}
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16}
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def trt_block_plan(g_idx: np.ndarray, where: str) -> BlockPlan:
    """``plan_blocks``, with the block also dividing K (the zero-point correction reshapes K into blocks)."""
    plan = plan_blocks(g_idx, where)
    block = math.gcd(plan.block_size, len(g_idx))
    if block == plan.block_size:
        return plan
    sorted_groups = np.sort(np.asarray(g_idx, dtype=np.int64), kind="stable")
    return BlockPlan(plan.order, block, sorted_groups[::block])


def blocked_int4_tensors(packed: dict[str, torch.Tensor], plan: BlockPlan, dtype: str) -> dict:
    """Codes (INT4 [K, N]), scales [K / block, N] and the zero-point correction [K / block, N]."""
    qw = unpack_gptq_v1(packed)
    codes = qw.q if plan.order is None else qw.q[:, torch.from_numpy(plan.order)]
    groups = torch.from_numpy(plan.block_group)
    scales, zeros = qw.scales[groups], qw.zeros[groups].float()  # [n_blocks, N], float32
    if bool((scales < 0).any()):
        raise VexportError("GPTQ scales must not be negative (TensorRT needs strictly positive scales)")
    tiny = np.float16(2.0 ** -24) if dtype == "float16" else np.float32(1e-30)
    return {
        "codes": pack_int4(codes.T.numpy().astype(np.int8) - SIGNED_OFFSET),
        # a zero scale (an all-equal group) becomes the smallest positive value: its codes dequantize to ~0
        "scales": np.maximum(scales.numpy().astype(_NP_DTYPE[dtype]), tiny),
        "correction": ((SIGNED_OFFSET - zeros) * scales).numpy().astype(_NP_DTYPE[dtype]),
    }


class BlockedDequantEmitter:
    """A ``LinearEmitter`` for ``build_graph``: blocked INT4 ``DequantizeLinear`` + ``MatMul`` over GPTQ tensors."""

    def __init__(self, source: ModelSource):
        self.source = source
        self.options = gptq_options(source.config, source.path / "config.json")
        self.block_sizes: set[int] = set()
        self.corrections = 0
        self.float_linears = {"float16": 0, "dequantized_8bit": 0}  # Linears a float MatMul computes
        self._gathers: dict[tuple[str, bytes], str] = {}
        self._cache: tuple[str, dict] | None = None

    def __call__(self, b, x: str, prefix: str, name: str, bias: bool) -> str:
        quant = module_quant(self.options, prefix, str(self.source.path / "config.json"))
        if quant is None or quant.bits != 4:
            return self._float_linear(b, x, prefix, name, bias, quant)
        if f"{prefix}.qweight" not in self.source.tensors:
            raise VexportError(f"{self.source.path} has no {prefix}.qweight, which its quantization_config says is "
                               "quantized (4 bits)")
        plan = trt_block_plan(self.source.read_tensor(f"{prefix}.g_idx").numpy(), f"{self.source.path}: {prefix}")
        self.block_sizes.add(plan.block_size)
        if plan.order is not None:
            x = self._gather(b, x, plan.order, prefix, name)
        codes = b.weight(f"{name}_int4", f"{prefix}.qweight", make=self._maker(prefix, plan, "codes", b.dtype))
        scales = b.weight(f"{name}_scales", f"{prefix}.scales", make=self._maker(prefix, plan, "scales", b.dtype))
        y = b.op("MatMul", x, b.op("DequantizeLinear", codes, scales, axis=0, block_size=plan.block_size))
        if not quant.sym:
            y = b.op("Add", y, self._correction(b, x, prefix, name, plan))
        return b.op("Add", y, b.weight(f"{name}_bias", f"{prefix}.bias")) if bias else y

    def _float_linear(self, b, x: str, prefix: str, name: str, bias: bool, quant: ModuleQuant | None) -> str:
        """A float MatMul for a Linear blocked INT4 cannot hold: the checkpoint's float16 ``.weight`` (QUANT
        None), or the dequantized weight of an 8-bit Linear; stored [in, out] in the graph dtype."""
        self.float_linears["float16" if quant is None else "dequantized_8bit"] += 1

        def make(read: Callable[[str], torch.Tensor]) -> np.ndarray:
            if quant is None:
                weight = read(f"{prefix}.weight").float()
            else:
                weight = dequantize_gptq_v1({t: read(f"{prefix}.{t}") for t in GPTQ_PARTS}, torch.float32, quant.bits)
            return weight.t().to(_TORCH_DTYPE[b.dtype]).contiguous().numpy()

        source = f"{prefix}.weight" if quant is None else f"{prefix}.qweight"
        y = b.op("MatMul", x, b.weight(f"{name}_weight", source, make=make))
        return b.op("Add", y, b.weight(f"{name}_bias", f"{prefix}.bias")) if bias else y

    def _correction(self, b, x: str, prefix: str, name: str, plan: BlockPlan) -> str:
        """blocksum(x) @ c: the zero points of an asymmetric checkpoint, outside the dequantization."""
        self.corrections += 1
        shape = b.const(f"blocks_{plan.n_blocks}x{plan.block_size}",
                        np.array([0, 0, plan.n_blocks, plan.block_size], np.int64))
        sums = b.op("ReduceSum", b.op("Reshape", x, shape), b.const("axes_last", np.array([-1], np.int64)),
                    keepdims=0)
        table = b.weight(f"{name}_zero_correction", f"{prefix}.qzeros",
                         make=self._maker(prefix, plan, "correction", b.dtype))
        return b.op("MatMul", sums, table)

    def _gather(self, b, x: str, order: np.ndarray, prefix: str, name: str) -> str:
        key = (x, order.tobytes())
        if key not in self._gathers:
            indices = b.weight(f"{name}_act_order", f"{prefix}.g_idx", make=lambda read, o=order: o)
            self._gathers[key] = b.op("Gather", x, indices, axis=-1)
        return self._gathers[key]

    def _maker(self, prefix: str, plan: BlockPlan, part: str, dtype: str) -> Callable:
        def make(read: Callable[[str], torch.Tensor]):
            if self._cache is None or self._cache[0] != prefix:
                packed = {t: read(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")}
                self._cache = (prefix, blocked_int4_tensors(packed, plan, dtype))
                self._check_sym(prefix)
            return self._cache[1][part]

        return make

    def _check_sym(self, prefix: str) -> None:
        sym = module_quant(self.options, prefix).sym
        if sym and bool(np.any(self._cache[1]["correction"])):
            raise VexportError(f"{self.source.path}: {prefix} has zero points other than 8, but its config says "
                               "sym: true")

    def format_options(self, dtype: str) -> dict:
        keys = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")
        return {"activation_dtype": dtype, **{k: self.options[k] for k in keys}, "int4_form": "DequantizeLinear",
                "dequantize_block_sizes": sorted(self.block_sizes), "act_order_gathers": len(self._gathers),
                "zero_point_corrections": self.corrections,
                **({"float_linears": dict(self.float_linears)} if self.options.get("dynamic") else {})}
