"""GPTQ v1 int4 weights in PyTorch's packed int4 CPU layout (``aten._weight_int4pack_mm_for_cpu``).

The op computes ``x @ W^T`` with ``W[n, k] = (q[n, k] - 8) * scale[j, n] + zero[j, n]``, ``j = k // group``, for
groups of 32, 64, 128 or 256 contiguous input columns, ``N`` a multiple of 16, and activations, scales and zeros
in one dtype. In torch 2.13 only its bfloat16 path is vectorized (float32 and float16 activations run a scalar
loop, tens to hundreds of times slower than a float GEMM), so it runs in bfloat16 and casts back.

From GPTQ v1 (``W[o, i] = s[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``, FORMATS.md):
- the op's zero is ``s * (8 - z)``, since ``s (q - z) = (q - 8) s + s (8 - z)``;
- act-order (``g_idx`` not ``i // group``): the input columns are permuted once, at load, by the stable sort
  of ``g_idx``, so each group's columns are contiguous; the forward gathers ``x``'s columns in that order;
- a GPTQ group of ``c`` columns is run as ``c / k`` kernel groups of ``k`` (the largest of 256..32 dividing
  every group's ``c``), each with the group's scale and zero: exact, and how ``group_size=-1``, groups above
  256 and a shorter last group fit.

``unsupported_reason`` says why a Linear cannot take this path (it then keeps the dequantized one).

Prefill (``prefill="bfloat16"``, opt-in): from ``DENSE_MIN_ROWS`` rows on, the op is compute-bound at float32's
speed (it dequantizes a weight tile for every few rows and multiplies in float32), while oneDNN's bfloat16 GEMM
(``avx512_bf16`` dot products) runs about twice as fast. ``pack_for_cpu(..., dense=True)`` keeps a bfloat16 copy
of the dequantized weight, reordered once for oneDNN, and ``int4_linear`` sends calls of that many rows to it:
the same dequantized weight rounded to bfloat16 (8 bits of mantissa, where the int4 codes need 4), at 2 more
bytes per weight in memory. Fewer rows (value-guided steps, decoding) keep the int4 op, which reads a quarter
of the bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the op accepts, largest first
N_MULTIPLE = 16  # the op's out_features must be a multiple of this
INNER_K_TILES = 2  # ignored by the CPU layout beyond validation; the CUDA default
COMPUTE_DTYPE = torch.bfloat16
DENSE_MIN_ROWS = 8  # rows from which oneDNN bfloat16 beats the int4 op (scripts/bench_int4_cpu.py --sweep)
DENSE_ROWS_HINT = 1024  # the row count oneDNN lays the bfloat16 weight out for (as backends/cpu_linear.py)


@dataclass(frozen=True)
class PackedInt4:
    """One Linear in the op's layout: ``weight`` uint8 [O, I/2], ``scale_and_zeros`` [I/group, O, 2] bfloat16,
    ``perm`` int64 [I] (the input column order) or None where the columns are already in group order;
    ``dense`` the oneDNN-reordered bfloat16 weight [O, I] (input columns in their own order) for prefills, or None."""

    weight: Tensor
    scale_and_zeros: Tensor
    group_size: int
    perm: Tensor | None
    dense: Tensor | None = None


def op_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def dense_unavailable_reason() -> str | None:
    """None when oneDNN runs bfloat16 GEMMs natively here (the ``prefill="bfloat16"`` path), else why not."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return f"torch {torch.__version__} has no oneDNN linear"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bfloat16 dot products (avx512_bf16 or AMX)"
    return None


def unsupported_reason(out_features: int, g_idx: Tensor, groups: int,
                       capability: str | None = None, bits: int = 4) -> str | None:
    """None when the op can run this Linear exactly, else why not (one phrase, for the log)."""
    if bits != 4:
        return f"{bits}-bit weights: the op takes 4-bit codes only"
    if not op_available():
        return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):  # as get_cpu_capability() spells it: AVX512, AVX2, NO AVX, ...
        return f"CPU capability {capability}: the op's bfloat16 path is vectorized for AVX512 only"
    if out_features % N_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {N_MULTIPLE}"
    sizes = group_gcd(g_idx, groups)
    if _kernel_group(sizes) is None:
        return f"group size {sizes} is not a multiple of 32"
    return None


def group_gcd(g_idx: Tensor, groups: int) -> int:
    """The gcd of the groups' column counts (a shorter last group included)."""
    return math.gcd(*torch.bincount(g_idx.long(), minlength=groups).tolist())


def _kernel_group(columns: int) -> int | None:
    return next((k for k in KERNEL_GROUPS if columns % k == 0), None)


def pack_for_cpu(codes: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor,
                 dense_weight: Tensor | None = None) -> PackedInt4:
    """``codes`` int32 [I, O] (0..15), ``zeros`` int32 [G, O] (true zero points), ``scales`` [G, O], ``g_idx``
    [I]: the op's layout. ``dense_weight`` (the dequantized [O, I], for the prefill path) is kept in bfloat16,
    reordered for oneDNN. The caller checks ``unsupported_reason`` (and ``dense_unavailable_reason``) first."""
    groups = g_idx.long()
    order = torch.sort(groups, stable=True).indices
    identity = bool((order == torch.arange(len(order))).all())
    group_size = _kernel_group(group_gcd(g_idx, scales.shape[0]))
    first = groups[order][::group_size]  # the GPTQ group of each kernel group
    scale = scales.to(torch.float32)[first]  # [I/k, O]
    zero = scale * (8 - zeros.to(torch.float32)[first])
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[order].T.contiguous(), INNER_K_TILES)
    scale_and_zeros = torch.stack([scale, zero], dim=-1).to(COMPUTE_DTYPE).contiguous()
    dense = None
    if dense_weight is not None:
        dense = torch.ops.mkldnn._reorder_linear_weight(dense_weight.to(COMPUTE_DTYPE).contiguous(), DENSE_ROWS_HINT)
    return PackedInt4(weight, scale_and_zeros, group_size, None if identity else order, dense)


def int4_linear(x: Tensor, packed: PackedInt4, bias: Tensor | None) -> Tensor:
    """``x @ W^T + bias`` in bfloat16 through the op (or, from ``DENSE_MIN_ROWS`` rows, oneDNN's bfloat16 GEMM
    where ``packed.dense`` is kept), returned in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
    if packed.dense is not None and flat.shape[0] >= DENSE_MIN_ROWS:
        out = torch.ops.mkldnn._linear_pointwise(flat, packed.dense, None, "none", [], "")
    else:
        if packed.perm is not None:
            flat = flat.index_select(1, packed.perm)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed.weight, packed.group_size,
                                                         packed.scale_and_zeros)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
