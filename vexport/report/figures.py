"""The data behind a report's plots, reduced from per-token values to a few small arrays (plain numbers).

`figure_data` turns the per-sequence values of a reference and a candidate into what the plots draw: a
sample of (reference, candidate) token pairs for the scatter, a histogram of the per-token error
(candidate - reference), and the absolute error against token position in bins. The JSON report keeps this
data, so the HTML page can be redrawn from the JSON alone. Non-finite tokens are left out and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SCATTER_POINTS = 2000  # tokens drawn in the scatter (a seeded sample when there are more)
HISTOGRAM_BINS = 60
POSITION_BINS = 48
_DIGITS = 6  # significant digits kept: the JSON stays small, the plots do not change


def figure_data(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], *, seed: int,
                scatter_points: int = SCATTER_POINTS) -> dict[str, Any]:
    """Scatter sample, error histogram and error by position of one candidate against the reference."""
    ref = np.concatenate([np.asarray(r, dtype=np.float64) for r in reference])
    cand = np.concatenate([np.asarray(c, dtype=np.float64) for c in candidate])
    positions = np.concatenate([np.arange(len(r)) for r in reference])
    finite = np.isfinite(ref) & np.isfinite(cand)
    ref, cand, positions = ref[finite], cand[finite], positions[finite]
    return {
        "tokens": int(ref.size),
        "nonfinite_tokens": int(np.sum(~finite)),
        "scatter": _scatter(ref, cand, seed, scatter_points),
        "error_histogram": _histogram(cand - ref),
        "error_by_position": _by_position(np.abs(cand - ref), positions),
    }


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.{_DIGITS}g}") for v in np.asarray(values, dtype=np.float64)]


def _scatter(ref: np.ndarray, cand: np.ndarray, seed: int, points: int) -> dict[str, Any]:
    """Up to `points` tokens, chosen with `seed` (all of them when there are fewer), in token order."""
    chosen = np.arange(ref.size)
    if ref.size > points:
        chosen = np.sort(np.random.default_rng(seed).choice(ref.size, size=points, replace=False))
    return {"reference": _rounded(ref[chosen]), "candidate": _rounded(cand[chosen]), "sampled": int(chosen.size),
            "of": int(ref.size), "seed": seed}


def _histogram(error: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    counts, edges = np.histogram(error, bins=bins, range=_histogram_range(error))
    mean = float(error.mean()) if error.size else 0.0
    std = float(error.std()) if error.size else 0.0
    return {"edges": _rounded(edges), "counts": [int(c) for c in counts], "mean": mean, "std": std}


def _histogram_range(error: np.ndarray) -> tuple[float, float]:
    """The errors' range, widened around its centre when (nearly) every error is the same number."""
    if not error.size:
        return -1.0, 1.0
    low, high = float(error.min()), float(error.max())
    centre = (low + high) / 2
    half = max(abs(centre) * 1e-3, 1e-12)
    return (low, high) if high - low > 2 * half else (centre - half, centre + half)


def _by_position(abs_error: np.ndarray, positions: np.ndarray, bins: int = POSITION_BINS) -> dict[str, Any]:
    """Mean, 95th percentile and max |error| of the tokens in each bin of positions [start, end)."""
    length = int(positions.max()) + 1 if positions.size else 1
    width = max(1, -(-length // bins))
    rows: dict[str, list] = {"start": [], "end": [], "tokens": [], "mean_abs_error": [], "p95_abs_error": [],
                             "max_abs_error": []}
    for start in range(0, length, width):
        in_bin = abs_error[(positions >= start) & (positions < start + width)]
        if not in_bin.size:
            continue
        rows["start"].append(start)
        rows["end"].append(start + width)
        rows["tokens"].append(int(in_bin.size))
        rows["mean_abs_error"].append(float(in_bin.mean()))
        rows["p95_abs_error"].append(float(np.percentile(in_bin, 95)))
        rows["max_abs_error"].append(float(in_bin.max()))
    for key in ("mean_abs_error", "p95_abs_error", "max_abs_error"):
        rows[key] = _rounded(np.array(rows[key]))
    return rows
