"""The fake-quantization rule in a few lines, the grid (scale/zero) rule, and round-to-nearest (RTN).

GPTQ (``gptq.py``) uses the same ``grid_params`` and ``quantize_codes``, so RTN is a fair baseline: the
two differ only in how the weights are rounded, never in the grid they are rounded onto.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vexport.errors import InputError
from vexport.quant.types import QuantizedWeight, check_grid_options, num_groups

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (as float) on the grid: ``clamp(round(x / scale) + zero, 0, maxq)``."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def quantize_tensor(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Fake quantization (the GPTQ paper's reference rule): round onto the grid and map back."""
    return scale * (quantize_codes(x, scale, zero, maxq) - zero)


def grid_params(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero point [O] for the weights ``w`` [O, n] of one group.

    asym: the range [min, max] is widened to hold 0, ``scale = (max - min) / maxq``, ``zero = round(-min /
    scale)``. sym: ``scale = 2 max|w| / maxq``, ``zero = (maxq + 1) / 2``. An all-zero row gets the range
    [-1, 1] (any scale codes it exactly). Scales are rounded to float16, the precision GPTQ files store,
    so packing is lossless and GPTQ's error feedback sees the grid the file will hold.
    """
    maxq = 2**bits - 1
    w = w.to(torch.float32)
    if sym:
        amax = w.abs().amax(dim=1)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = _fp16_scale(2 * amax / maxq)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    flat = xmin == xmax
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = _fp16_scale((xmax - xmin) / maxq)
    return scale, torch.round(-xmin / scale).clamp(0, maxq)


def _fp16_scale(scale: Tensor) -> Tensor:
    if bool((scale > FP16_MAX).any()):
        raise InputError(f"a weight group needs a scale above the float16 maximum {FP16_MAX}")
    return scale.to(torch.float16).to(torch.float32).clamp(min=FP16_MIN_SUBNORMAL)


def check_weight(weight: Tensor, name: str = "weight") -> None:
    """Raise InputError unless ``weight`` is a finite floating-point [O, I] matrix; NAME is the checkpoint's
    tensor name, for the message."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor [out_features, in_features]")
    if weight.numel() == 0:
        raise InputError(f"{name} is empty: shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise InputError(f"{name} holds NaN or infinite values: GPTQ cannot quantize it")


def quantize_rtn(weight: Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                 name: str = "weight") -> QuantizedWeight:
    """Round each weight to the nearest point of its group's grid (groups of consecutive inputs); NAME is the
    tensor's name in messages."""
    check_weight(weight, name)
    check_grid_options(bits, group_size)
    w = weight.detach().to(torch.float32)
    out_f, in_f = w.shape
    size = in_f if group_size == -1 else group_size
    n_groups = num_groups(in_f, group_size)
    q = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=w.device)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int32, device=w.device)
    for g in range(n_groups):
        cols = slice(g * size, min((g + 1) * size, in_f))
        scale, zero = grid_params(w[:, cols], bits, sym)
        q[:, cols] = quantize_codes(w[:, cols], scale[:, None], zero[:, None], 2**bits - 1).to(torch.uint8)
        scales[g], zeros[g] = scale, zero.to(torch.int32)
    g_idx = (torch.arange(in_f, device=w.device) // size).to(torch.int32)
    return QuantizedWeight(q, scales, zeros, g_idx, bits, group_size, sym, desc_act=False)
