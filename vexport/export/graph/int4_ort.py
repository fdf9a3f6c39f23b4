"""int4 ONNX: each decoder Linear of a GPTQ v1 checkpoint as ONNX Runtime's ``com.microsoft.MatMulNBits``.

A mixed checkpoint (``quantization_config.dynamic``, quant/dynamic.py) gives each Linear its own MatMulNBits
``bits`` (4 or 8) and ``block_size``; a Linear it leaves float16 is a float ``MatMul`` on its ``.weight``. At 8
bits B holds one code per byte ([N, n_blocks, block_size]) and zero_points one per byte ([N, n_blocks]).

MatMulNBits computes ``Y = A @ dequant(B)^T (+ bias)`` with B quantized in blocks of ``block_size`` consecutive
inputs (a power of two >= 16), ``dequant = (code - zero_point) * scale``:
- ``B`` uint8 [N, n_blocks, block_size / 2]: two codes per byte along K, the first in the low nibble;
- ``scales`` [N, n_blocks] in the activation dtype;
- ``zero_points`` uint8 [N, ceil(n_blocks / 2)], packed like B, holding the TRUE zero point (GPTQ v1 stores
  ``zero - 1``; ``unpack_gptq_v1`` undoes that before we repack);
- n_blocks = ceil(K / block_size). When K is not a multiple of block_size, B's last block is padded with codes
  equal to that block's zero point (so padded columns dequantize to exactly 0); the activations keep K columns.

Blocks must not straddle GPTQ groups. The block size is the largest power of two (at most 128) that divides
every group boundary, so group sizes 32/64/128 map one group to one block, larger or non-power-of-two groups
(e.g. 96, 1024, -1) map to several blocks that repeat the group's scale and zero point.

Act-order (``desc_act``): ``g_idx`` is not ``i // group_size``. MatMulNBits' own ``g_idx`` input is deprecated,
and in ONNX Runtime 1.32 (CPU) it gives wrong results together with packed uint8 zero points. Instead the
input columns are sorted by group (a stable argsort of ``g_idx``): the activations go through one ``Gather``
along K (shared by the Linears that read the same tensor with the same order, e.g. q/k/v) and B is stored in
the sorted order, where every group is a run of consecutive columns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vexport.errors import VexportError
from vexport.export.graph.contrib import CONTRIB_DOMAIN
from vexport.export.graph.weights import pack_nibbles
from vexport.model import ModelSource
from vexport.quant.checkpoint import gptq_options, module_quant
from vexport.quant.dynamic import ModuleQuant
from vexport.quant.pack import unpack_gptq_v1

log = logging.getLogger(__name__)

MAX_BLOCK = 128  # MLAS' fast 4-bit kernels cover 16..256; 128 is the common GPTQ group size
MIN_BLOCK = 16
_NP_DTYPE = {"float32": np.float32, "float16": np.float16}
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class BlockPlan:
    """How one Linear's GPTQ groups map to MatMulNBits blocks."""

    order: np.ndarray | None  # int64 [K]: input columns sorted by group (None: already in order)
    block_size: int
    block_group: np.ndarray  # int64 [n_blocks]: the GPTQ group of each block
    bits: int = 4

    @property
    def n_blocks(self) -> int:
        return len(self.block_group)


def plan_blocks(g_idx: np.ndarray, where: str = "g_idx") -> BlockPlan:
    """Sort columns by group, then pick the largest power-of-two block (<= 128) that splits no group."""
    g_idx = np.asarray(g_idx, dtype=np.int64)
    k = len(g_idx)
    order = np.argsort(g_idx, kind="stable")
    sorted_groups = g_idx[order]
    boundaries = np.flatnonzero(np.diff(sorted_groups)) + 1  # first column of each group after the first
    if len(boundaries):
        common = math.gcd(*(int(x) for x in boundaries))
        block = min(common & -common, MAX_BLOCK)  # the largest power of two dividing every boundary
    else:
        block = min(MAX_BLOCK, max(MIN_BLOCK, 1 << (k - 1).bit_length()))
    if block < MIN_BLOCK:
        raise VexportError(f"{where}: GPTQ groups start at column multiples of {common}, but MatMulNBits needs "
                           f"blocks of a power of two >= {MIN_BLOCK} (use group size 32, 64 or 128)")
    block_group = sorted_groups[:: block]
    identity = bool((order == np.arange(k)).all())
    return BlockPlan(None if identity else order, block, block_group)


def matmul_nbits_tensors(packed: dict[str, torch.Tensor], plan: BlockPlan, dtype: str) -> dict[str, np.ndarray]:
    """B, scales and zero_points of MatMulNBits from one Linear's GPTQ v1 tensors (at ``plan.bits``)."""
    qw = unpack_gptq_v1(packed, plan.bits)
    codes, zeros = qw.q, qw.zeros.to(torch.uint8)  # [N, K], [G, N] true zero points
    if plan.order is not None:
        codes = codes[:, torch.from_numpy(plan.order)]
    n, k = codes.shape
    groups = torch.from_numpy(plan.block_group)
    block_zeros = zeros[groups].T.contiguous()  # [N, n_blocks]
    padded = block_zeros[:, -1:].repeat(1, plan.n_blocks * plan.block_size)  # padding codes = zero point
    padded[:, :k] = codes
    pack = pack_nibbles if plan.bits == 4 else np.asarray  # 8 bits: one code per byte
    return {
        "B": pack(padded.numpy()).reshape(n, plan.n_blocks, plan.block_size * plan.bits // 8),
        "scales": qw.scales[groups].T.contiguous().numpy().astype(_NP_DTYPE[dtype]),
        "zero_points": pack(block_zeros.numpy()),
    }


def _same_plan(a: BlockPlan, b: BlockPlan) -> bool:
    """Linears can share one MatMulNBits (concatenated along N) when K, act-order and block size agree."""
    same_order = (a.order is None and b.order is None) or (
        a.order is not None and b.order is not None and np.array_equal(a.order, b.order))
    return same_order and a.block_size == b.block_size and a.n_blocks == b.n_blocks and a.bits == b.bits


class MatMulNBitsEmitter:
    """A ``LinearEmitter`` for ``build_graph``: MatMulNBits over the GPTQ tensors of ``source``.

    Build time reads only each Linear's ``g_idx`` (to plan blocks and act-order gathers); the packed weights
    are converted when the writer streams them, one Linear at a time.
    """

    def __init__(self, source: ModelSource, accuracy_level: int | None = None):
        self.source = source
        # MatMulNBits' accuracy_level 4: MLAS multiplies int8-quantized activations (per token and block) with the
        # int4 codes, much faster on CPU than float compute; None leaves the attribute out (float compute)
        self.accuracy_level = accuracy_level
        self.options = gptq_options(source.config, source.path / "config.json")
        self.block_sizes: set[int] = set()
        self.float_linears: set[str] = set()  # Linears the checkpoint leaves float16 (float MatMul)
        self._gathers: dict[tuple[str, bytes], str] = {}
        self._plans: dict[str, BlockPlan | None] = {}  # per Linear (None: float16): each g_idx read once
        self._cache: tuple[str, dict[str, np.ndarray]] | None = None

    def __call__(self, b, x: str, prefix: str, name: str, bias: bool, *, out_order: np.ndarray | None = None,
                 x_in_order: bool = False) -> str:
        """MatMulNBits for one Linear. ``out_order`` permutes its output columns (so that an elementwise op
        after it hands the next Linear its input already in act-order); ``x_in_order`` says X arrives that way.
        A Linear the checkpoint leaves float16 is a float MatMul (``_float_linear``)."""
        plan = self._plan(prefix)
        if plan is None:
            return self._float_linear(b, x, prefix, name, bias, out_order)
        k, n = self.source.tensors[f"{prefix}.g_idx"][2][0], self.source.tensors[f"{prefix}.qweight"][2][1]
        if plan.order is not None and not x_in_order:
            x = self._gather(b, x, plan.order, prefix, name)
        inputs = [x] + [b.weight(f"{name}_{part}", f"{prefix}.qweight",
                                 make=self._maker([prefix], plan, part, b.dtype, out_order))
                        for part in ("B", "scales", "zero_points")]
        if bias:
            inputs += ["", b.weight(f"{name}_bias", f"{prefix}.bias",  # "" is the deprecated g_idx input
                                    make=_bias_maker([prefix], b.dtype, out_order))]
        return b.op("MatMulNBits", *inputs, domain=CONTRIB_DOMAIN, K=k, N=n, bits=plan.bits,
                    block_size=plan.block_size, **self._accuracy())

    def _float_linear(self, b, x: str, prefix: str, name: str, bias: bool, out_order: np.ndarray | None) -> str:
        """x @ W^T (+ b) on the checkpoint's float16 ``PREFIX.weight``, stored [in, out] in the graph dtype, its
        output columns permuted by OUT_ORDER where an act-order Linear after it needs that."""
        self.float_linears.add(prefix)

        def make(read: Callable[[str], torch.Tensor]) -> np.ndarray:
            weight = read(f"{prefix}.weight").to(_TORCH_DTYPE[b.dtype]).t()
            return (weight if out_order is None else weight[:, torch.from_numpy(out_order)]).contiguous().numpy()

        y = b.op("MatMul", x, b.weight(f"{name}_weight", f"{prefix}.weight", make=make))
        if not bias:
            return y
        return b.op("Add", y, b.weight(f"{name}_bias", f"{prefix}.bias", make=_bias_maker([prefix], b.dtype,
                                                                                       out_order)))

    def fused(self, b, x: str, prefixes: list[str], name: str, bias: bool, *, out_order: np.ndarray | None = None,
              x_in_order: bool = False) -> str:
        """A ``FusedLinear`` for the optimized graph: one MatMulNBits over Linears that read the same input,
        concatenated along N when their block plans match (same act-order and block size), else one each.
        ``out_order`` permutes the output columns of every Linear alike (see ``__call__``)."""
        plans = [self._plan(p) for p in prefixes]
        if len(prefixes) == 1 or None in plans or not all(_same_plan(plans[0], p) for p in plans[1:]):
            outputs = [self(b, x, p, f"{name}_{j}" if len(prefixes) > 1 else name, bias, out_order=out_order,
                            x_in_order=x_in_order) for j, p in enumerate(prefixes)]
            return outputs[0] if len(outputs) == 1 else b.op("Concat", *outputs, axis=-1)
        plan, k = plans[0], self.source.tensors[f"{prefixes[0]}.g_idx"][2][0]
        n = sum(self.source.tensors[f"{p}.qweight"][2][1] for p in prefixes)
        if plan.order is not None and not x_in_order:
            x = self._gather(b, x, plan.order, prefixes[0], name)
        inputs = [x] + [b.weight(f"{name}_{part}", f"{prefixes[0]}.qweight",
                                 make=self._maker(prefixes, plan, part, b.dtype, out_order))
                        for part in ("B", "scales", "zero_points")]
        if bias:
            inputs += ["", b.weight(f"{name}_bias", f"{prefixes[0]}.bias",
                                    make=_bias_maker(prefixes, b.dtype, out_order))]
        return b.op("MatMulNBits", *inputs, domain=CONTRIB_DOMAIN, K=k, N=n, bits=plan.bits,
                    block_size=plan.block_size, **self._accuracy())

    def input_order(self, prefix: str) -> np.ndarray | None:
        """The act-order permutation a Linear's input needs (None: in order already, or a float Linear)."""
        plan = self._plan(prefix)
        return None if plan is None else plan.order

    def _accuracy(self) -> dict:
        return {} if self.accuracy_level is None else {"accuracy_level": self.accuracy_level}

    def _plan(self, prefix: str) -> BlockPlan | None:
        """The block plan of a quantized Linear; None for one the checkpoint leaves float16."""
        if prefix not in self._plans:
            quant = module_quant(self.options, prefix, str(self.source.path / "config.json"))
            self._plans[prefix] = None if quant is None else self._quantized_plan(prefix, quant)
        return self._plans[prefix]

    def _quantized_plan(self, prefix: str, quant: ModuleQuant) -> BlockPlan:
        if f"{prefix}.qweight" not in self.source.tensors:
            raise VexportError(f"{self.source.path} has no {prefix}.qweight, which its quantization_config says is "
                               f"quantized ({quant.bits} bits)")
        g_idx = self.source.read_tensor(f"{prefix}.g_idx").numpy()
        plan = plan_blocks(g_idx, f"{self.source.path}: {prefix}")
        self.block_sizes.add(plan.block_size)
        return BlockPlan(plan.order, plan.block_size, plan.block_group, quant.bits)

    def _maker(self, prefixes: list[str], plan: BlockPlan, part: str, dtype: str,
               out_order: np.ndarray | None) -> Callable:
        """PART of the MatMulNBits tensors of PREFIXES concatenated along N, each Linear's rows permuted by
        OUT_ORDER; converted once per Linear group (the writer asks for B, scales, zero_points in turn)."""
        def make(read: Callable[[str], torch.Tensor]) -> np.ndarray:
            key = "+".join(prefixes)
            if self._cache is None or self._cache[0] != key:
                tensors = []
                for prefix in prefixes:
                    packed = {t: read(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")}
                    tensors.append(matmul_nbits_tensors(packed, plan, dtype))
                    if out_order is not None:
                        tensors[-1] = {p: t[out_order] for p, t in tensors[-1].items()}
                self._cache = (key, {p: np.concatenate([t[p] for t in tensors]) for p in ("B", "scales",
                                                                                          "zero_points")})
            return self._cache[1][part]

        return make

    def _gather(self, b, x: str, order: np.ndarray, prefix: str, name: str) -> str:
        """X[..., order] for a [B, T, K] activation, as Transpose, Gather on axis 0, Transpose: each index then
        copies one contiguous row of B*T values (ONNX Runtime's Gather on the last axis copies value by value,
        six times slower)."""
        key = (x, order.tobytes())
        if key not in self._gathers:
            indices = b.weight(f"{name}_act_order", f"{prefix}.g_idx", make=lambda read, o=order: o)
            columns = b.op("Transpose", x, perm=[2, 0, 1])
            self._gathers[key] = b.op("Transpose", b.op("Gather", columns, indices, axis=0), perm=[1, 2, 0])
        return self._gathers[key]

    def format_options(self, dtype: str) -> dict:
        """What the manifest records about the int4 graph."""
        keys = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")
        bits = sorted({plan.bits for plan in self._plans.values() if plan is not None})
        mixed = {"matmul_nbits_bits": bits, "float_linears": len(self.float_linears)} if \
            self.options.get("dynamic") else {}
        return {"activation_dtype": dtype, **{k: self.options[k] for k in keys},
                "matmul_nbits_block_sizes": sorted(self.block_sizes), "act_order_gathers": len(self._gathers),
                "matmul_nbits_accuracy_level": self.accuracy_level or 0, **mixed}


def _bias_maker(prefixes: list[str], dtype: str, out_order: np.ndarray | None) -> Callable:
    def make(read: Callable[[str], torch.Tensor]) -> np.ndarray:
        biases = [read(f"{p}.bias").to(_TORCH_DTYPE[dtype]) for p in prefixes]
        if out_order is not None:
            biases = [bias[torch.from_numpy(out_order)] for bias in biases]
        return torch.cat(biases).numpy()

    return make
