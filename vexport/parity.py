"""Parity metrics on plain arrays: per-token values, whole-sequence values and ranking within prompt groups.

This module knows nothing about backends or models. The caller runs the same batches through a reference
and a candidate, strips the padding, and passes one 1-D float array of per-token values per sequence.
`compare` measures everything, checks every metric against a `Thresholds`, and collects all failures
before deciding `passed` (one failure never hides another).

Statistics, not `allclose`: an exported or quantized model is judged by SQNR, correlation and ranking
agreement with thresholds per `format/precision` (see DEFAULT_THRESHOLDS). Kernel-vs-reference tests use
tight tolerances elsewhere; the two regimes are never mixed.

JSON convention (`to_dict`, `summary`): non-finite floats are written as the strings "inf", "-inf" and
"nan" (SQNR is "inf" when candidate and reference are identical); a threshold of null means "not checked".
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import stats

from vexport.errors import InputError, VexportError


# --------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for one comparison. `max_abs_error=None` means absolute error is not checked."""

    min_sqnr_db: float
    max_abs_error: float | None
    min_pearson: float
    min_spearman: float
    min_pairwise_agreement: float
    min_top1_agreement: float

    def replace(self, **overrides: float | None) -> Thresholds:
        """A copy with some limits changed; an unknown name raises VexportError naming it."""
        names = {f.name for f in dataclasses.fields(self)}
        for name, value in overrides.items():
            if name not in names:
                known = ", ".join(sorted(names))
                raise VexportError(f"unknown parity threshold {name!r} (known: {known})")
            _check_threshold_value(name, value)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_threshold_value(name: str, value: object) -> None:
    if value is None and name == "max_abs_error":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise VexportError(f"parity threshold {name!r} must be a number, got {value!r}")


#: The strict limits used for any `format/precision` not in DEFAULT_THRESHOLDS: a lossless export.
STRICT_THRESHOLDS = Thresholds(
    min_sqnr_db=60.0,
    max_abs_error=1e-3,
    min_pearson=0.9999,
    min_spearman=0.9999,
    min_pairwise_agreement=0.99,
    min_top1_agreement=1.0,
)

_HALF = Thresholds(  # fp16 against an fp32 reference measures ~40-50 dB
    min_sqnr_db=30.0,
    max_abs_error=None,
    min_pearson=0.995,
    min_spearman=0.99,
    min_pairwise_agreement=0.95,
    min_top1_agreement=0.85,
)

_INT4 = Thresholds(  # GPTQ int4 on a small model measures ~10-20 dB, pearson ~0.95-0.99, pairs ~0.8-0.9
    min_sqnr_db=8.0,
    max_abs_error=None,
    min_pearson=0.90,
    min_spearman=0.88,
    min_pairwise_agreement=0.75,
    min_top1_agreement=0.5,
)

#: Limits per "format/precision" (read-only).
DEFAULT_THRESHOLDS: Mapping[str, Thresholds] = MappingProxyType(
    {
        "onnx/float32": STRICT_THRESHOLDS,
        "onnx/float16": _HALF,
        "torch/float16": _HALF,
        # TensorRT may pick fp16-accumulating tactics: a little looser than ONNX Runtime fp16.
        "tensorrt/float16": _HALF.replace(
            min_sqnr_db=25.0, min_pearson=0.99, min_spearman=0.98, min_top1_agreement=0.8
        ),
        "gptq/int4": _INT4,
        "onnx/int4": _INT4,
        "tensorrt/int4": _INT4,
    }
)

_PRECISION_ALIASES = MappingProxyType(
    {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "w4a16": "int4"}
)


def thresholds_for(
    format: str, precision: str, overrides: Mapping[str, float] | None = None
) -> Thresholds:
    """The default limits for `format/precision` with `overrides` applied.

    An unknown format or precision falls back to STRICT_THRESHOLDS (a lossless export); an unknown key in
    `overrides` raises VexportError naming it.
    """
    fmt = format.strip().lower()
    prec = precision.strip().lower()
    prec = _PRECISION_ALIASES.get(prec, prec)
    base = DEFAULT_THRESHOLDS.get(f"{fmt}/{prec}", STRICT_THRESHOLDS)
    return base.replace(**dict(overrides or {}))


# ------------------------------------------------------------------------------------------------ metrics
def _as_1d(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise InputError(f"{name_a} has {a.shape[0]} values but {name_b} has {b.shape[0]}")


def sqnr_db(reference: Any, candidate: Any) -> float:
    """20*log10(|ref| / |ref - cand|) in dB; inf when identical, nan when empty."""
    ref, cand = _as_1d("reference", reference), _as_1d("candidate", candidate)
    _same_length("reference", ref, "candidate", cand)
    if ref.size == 0:
        return math.nan
    noise = float(np.linalg.norm(ref - cand))
    if noise == 0.0:
        return math.inf
    signal = float(np.linalg.norm(ref))
    return -math.inf if signal == 0.0 else 20.0 * math.log10(signal / noise)


def _correlation(reference: Any, candidate: Any, method: Any) -> float:
    ref, cand = _as_1d("reference", reference), _as_1d("candidate", candidate)
    _same_length("reference", ref, "candidate", cand)
    if ref.size < 2 or np.ptp(ref) == 0.0 or np.ptp(cand) == 0.0:
        return math.nan  # undefined: too few points or a constant side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant inputs: the value speaks for itself
        return float(method(ref, cand).statistic)


def pearson(reference: Any, candidate: Any) -> float:
    """Pearson correlation; nan when undefined (fewer than 2 values, or either side constant)."""
    return _correlation(reference, candidate, stats.pearsonr)


def spearman(reference: Any, candidate: Any) -> float:
    """Spearman rank correlation; nan when undefined (fewer than 2 values, or either side constant)."""
    return _correlation(reference, candidate, stats.spearmanr)


def _ranking_inputs(
    ref_final: Any, cand_final: Any, groups: Any
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Validated arrays and the member indices of every group with at least 2 responses."""
    ref, cand = _as_1d("ref_final", ref_final), _as_1d("cand_final", cand_final)
    group_ids = np.asarray(groups)
    if group_ids.ndim != 1:
        raise InputError(f"groups must be 1-D, got shape {group_ids.shape}")
    _same_length("ref_final", ref, "cand_final", cand)
    _same_length("ref_final", ref, "groups", group_ids)
    _, inverse, counts = np.unique(group_ids, return_inverse=True, return_counts=True)
    members = [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts >= 2)]
    return ref, cand, members


def top1_agreement(ref_final: Any, cand_final: Any, groups: Any) -> float:
    """Fraction of groups (2+ responses) where the candidate's best response is a reference best.

    The candidate's pick is its first argmax; it agrees when the reference ranks it top (ties included).
    nan when no group has 2 or more responses.
    """
    ref, cand, members = _ranking_inputs(ref_final, cand_final, groups)
    if not members:
        return math.nan
    hits = [ref[idx[np.argmax(cand[idx])]] == ref[idx].max() for idx in members]
    return float(np.mean(hits))


def _pair_counts(ref: np.ndarray, cand: np.ndarray, members: list[np.ndarray]) -> tuple[int, int]:
    """(agreeing pairs, compared pairs) over i<j within each group, skipping pairs tied in the reference."""
    agree = total = 0
    for idx in members:
        upper = np.triu_indices(idx.size, k=1)
        ref_sign = np.sign(ref[idx][:, None] - ref[idx][None, :])[upper]
        cand_sign = np.sign(cand[idx][:, None] - cand[idx][None, :])[upper]
        untied = ref_sign != 0
        agree += int(np.sum(ref_sign[untied] == cand_sign[untied]))
        total += int(np.sum(untied))
    return agree, total


def pairwise_agreement(ref_final: Any, cand_final: Any, groups: Any) -> float:
    """Fraction of within-group pairs ordered the same way; pairs tied in the reference are skipped.

    A pair tied in the candidate but not in the reference counts as a disagreement. nan when no pair
    is left to compare.
    """
    ref, cand, members = _ranking_inputs(ref_final, cand_final, groups)
    agree, total = _pair_counts(ref, cand, members)
    return agree / total if total else math.nan


# ---------------------------------------------------------------------------------------------- compare
@dataclass(frozen=True)
class Check:
    """One line of the verdict: `status` is "pass", "fail" or "skipped"; `message` says why when not pass."""

    metric: str
    value: float
    op: str
    threshold: float | None
    status: str
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": _json_float(self.value),
            "op": self.op,
            "threshold": _json_float(self.threshold),
            "status": self.status,
            "message": self.message,
        }


@dataclass
class ParityResult:
    """Everything `compare` measured, the checks against `thresholds`, and the verdict."""

    num_tokens: int
    num_sequences: int
    num_groups: int
    num_pairs: int
    nonfinite_reference: int
    nonfinite_candidate: int
    max_abs_error: float
    mean_abs_error: float
    sqnr_db: float
    pearson: float
    spearman: float
    final_max_abs_error: float
    final_mean_abs_error: float
    final_pearson: float
    top1_agreement: float
    pairwise_agreement: float
    thresholds: Thresholds
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: plain ints/floats/strings; non-finite floats as "inf"/"-inf"/"nan"."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "thresholds":
                value = value.to_dict()
            elif f.name == "checks":
                value = [check.to_dict() for check in value]
            elif isinstance(value, float):
                value = _json_float(value)
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out

    def summary(self) -> dict[str, Any]:
        """The few numbers a manifest keeps."""
        keys = ("sqnr_db", "max_abs_error", "pearson", "pairwise_agreement", "top1_agreement")
        return {**{k: _json_float(getattr(self, k)) for k in keys}, "passed": self.passed}


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _validate_sequences(reference: Sequence[Any], candidate: Sequence[Any]) -> tuple[list, list]:
    if len(reference) != len(candidate):
        raise InputError(
            f"reference has {len(reference)} sequences but candidate has {len(candidate)}"
        )
    if len(reference) == 0:
        raise InputError("no sequences to compare (reference and candidate are empty)")
    refs = [_as_1d(f"reference[{i}]", r) for i, r in enumerate(reference)]
    cands = [_as_1d(f"candidate[{i}]", c) for i, c in enumerate(candidate)]
    for i, (ref, cand) in enumerate(zip(refs, cands)):
        _same_length(f"reference[{i}]", ref, f"candidate[{i}]", cand)
        if ref.size == 0:
            raise InputError(f"sequence {i} has no tokens (reference[{i}] is empty)")
    return refs, cands


def _validate_groups(groups: Sequence[int] | None, num_sequences: int) -> np.ndarray | None:
    if groups is None:
        return None
    group_ids = np.asarray(groups)
    if group_ids.ndim != 1 or group_ids.shape[0] != num_sequences:
        raise InputError(f"groups has shape {group_ids.shape} but there are {num_sequences} sequences")
    return group_ids


def _token_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Per-token metrics on the tokens finite on both sides (nan when there are none)."""
    error = np.abs(ref - cand)
    return {
        "max_abs_error": float(error.max()) if error.size else math.nan,
        "mean_abs_error": float(error.mean()) if error.size else math.nan,
        "sqnr_db": sqnr_db(ref, cand),
        "pearson": pearson(ref, cand),
        "spearman": spearman(ref, cand),
    }


def _final_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    error = np.abs(ref - cand)
    return {
        "final_max_abs_error": float(error.max()) if error.size else math.nan,
        "final_mean_abs_error": float(error.mean()) if error.size else math.nan,
        "final_pearson": pearson(ref, cand),
    }


def _ranking_metrics(ref: np.ndarray, cand: np.ndarray, groups: np.ndarray | None) -> dict[str, Any]:
    if groups is None:
        return {"top1_agreement": math.nan, "pairwise_agreement": math.nan, "num_groups": 0, "num_pairs": 0}
    _, _, members = _ranking_inputs(ref, cand, groups)
    agree, total = _pair_counts(ref, cand, members)
    return {
        "top1_agreement": top1_agreement(ref, cand, groups),
        "pairwise_agreement": agree / total if total else math.nan,
        "num_groups": len(members),
        "num_pairs": total,
    }


def _nonfinite_check(side: str, seqs: list[np.ndarray]) -> Check:
    counts = [int(np.sum(~np.isfinite(s))) for s in seqs]
    total, bad_seqs = sum(counts), sum(1 for c in counts if c)
    if not total:
        return Check(f"{side}_nonfinite", 0.0, "==", 0.0, "pass")
    message = f"{side} has {total} non-finite values (NaN/inf) in {bad_seqs} sequence(s)"
    return Check(f"{side}_nonfinite", float(total), "==", 0.0, "fail", message)


# (metric, threshold field, comparison): the checks made against a Thresholds, in report order.
_THRESHOLD_CHECKS = (
    ("sqnr_db", "min_sqnr_db", ">="),
    ("max_abs_error", "max_abs_error", "<="),
    ("pearson", "min_pearson", ">="),
    ("spearman", "min_spearman", ">="),
    ("pairwise_agreement", "min_pairwise_agreement", ">="),
    ("top1_agreement", "min_top1_agreement", ">="),
)


def _threshold_check(
    metric: str, limit_name: str, op: str, value: float, limit: float | None, skip_reason: str | None
) -> Check:
    if limit is None:
        return Check(metric, value, op, None, "skipped", f"{metric} not checked: no {limit_name} set")
    if skip_reason:
        return Check(metric, value, op, limit, "skipped", f"{metric} not checked: {skip_reason}")
    if math.isnan(value):
        reason = f"{metric} is undefined (nan): reference or candidate values are constant"
        return Check(metric, value, op, limit, "fail", reason)
    ok = value >= limit if op == ">=" else value <= limit
    word = "below" if op == ">=" else "above"
    message = "" if ok else f"{metric} {value:.6g} is {word} {limit_name} {limit:.6g}"
    return Check(metric, value, op, limit, "pass" if ok else "fail", message)


def _skip_reasons(num_finite_tokens: int, ranking: Mapping[str, Any], grouped: bool) -> dict[str, str]:
    """Why a metric cannot be judged on this data (too little of it), by metric name."""
    reasons: dict[str, str] = {}
    if num_finite_tokens == 0:
        reasons["sqnr_db"] = reasons["max_abs_error"] = "no token is finite on both sides"
    if num_finite_tokens < 2:
        reasons["pearson"] = reasons["spearman"] = "fewer than 2 tokens finite on both sides"
    if not grouped:
        reasons["top1_agreement"] = reasons["pairwise_agreement"] = "no groups given"
    elif ranking["num_groups"] == 0:
        reason = "no group has 2 or more responses with finite final values"
        reasons["top1_agreement"] = reasons["pairwise_agreement"] = reason
    elif ranking["num_pairs"] == 0:
        reasons["pairwise_agreement"] = "every pair is tied in the reference"
    return reasons


def _measure(
    refs: list[np.ndarray], cands: list[np.ndarray], groups: np.ndarray | None
) -> dict[str, Any]:
    """Every metric, on the tokens (and final values) finite on both sides; counts included."""
    ref_all, cand_all = np.concatenate(refs), np.concatenate(cands)
    finite = np.isfinite(ref_all) & np.isfinite(cand_all)
    ref_final = np.array([r[-1] for r in refs])
    cand_final = np.array([c[-1] for c in cands])
    ok = np.isfinite(ref_final) & np.isfinite(cand_final)
    return {
        "num_tokens": int(ref_all.size),
        "num_sequences": len(refs),
        "nonfinite_reference": int(np.sum(~np.isfinite(ref_all))),
        "nonfinite_candidate": int(np.sum(~np.isfinite(cand_all))),
        **_token_metrics(ref_all[finite], cand_all[finite]),
        **_final_metrics(ref_final[ok], cand_final[ok]),
        **_ranking_metrics(ref_final[ok], cand_final[ok], None if groups is None else groups[ok]),
    }


def _run_checks(
    refs: list[np.ndarray],
    cands: list[np.ndarray],
    metrics: Mapping[str, Any],
    skip: Mapping[str, str],
    thresholds: Thresholds,
) -> list[Check]:
    """The finiteness checks, then one check per threshold, in report order."""
    checks = [_nonfinite_check("reference", refs), _nonfinite_check("candidate", cands)]
    return checks + [
        _threshold_check(metric, name, op, metrics[metric], getattr(thresholds, name), skip.get(metric))
        for metric, name, op in _THRESHOLD_CHECKS
    ]


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    groups: Sequence[int] | None,
    thresholds: Thresholds,
) -> ParityResult:
    """Compare per-token values of the same sequences (real tokens only) and check every threshold.

    `reference[i]` and `candidate[i]` are the values of sequence i; `groups[i]` is its prompt group (None:
    no ranking metrics). Non-finite values fail the comparison; the metrics use the finite tokens.
    """
    refs, cands = _validate_sequences(reference, candidate)
    group_ids = _validate_groups(groups, len(refs))
    metrics = _measure(refs, cands, group_ids)
    num_finite = sum(int(np.sum(np.isfinite(r) & np.isfinite(c))) for r, c in zip(refs, cands))
    skip = _skip_reasons(num_finite, metrics, group_ids is not None)
    checks = _run_checks(refs, cands, metrics, skip, thresholds)
    failures = [c.message for c in checks if c.status == "fail"]
    notes = [c.message for c in checks if c.status == "skipped"]
    return ParityResult(
        **metrics,
        thresholds=thresholds,
        checks=checks,
        failures=failures,
        notes=notes,
        passed=not failures,
    )


def worst_sequences(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], k: int
) -> list[tuple[int, float]]:
    """The k sequences with the largest max abs error, worst first, as (index, max abs error).

    A sequence with any non-finite value on either side counts as inf (it is the worst there is).
    """
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    refs, cands = _validate_sequences(reference, candidate)
    errors = []
    for ref, cand in zip(refs, cands):
        finite = bool(np.all(np.isfinite(ref)) and np.all(np.isfinite(cand)))
        errors.append(float(np.max(np.abs(ref - cand))) if finite else math.inf)
    order = sorted(range(len(errors)), key=lambda i: (-errors[i], i))
    return [(i, errors[i]) for i in order[:k]]
