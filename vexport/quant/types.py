"""The quantized weight of one Linear, as plain tensors: integer codes, per-group scales and zero points."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vexport.errors import InputError

MIN_BITS = 2
MAX_BITS = 8


def check_grid_options(bits: int, group_size: int) -> None:
    """Raise InputError unless ``bits`` fits a uint8 code and ``group_size`` is -1 or positive."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise InputError(f"group_size must be -1 (one group) or a positive integer, got {group_size!r}")


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(I / g); the last group is shorter when g does not divide I. ``-1`` means one group."""
    return 1 if group_size == -1 else max(1, math.ceil(in_features / group_size))


@dataclass
class QuantizedWeight:
    """Codes ``q`` [O, I] (uint8, ORIGINAL input order), ``scales`` float32 [G, O], ``zeros`` int32 [G, O]
    (the true zero point), ``g_idx`` int32 [I] (the group of each input column; with act-order it is the
    permutation-derived grouping). ``W[o, i] = scales[g_idx[i], o] * (q[o, i] - zeros[g_idx[i], o])``."""

    q: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    sym: bool
    desc_act: bool

    def __post_init__(self) -> None:
        check_grid_options(self.bits, self.group_size)
        self._check_shapes()
        self._check_ranges()

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[0])

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [O, I] the codes stand for, computed in float32 and cast to ``dtype``."""
        groups = self.g_idx.long()
        scale = self.scales[groups].T  # [O, I]
        zero = self.zeros[groups].T.to(torch.float32)
        return (scale * (self.q.to(torch.float32) - zero)).to(dtype)

    def _check_shapes(self) -> None:
        expected = {"q": torch.uint8, "scales": torch.float32, "zeros": torch.int32, "g_idx": torch.int32}
        for name, dtype in expected.items():
            if getattr(self, name).dtype != dtype:
                raise InputError(f"QuantizedWeight.{name} must be {dtype}, got {getattr(self, name).dtype}")
        if self.q.dim() != 2:
            raise InputError(f"QuantizedWeight.q must be 2-D [O, I], got shape {tuple(self.q.shape)}")
        out_f, in_f = self.q.shape
        if self.scales.dim() != 2 or self.scales.shape[1] != out_f or self.zeros.shape != self.scales.shape:
            raise InputError(
                f"QuantizedWeight scales/zeros must both be [G, {out_f}], got "
                f"{tuple(self.scales.shape)} and {tuple(self.zeros.shape)}"
            )
        if tuple(self.g_idx.shape) != (in_f,):
            raise InputError(f"QuantizedWeight.g_idx must be [{in_f}], got {tuple(self.g_idx.shape)}")
        if self.scales.shape[0] != num_groups(in_f, self.group_size):
            raise InputError(
                f"QuantizedWeight has {self.scales.shape[0]} groups; group_size {self.group_size} over "
                f"{in_f} inputs gives {num_groups(in_f, self.group_size)}"
            )

    def _check_ranges(self) -> None:
        if self.q.numel() and int(self.q.max()) > self.maxq:
            raise InputError(f"QuantizedWeight.q holds codes above {self.maxq} for {self.bits} bits")
        if self.zeros.numel() and (int(self.zeros.min()) < 0 or int(self.zeros.max()) > self.maxq):
            raise InputError(f"QuantizedWeight.zeros must lie in 0..{self.maxq}")
        if self.g_idx.numel() and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.num_groups):
            raise InputError(f"QuantizedWeight.g_idx must lie in 0..{self.num_groups - 1}")
