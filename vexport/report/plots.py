"""The report's plots, drawn with matplotlib (Agg, no display) from `figure_data` dicts, as PNG bytes.

Each function takes the plain data the JSON report keeps (see vexport.report.figures) and returns one PNG.
Figures are built as `matplotlib.figure.Figure` objects, never through pyplot, so no global figure state
is kept between calls and nothing needs a display.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 110
PANEL_SIZE = (4.4, 3.3)  # inches: three panels fit side by side on a laptop screen
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3}


def color(index: int) -> str:
    """The colour of the artifact at `index`, the same in every plot."""
    return COLORS[index % len(COLORS)]


def data_uri(png: bytes) -> str:
    """A `data:` URI for an <img> that needs no file beside the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _styled(draw: Callable[..., bytes]) -> Callable[..., bytes]:
    """Draw under the report's style without touching matplotlib's global settings."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> bytes:
        with matplotlib.rc_context(_STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _new_figure(size: tuple[float, float] = PANEL_SIZE, panels: int = 1) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    return figure, list(np.atleast_1d(figure.subplots(1, panels)))


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _positive(values: Sequence[float]) -> np.ndarray:
    """Values for a log axis: zeros and non-finite values become NaN (a gap in the line)."""
    array = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(array) & (array > 0), array, np.nan)


def _log_if_positive(ax: Axes, *series: np.ndarray) -> None:
    if any(np.any(np.isfinite(s)) for s in series):
        ax.set_yscale("log")


@_styled
def scatter_png(data: Mapping[str, Any], label: str, index: int = 0) -> bytes:
    """Candidate against reference value per token, with the line y = x."""
    figure, (ax,) = _new_figure()
    ref, cand = np.asarray(data["reference"], float), np.asarray(data["candidate"], float)
    ax.scatter(ref, cand, s=4, alpha=0.35, color=color(index), linewidths=0, rasterized=True)
    if ref.size:
        low, high = float(min(ref.min(), cand.min())), float(max(ref.max(), cand.max()))
        ax.plot([low, high], [low, high], color="black", linewidth=0.8, linestyle="--", label="y = x")
        ax.legend(loc="upper left", frameon=False)
    ax.set_xlabel("reference value")
    ax.set_ylabel("candidate value")
    ax.set_title(f"{label}: values ({data['sampled']} of {data['of']} tokens)")
    return _png(figure)


@_styled
def error_histogram_png(data: Mapping[str, Any], label: str, index: int = 0) -> bytes:
    """Histogram of the per-token error, candidate - reference (log count axis)."""
    figure, (ax,) = _new_figure()
    counts, edges = np.asarray(data["counts"], float), np.asarray(data["edges"], float)
    ax.stairs(counts, edges, fill=True, color=color(index), alpha=0.75)
    ax.axvline(0.0, color="black", linewidth=0.8)
    if counts.max(initial=0) > 0:
        ax.set_yscale("log")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("candidate − reference (per token)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{label}: error (mean {data['mean']:.2g}, std {data['std']:.2g})")
    return _png(figure)


@_styled
def error_by_position_png(data: Mapping[str, Any], label: str, index: int = 0) -> bytes:
    """Mean, 95th percentile and max |error| against token position (bins of positions)."""
    figure, (ax,) = _new_figure()
    middle = (np.asarray(data["start"], float) + np.asarray(data["end"], float) - 1) / 2
    series = {name: _positive(data[key]) for name, key in
              (("max", "max_abs_error"), ("95th percentile", "p95_abs_error"), ("mean", "mean_abs_error"))}
    for (name, values), alpha in zip(series.items(), (0.35, 0.6, 1.0)):
        ax.plot(middle, values, marker=".", markersize=3, color=color(index), alpha=alpha, label=name)
    _log_if_positive(ax, *series.values())
    ax.legend(loc="best", frameon=False)
    ax.set_xlabel("token position")
    ax.set_ylabel("|candidate − reference|")
    ax.set_title(f"{label}: error along the sequence")
    return _png(figure)


@_styled
def overview_png(artifacts: Sequence[Mapping[str, Any]]) -> bytes:
    """Every artifact side by side: per-token SQNR (bars) and mean |error| by token position (lines)."""
    figure, (bars, lines) = _new_figure((10.0, 3.4), panels=2)
    labels = [a["label"] for a in artifacts]
    sqnr = [_as_float(a["parity"]["sqnr_db"]) for a in artifacts]
    finite = [v for v in sqnr if np.isfinite(v)]
    top = max(max(finite, default=1.0), 1.0) * 1.15
    shown = [float(np.clip(v, 0.0, top)) if not np.isnan(v) else 0.0 for v in sqnr]
    drawn = bars.barh(labels, shown, color=[color(i) for i in range(len(artifacts))])
    bars.bar_label(drawn, labels=[_db(v) for v in sqnr], padding=3, fontsize=8)
    bars.set_xlim(0, top * 1.2)
    bars.invert_yaxis()
    bars.set_xlabel("per-token SQNR (dB, higher is closer)")
    bars.set_title("fidelity")
    for i, artifact in enumerate(artifacts):
        data = artifact["figures"]["error_by_position"]
        middle = (np.asarray(data["start"], float) + np.asarray(data["end"], float) - 1) / 2
        lines.plot(middle, _positive(data["mean_abs_error"]), color=color(i), marker=".", markersize=3,
                   label=artifact["label"])
    lines.set_yscale("log")
    lines.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    lines.set_xlabel("token position")
    lines.set_ylabel("mean |candidate − reference|")
    lines.set_title("error along the sequence")
    return _png(figure)


def _as_float(value: Any) -> float:
    """A JSON metric ("inf"/"nan" strings included) as a float."""
    return float(value) if value is not None else float("nan")


def _db(value: float) -> str:
    if np.isnan(value):
        return "n/a"
    return "identical" if value == np.inf else f"{value:.1f} dB"
