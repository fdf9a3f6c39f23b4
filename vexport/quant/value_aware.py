"""Value-aware calibration: repair what quantization does to the *values*, keeping the checkpoint standard.

Two steps, both on by default in the GPTQ export (``--no-value-calibration`` turns both off):

1. float targets (``GPTQOptions.float_targets``, in ``vexport.quant.gptq``/``stream``): each Linear is fitted
   to what the *float* model computes on the calibration text, not to its own output on the drifted inputs the
   quantized layers before it produce, so the error does not pile up layer after layer;
2. the head refit below.

A quantized backbone shrinks the value signal and shifts every value by a near-constant amount. The score
head stays in float16, so it can absorb that: refit it on the quantized backbone's final hidden states
against the float reference's values on the calibration text. Three fits, from least to most freedom:

- ``bias``:   v = f·w + b'              (one shift)
- ``affine``: v = a·(f·w) + b'          (a scale and a shift of the original head)
- ``full``:   v = f·w' + b'             (ridge least squares over every head weight)

The fit is chosen on a held-apart part of the calibration windows (never the evaluation text), then refit on
all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MODES = ("none", "bias", "affine", "full")


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor  # [1, H] float32
    bias: torch.Tensor  # [1] float32

    def values(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight[0] + self.bias[0]


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: inverse RMS in float32, cast back, then the weight multiply."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(hidden.dtype) * x.to(hidden.dtype)).float()


def fit_head(features: torch.Tensor, target: torch.Tensor, head: Head, mode: str, ridge: float = 1e-4) -> Head:
    """Refit HEAD so that head.values(features) ≈ target, with the freedom MODE allows."""
    if mode == "none":
        return head
    if mode == "bias":
        shift = (target - head.values(features)).mean()
        return Head(head.weight, head.bias + shift)
    if mode == "affine":
        base = features @ head.weight[0]
        design = torch.stack([base, torch.ones_like(base)], dim=1).double()
        scale, shift = torch.linalg.lstsq(design, target.double()[:, None]).solution[:, 0]
        return Head(head.weight * float(scale), torch.tensor([float(shift)]))
    if mode == "full":
        return _ridge(features, target, ridge)
    raise ValueError(f"unknown head fit mode {mode!r}")


def _ridge(features: torch.Tensor, target: torch.Tensor, ridge: float) -> Head:
    x = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = x.T @ x
    penalty = ridge * torch.diagonal(gram)[:-1].mean()
    gram[range(gram.shape[0] - 1), range(gram.shape[0] - 1)] += penalty
    solution = torch.linalg.solve(gram, x.T @ target.double())
    return Head(solution[:-1].float()[None], solution[-1:].float())


def sqnr(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float(20 * torch.log10(reference.norm() / (reference - candidate).norm().clamp_min(1e-30)))


def choose_and_fit(features: torch.Tensor, target: torch.Tensor, head: Head, windows: int,
                   modes: tuple[str, ...] = MODES) -> tuple[Head, str, dict[str, float]]:
    """Pick the mode with the best SQNR on the last quarter of the windows (fit on the rest), refit on all.

    FEATURES [N*L, H] and TARGET [N*L] are window-major, WINDOWS = N.
    """
    if windows < 2:
        return fit_head(features, target, head, "affine"), "affine", {}
    per_window = features.shape[0] // windows
    split = max(1, windows - max(1, windows // 4)) * per_window
    scores = {}
    for mode in modes:
        fitted = fit_head(features[:split], target[:split], head, mode)
        scores[mode] = sqnr(target[split:], fitted.values(features[split:]))
    best = max(scores, key=scores.get)
    log.info("value-aware head fit on held-apart calibration windows (dB): %s -> %s",
             ", ".join(f"{m} {s:.2f}" for m, s in scores.items()), best)
    return fit_head(features, target, head, best), best, scores
