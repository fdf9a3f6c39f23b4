"""GPTQ for one Linear layer (Frantar et al. 2022, arXiv 2210.17323), written from the paper.

Columns are quantized one at a time onto the grid of ``reference.grid_params``; each column's rounding
error, scaled by the inverse Hessian, is pushed onto the columns not yet quantized. The inverse Hessian is
used in its upper Cholesky form, and updates are applied lazily: inside a block of ``block_size`` columns
at once, to the columns after the block once per block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from vexport.errors import InputError
from vexport.quant.reference import check_weight, grid_params, quantize_codes
from vexport.quant.types import QuantizedWeight, check_grid_options, num_groups

logger = logging.getLogger(__name__)

MAX_DAMP_PERCENT = 1.0  # automatic dampening stops once lambda would exceed the mean of diag(H)
DAMP_FACTOR = 10.0
# Float targets: the least-squares weight is pulled toward W by this fraction of mean(diag H) (0.1 measured
# 0.6 dB better than 0.01 on held-out text with 16x256 calibration tokens; the undampened form overfits).
TARGET_DAMP_PERCENT = 0.1


class GPTQQuantizer:
    """Collects the Hessian ``H = 2/n sum x x^T`` of one Linear's inputs, then quantizes its weight.

    With float targets (``add_batch(x, target=x_float)``), the inputs ``x`` are those the quantized model
    gives this Linear and ``x_float`` those the float model gives it on the same tokens; the objective becomes
    ``sum ||W_q x - W x_float||^2`` (the float model's output, not the layer's own on drifted inputs). It splits
    exactly into ``||(W_q - W') X||^2`` plus a constant, with ``W' = W C H^-1`` and ``C = 2/n sum x_float x^T``:
    the least-squares weight that undoes the drift, which GPTQ then quantizes (dampened toward W).
    """

    def __init__(self, weight: Tensor, name: str = "weight") -> None:
        check_weight(weight, name)
        self.name = name  # the checkpoint's tensor name, for messages
        self.weight = weight.detach()
        in_f = weight.shape[1]
        self.hessian = torch.zeros(in_f, in_f, dtype=torch.float32, device=weight.device)
        self.cross: Tensor | None = None  # C = 2/n sum x_float x^T, with float targets
        self.nsamples = 0
        self.damp_percent_used: float | None = None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def add_batch(self, x: Tensor, target: Tensor | None = None) -> None:
        """Add input rows ``x`` [..., I] to the running average ``H = 2/n sum x x^T`` (float32); with
        ``target`` (the float model's inputs to this Linear on the same tokens) also to ``C``."""
        rows = self._rows(x)
        if rows.shape[0] == 0:
            return
        if (target is None) != (self.cross is None) and self.nsamples:
            raise InputError("GPTQ: give float targets for every calibration batch or for none")
        total = self.nsamples + rows.shape[0]
        scale = (2.0 / total) ** 0.5
        if target is not None:
            reference = self._rows(target)
            if reference.shape != rows.shape:
                raise InputError(f"GPTQ float targets must match the inputs: {tuple(reference.shape)} vs "
                                 f"{tuple(rows.shape)}")
            if self.cross is None:
                self.cross = torch.zeros_like(self.hessian)
            self.cross *= self.nsamples / total
            self.cross.addmm_(reference.T * scale, rows * scale)
        self.hessian *= self.nsamples / total
        rows = rows * scale
        self.hessian.addmm_(rows.T, rows)
        self.nsamples = total

    def _rows(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"GPTQ inputs must have last dimension {self.in_features}, got {shape}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float32)
        if not bool(torch.isfinite(rows).all()):
            raise InputError(f"GPTQ calibration inputs of {self.name} hold NaN or infinite values (a tensor of an "
                             "earlier layer, or the embedding, is not finite)")
        return rows

    def target_weight(self, damp_percent: float = TARGET_DAMP_PERCENT) -> Tensor:
        """The weight GPTQ quantizes: W itself, or with float targets ``W + W (C - H) (H + lambda I)^-1``
        (the least-squares weight for lambda = 0; the dampening pulls it toward W, not toward zero)."""
        weight = self.weight.to(torch.float32)
        if self.cross is None:
            return weight.clone()
        eye = torch.eye(self.in_features, dtype=torch.float32, device=self.hessian.device)
        damped = self.hessian + damp_percent * torch.diagonal(self.hessian).mean() * eye
        drift = weight @ (self.cross - self.hessian)
        return weight + torch.linalg.solve(damped, drift.T).T  # damped is symmetric

    def quantize(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        desc_act: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        target_damp_percent: float = TARGET_DAMP_PERCENT,
    ) -> QuantizedWeight:
        """Quantize the weight with GPTQ; ``desc_act`` orders columns by descending ``diag(H)``."""
        _check_options(bits, group_size, damp_percent, block_size)
        if not target_damp_percent > 0:
            raise InputError(f"GPTQ: target_damp_percent must be positive, got {target_damp_percent}")
        if self.nsamples == 0:
            raise InputError("GPTQ needs calibration inputs: call add_batch() before quantize()")
        w, hessian = _drop_dead_inputs(self.target_weight(target_damp_percent), self.hessian.clone())
        perm = _column_order(hessian, desc_act)
        w, hessian = w[:, perm], hessian[perm][:, perm]
        hinv, self.damp_percent_used = inverse_hessian_cholesky(hessian, damp_percent)
        codes, scales, zeros = _quantize_columns(w, hinv, bits, group_size, sym, block_size)
        size = self.in_features if group_size == -1 else group_size
        g_idx = torch.empty(self.in_features, dtype=torch.int32, device=w.device)
        g_idx[perm] = (torch.arange(self.in_features, device=w.device) // size).to(torch.int32)
        q = torch.empty_like(codes)
        q[:, perm] = codes
        return QuantizedWeight(q, scales, zeros.to(torch.int32), g_idx, bits, group_size, sym, desc_act)


def quantize_linear(weight: Tensor, inputs: Tensor | Iterable[Tensor], **opts: object) -> QuantizedWeight:
    """GPTQ in one call: ``inputs`` is one tensor [..., I] or an iterable of them; ``opts`` go to quantize()."""
    quantizer = GPTQQuantizer(weight)
    for batch in [inputs] if isinstance(inputs, Tensor) else inputs:
        quantizer.add_batch(batch)
    return quantizer.quantize(**opts)  # type: ignore[arg-type]


def inverse_hessian_cholesky(hessian: Tensor, damp_percent: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of ``(H + lambda I)^-1``, ``lambda = damp * mean(diag H)``.

    When a factorization fails, the dampening is raised ×10 (logged) up to ``MAX_DAMP_PERCENT``.
    Returns U and the dampening fraction used.
    """
    mean_diag = torch.diagonal(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = damp_percent
    while True:
        upper = _try_inverse_cholesky(hessian + damp * mean_diag * eye)
        if upper is not None:
            return upper, damp
        if damp * DAMP_FACTOR > MAX_DAMP_PERCENT * (1 + 1e-6):
            raise InputError(f"GPTQ: the Hessian is not positive definite even with dampening {damp:g}")
        logger.warning("GPTQ: Cholesky failed with dampening %g; retrying with %g", damp, damp * DAMP_FACTOR)
        damp *= DAMP_FACTOR


def _try_inverse_cholesky(hessian: Tensor) -> Tensor | None:
    lower, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def _check_options(bits: int, group_size: int, damp_percent: float, block_size: int) -> None:
    check_grid_options(bits, group_size)
    if not 0 < damp_percent <= MAX_DAMP_PERCENT:
        raise InputError(f"damp_percent must be in (0, {MAX_DAMP_PERCENT}], got {damp_percent!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise InputError(f"block_size must be a positive integer, got {block_size!r}")


def _drop_dead_inputs(w: Tensor, hessian: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs never active (H_ii = 0) carry no information: zero their weights, set H_ii = 1."""
    dead = torch.diagonal(hessian) == 0
    if bool(dead.any()):
        logger.info("GPTQ: %d of %d inputs are never active; their weights quantize to 0", int(dead.sum()), len(dead))
        hessian[dead, dead] = 1.0
        w[:, dead] = 0.0
    return w, hessian


def _column_order(hessian: Tensor, desc_act: bool) -> Tensor:
    n = hessian.shape[0]
    if not desc_act:
        return torch.arange(n, device=hessian.device)
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def _quantize_columns(
    w: Tensor, hinv: Tensor, bits: int, group_size: int, sym: bool, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize the (already permuted) columns of ``w`` in place; return codes, scales, zeros."""
    out_f, in_f = w.shape
    size = in_f if group_size == -1 else group_size
    grid = _Grid(num_groups(in_f, group_size), out_f, size, bits, sym, w.device)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    for start in range(0, in_f, block_size):
        end = min(start + block_size, in_f)
        codes[:, start:end] = _quantize_block(w, hinv, start, end, grid)
    return codes, grid.scales, grid.zeros


class _Grid:
    """The groups' scales and zeros, filled in as each group starts."""

    def __init__(self, n_groups: int, out_f: int, size: int, bits: int, sym: bool, device: torch.device):
        self.size, self.bits, self.sym, self.maxq = size, bits, sym, 2**bits - 1
        self.scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=device)
        self.zeros = torch.empty(n_groups, out_f, dtype=torch.float32, device=device)

    def start_group(self, col: int, pending: Tensor) -> None:
        self.scales[col // self.size], self.zeros[col // self.size] = grid_params(pending, self.bits, self.sym)

    def codes(self, col: int, w: Tensor) -> tuple[Tensor, Tensor]:
        scale, zero = self.scales[col // self.size], self.zeros[col // self.size]
        q = quantize_codes(w, scale, zero, self.maxq)
        return q, scale * (q - zero)


def _quantize_block(w: Tensor, hinv: Tensor, start: int, end: int, grid: _Grid) -> Tensor:
    """Quantize columns [start, end) one by one with error feedback; then update the later columns."""
    block = w[:, start:end].clone()
    errors = torch.zeros_like(block)
    codes = torch.empty(block.shape, dtype=torch.uint8, device=w.device)
    hinv_block = hinv[start:end, start:end]
    for i in range(end - start):
        col = start + i
        if col % grid.size == 0:
            grid.start_group(col, _pending_group(w, block, errors, hinv, start, col, grid.size))
        q, dq = grid.codes(col, block[:, i])
        codes[:, i] = q.to(torch.uint8)
        err = (block[:, i] - dq) / hinv_block[i, i]
        block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
        errors[:, i] = err
    w[:, start:end] = block
    w[:, end:] -= errors @ hinv[start:end, end:]
    return codes


def _pending_group(w: Tensor, block: Tensor, errors: Tensor, hinv: Tensor, start: int, col: int, size: int) -> Tensor:
    """The not-yet-quantized weights of the group starting at ``col``, with every update so far applied
    (columns past the block have not yet received this block's lazy update: apply it here)."""
    end = start + block.shape[1]
    group_end = min(col + size, w.shape[1])
    inside = block[:, col - start : min(group_end, end) - start]
    if group_end <= end:
        return inside
    outside = w[:, end:group_end] - errors @ hinv[start:end, end:group_end]
    return torch.cat([inside, outside], dim=1)
