"""GPTQ v1 packing (``checkpoint_format: gptq``), 4 or 8 bits, as written down in FORMATS.md.

With ``p = 32 / bits`` codes per int32 word (8 at 4 bits, 4 at 8 bits):
``qweight`` int32 [I/p, O]: p codes along the input dimension per word, the first in the lowest bits.
``qzeros`` int32 [G, O/p]: p zero points along the output dimension per word, lowest bits first, stored as
``zero - 1`` by subtracting ``v1_zero_offset(bits)`` (0x11111111 at 4 bits, 0x01010101 at 8) from the whole
word (borrows included), as GPTQModel's v1 <-> v2 conversion adds it back. ``scales`` float16 [G, O].
``g_idx`` int32 [I]. Packing is done in int64 and wrapped to int32 at the end; ``unpack_codes`` reads only
bits 0..31 of each word, so it is the one unpacking of the format, for the checked reader here and the runtime.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vexport.errors import InputError
from vexport.quant.types import QuantizedWeight

PACK_BITS = (4, 8)
PER_WORD = 8  # codes per word at 4 bits (per_word(bits) in general)
V1_ZERO_OFFSET = 0x11111111  # at 4 bits (v1_zero_offset(bits) in general)
_WORD = 1 << 32
TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


def pack_gptq_v1(qw: QuantizedWeight) -> dict[str, Tensor]:
    """The four GPTQ v1 tensors of one Linear (on the device of ``qw``)."""
    _check_bits(qw.bits)
    for name, size in (("in_features", qw.in_features), ("out_features", qw.out_features)):
        if size % per_word(qw.bits):
            raise InputError(f"GPTQ v1 packing at {qw.bits} bits needs {name} divisible by {per_word(qw.bits)}, "
                             f"got {size}")
    qweight = _pack_last(qw.q.to(torch.int64), qw.bits).T  # [O, I/p] -> [I/p, O]
    qzeros = _pack_last(qw.zeros.to(torch.int64), qw.bits) - v1_zero_offset(qw.bits)
    return {
        "qweight": _wrap_int32(qweight).contiguous(),
        "qzeros": _wrap_int32(qzeros),
        "scales": qw.scales.to(torch.float16),
        "g_idx": qw.g_idx.to(torch.int32).clone(),
    }


def unpack_gptq_v1(
    tensors: dict[str, Tensor],
    bits: int = 4,
    *,
    group_size: int | None = None,
    sym: bool | None = None,
    desc_act: bool | None = None,
) -> QuantizedWeight:
    """Read the four tensors back. ``group_size``, ``sym`` and ``desc_act`` are inferred from the tensors
    when not given (the largest group's size, or -1 for one group; all zeros at 2^(bits-1); g_idx not
    sorted); pass them from the checkpoint's quantize config where it is known."""
    _check_bits(bits)
    qweight, qzeros, scales, g_idx = _checked_tensors(tensors, bits)
    codes, zeros = unpack_codes(qweight, qzeros, bits)
    q = codes.T.to(torch.uint8).contiguous()  # [O, I]
    g_idx = g_idx.to(torch.int32)
    if group_size is None:
        counts = torch.bincount(g_idx.long(), minlength=scales.shape[0])
        group_size = -1 if scales.shape[0] == 1 else int(counts.max())
    if sym is None:
        sym = bool((zeros == 2 ** (bits - 1)).all())
    if desc_act is None:
        desc_act = bool((g_idx[1:] < g_idx[:-1]).any())
    return QuantizedWeight(q, scales.to(torch.float32), zeros, g_idx, bits, group_size, sym, desc_act)


def dequantize_gptq_v1(tensors: dict[str, Tensor], dtype: torch.dtype = torch.float16, bits: int = 4) -> Tensor:
    """The weight [O, I] the GPTQ v1 tensors stand for: ``scales[g_idx[i], o] * (q[o, i] - zero[g_idx[i], o])``
    computed in float32, then cast to ``dtype``."""
    return unpack_gptq_v1(tensors, bits).dequantize(dtype)


def per_word(bits: int) -> int:
    """Codes per int32 word."""
    return 32 // bits


def v1_zero_offset(bits: int) -> int:
    """What v1 subtracts from each packed zero-point word: a 1 in every field (0x11111111 at 4 bits)."""
    return sum(1 << (bits * j) for j in range(per_word(bits)))


def bits_of(qweight_rows: int, in_features: int) -> int | None:
    """The bits a qweight of QWEIGHT_ROWS rows packs for IN_FEATURES inputs (None when no width fits)."""
    return next((b for b in PACK_BITS if qweight_rows * per_word(b) == in_features), None)


def unpack_codes(qweight: Tensor, qzeros: Tensor, bits: int = 4) -> tuple[Tensor, Tensor]:
    """The int32 codes [I, O] and true zero points [G, O] of GPTQ v1 ``qweight`` [I/p, O] and ``qzeros``
    [G, O/p], unchecked (``unpack_gptq_v1`` checks first) and without host syncs, so the runtime's
    dequantization can call it per forward. The v1 zero offset is added to the whole word in int64; only bits
    0..31 are read, so the sign bits of the int32 and int64 words never matter."""
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])  # [I, O]
    words = qzeros.to(torch.int64) + v1_zero_offset(bits)
    zeros = ((words[:, :, None] >> shifts.long()) & mask).reshape(qzeros.shape[0], -1).to(torch.int32)  # [G, O]
    return codes, zeros


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise InputError(f"GPTQ v1 packing supports {' or '.join(map(str, PACK_BITS))} bits, got {bits!r}")


def _checked_tensors(tensors: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise InputError(f"GPTQ v1 tensors missing: {', '.join(missing)}")
    qweight, qzeros, scales, g_idx = (tensors[name] for name in TENSOR_NAMES)
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise InputError(f"GPTQ v1 {name} must be int32, got {t.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or g_idx.dim() != 1:
        raise InputError("GPTQ v1 tensors must be qweight [I/p, O], qzeros [G, O/p], scales [G, O], g_idx [I]")
    width = per_word(bits)
    in_f, out_f = qweight.shape[0] * width, qweight.shape[1]
    n_groups = scales.shape[0]
    if tuple(qzeros.shape) != (n_groups, out_f // width) or scales.shape[1] != out_f or len(g_idx) != in_f:
        raise InputError(
            f"GPTQ v1 shapes disagree at {bits} bits: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}"
        )
    if out_f % width or n_groups < 1 or not scales.is_floating_point():
        raise InputError(f"GPTQ v1 needs out_features divisible by {width}, at least one group and float scales, "
                         f"got scales {tuple(scales.shape)} {scales.dtype}")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise InputError(f"GPTQ v1 g_idx must lie in 0..{n_groups - 1}")
    return qweight, qzeros, scales, g_idx


def _pack_last(values: Tensor, bits: int) -> Tensor:
    """int64 [..., pk] -> int64 [..., k]: p = 32 / bits consecutive values per word, the first in the lowest bits."""
    shifts = torch.arange(per_word(bits), device=values.device, dtype=torch.int64) * bits
    grouped = values.reshape(*values.shape[:-1], -1, per_word(bits))
    return (grouped << shifts).sum(dim=-1)


def _wrap_int32(words: Tensor) -> Tensor:
    """int64 words taken modulo 2^32, reinterpreted as two's-complement int32."""
    unsigned = words % _WORD
    return torch.where(unsigned >= _WORD // 2, unsigned - _WORD, unsigned).to(torch.int32)

