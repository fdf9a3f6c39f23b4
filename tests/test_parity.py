"""Tests for vexport/parity.py: metrics on constructed arrays whose answers are known exactly."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from vexport.errors import VexportError
from vexport.parity import (
    DEFAULT_THRESHOLDS,
    STRICT_THRESHOLDS,
    Thresholds,
    compare,
    pairwise_agreement,
    pearson,
    spearman,
    sqnr_db,
    thresholds_for,
    top1_agreement,
    worst_sequences,
)

LOOSE = Thresholds(
    min_sqnr_db=-math.inf,
    max_abs_error=None,
    min_pearson=-1.0,
    min_spearman=-1.0,
    min_pairwise_agreement=0.0,
    min_top1_agreement=0.0,
)


def _sequences(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n).astype(np.float32) for n in lengths]


def _check(result, metric):
    return next(c for c in result.checks if c.metric == metric)


# ---------------------------------------------------------------------------------------------- metrics
def test_identical_sequences_pass_with_infinite_sqnr():
    ref = _sequences([5, 1, 9, 3])
    result = compare(ref, [r.copy() for r in ref], [0, 0, 1, 1], STRICT_THRESHOLDS)
    assert result.passed and result.failures == []
    assert result.sqnr_db == math.inf
    assert result.max_abs_error == 0.0 and result.mean_abs_error == 0.0
    assert result.pearson == pytest.approx(1.0) and result.spearman == pytest.approx(1.0)
    assert result.top1_agreement == 1.0 and result.pairwise_agreement == 1.0
    assert (result.num_tokens, result.num_sequences, result.num_groups, result.num_pairs) == (18, 4, 2, 2)


@pytest.mark.parametrize("target_db", [10.0, 23.5, 60.0])
def test_sqnr_matches_constructed_noise_ratio(target_db):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=4096)
    noise = rng.normal(size=4096)
    noise *= np.linalg.norm(ref) / np.linalg.norm(noise) / 10 ** (target_db / 20)
    assert sqnr_db(ref, ref + noise) == pytest.approx(target_db, abs=0.01)
    chunks = np.split(ref + noise, [100, 101, 2000])  # the same through compare, split unevenly
    result = compare(np.split(ref, [100, 101, 2000]), chunks, None, LOOSE)
    assert result.sqnr_db == pytest.approx(target_db, abs=0.01)


def test_sqnr_edge_cases():
    assert sqnr_db([0.0, 0.0], [0.0, 1.0]) == -math.inf
    assert math.isnan(sqnr_db([], []))
    assert sqnr_db([3.0, 4.0], [3.0, 4.0]) == math.inf
    assert sqnr_db([3.0, 4.0], [3.0, 3.0]) == pytest.approx(20 * math.log10(5.0))


def test_correlations_of_constant_input_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
        assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
        assert math.isnan(pearson([1.0], [1.0]))
    assert spearman([1.0, 2.0, 3.0], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_constant_values_fail_as_undefined_correlation():
    ref = [np.zeros(4, np.float32)]
    result = compare(ref, [np.zeros(4, np.float32)], None, LOOSE)
    assert not result.passed
    assert any("pearson is undefined" in f for f in result.failures)
    assert any("spearman is undefined" in f for f in result.failures)


# ---------------------------------------------------------------------------------------------- ranking
def test_one_flipped_pair_gives_exact_fractions():
    # group 0: four responses, the candidate swaps the two best; group 1: three responses, kept in order.
    ref = np.array([4.0, 3.0, 2.0, 1.0, 0.3, 0.2, 0.1])
    cand = np.array([3.0, 4.0, 2.0, 1.0, 0.3, 0.2, 0.1])
    groups = [0, 0, 0, 0, 1, 1, 1]
    assert pairwise_agreement(ref, cand, groups) == pytest.approx(8 / 9)  # 6 + 3 pairs, 1 flipped
    assert top1_agreement(ref, cand, groups) == pytest.approx(1 / 2)


def test_pairs_tied_in_reference_are_skipped():
    ref = np.array([1.0, 1.0, 0.0])  # pair (0, 1) is tied: 2 pairs left
    cand = np.array([1.0, 2.0, 3.0])  # (0, 2) and (1, 2) both flipped
    assert pairwise_agreement(ref, cand, [7, 7, 7]) == 0.0
    result = compare([np.array([r]) for r in ref], [np.array([c]) for c in cand], [7, 7, 7], LOOSE)
    assert result.num_pairs == 2
    # the candidate's pick (index 2) is not a reference best (indices 0 and 1 tie for best)
    assert result.top1_agreement == 0.0


def test_tie_in_candidate_only_is_a_disagreement_and_reference_top_ties_count():
    assert pairwise_agreement([2.0, 1.0], [1.5, 1.5], [0, 0]) == 0.0
    assert top1_agreement([2.0, 2.0, 0.0], [0.0, 1.0, -1.0], [0, 0, 0]) == 1.0


def test_group_labels_need_not_be_contiguous_or_sorted():
    ref = np.array([1.0, 10.0, 2.0, 20.0])
    cand = np.array([2.0, 10.0, 1.0, 20.0])
    assert pairwise_agreement(ref, cand, [5, 9, 5, 9]) == pytest.approx(1 / 2)
    assert top1_agreement(ref, cand, ["b", "a", "b", "a"]) == pytest.approx(1 / 2)


def test_all_pairs_tied_skips_pairwise_but_checks_top1():
    ref = [np.array([1.0]), np.array([1.0])]
    result = compare(ref, [np.array([1.0]), np.array([0.5])], [0, 0], LOOSE)
    assert math.isnan(result.pairwise_agreement) and result.num_pairs == 0
    assert _check(result, "pairwise_agreement").status == "skipped"
    assert result.top1_agreement == 1.0 and _check(result, "top1_agreement").status == "pass"


# -------------------------------------------------------------------------------------- awkward inputs
@pytest.mark.parametrize(
    ("lengths", "groups", "num_groups", "ranking_status"),
    [
        pytest.param([1, 1, 1, 1], [0, 0, 1, 1], 2, "pass", id="single-token-sequences"),
        pytest.param([3, 4, 5], [0, 1, 2], 0, "skipped", id="one-sequence-groups"),
        pytest.param([6], [0], 0, "skipped", id="one-sequence"),
        pytest.param([2, 7, 1], None, 0, "skipped", id="no-groups"),
        pytest.param([3, 1, 4, 1, 5], [2, 2, 9, 4, 4], 2, "pass", id="mixed-group-sizes"),
    ],
)
def test_awkward_shapes_compare_cleanly(lengths, groups, num_groups, ranking_status):
    ref = _sequences(lengths)
    result = compare(ref, [r + np.float32(1e-6) for r in ref], groups, STRICT_THRESHOLDS)
    assert result.num_sequences == len(lengths) and result.num_tokens == sum(lengths)
    assert result.num_groups == num_groups
    assert _check(result, "top1_agreement").status == ranking_status
    assert result.sqnr_db > 60 and result.passed, result.failures
    if ranking_status == "skipped":
        assert any("top1_agreement not checked" in n for n in result.notes)
    json.dumps(result.to_dict(), allow_nan=False)


def test_single_token_total_skips_correlations_with_a_note():
    result = compare([np.array([0.5])], [np.array([0.5])], None, STRICT_THRESHOLDS)
    assert result.passed
    assert _check(result, "pearson").status == "skipped"
    assert any("fewer than 2 tokens" in n for n in result.notes)


# ---------------------------------------------------------------------------------------- non-finite
def test_nan_in_candidate_fails_naming_non_finite_and_metrics_use_finite_tokens():
    ref = _sequences([4, 5, 3])
    cand = [r.copy() for r in ref]
    cand[1][[0, 2]] = np.nan
    cand[1][4] = np.inf  # the final token of sequence 1
    result = compare(ref, cand, [0, 0, 0], STRICT_THRESHOLDS)
    assert not result.passed
    assert "candidate has 3 non-finite values (NaN/inf) in 1 sequence(s)" in result.failures
    assert result.nonfinite_candidate == 3 and result.nonfinite_reference == 0
    assert result.sqnr_db == math.inf and result.max_abs_error == 0.0  # the 9 finite tokens agree
    assert result.num_groups == 1 and result.num_pairs == 1  # sequence 1's final value is left out
    assert len(result.failures) == 1


def test_non_finite_reference_is_named_too():
    result = compare([np.array([1.0, np.inf])], [np.array([1.0, 2.0])], None, LOOSE)
    assert result.failures == ["reference has 1 non-finite values (NaN/inf) in 1 sequence(s)"]


def test_all_non_finite_still_returns_a_result():
    result = compare([np.array([np.nan, np.nan])], [np.array([1.0, 2.0])], [0], STRICT_THRESHOLDS)
    assert not result.passed and math.isnan(result.sqnr_db)
    assert _check(result, "sqnr_db").status == "skipped"
    json.dumps(result.to_dict(), allow_nan=False)


# ---------------------------------------------------------------------------------------- validation
def test_all_failures_are_collected_not_only_the_first():
    # finals: reference 3, 0, 5 and candidate 0.5, 4, -1: the group's order is fully reversed
    ref = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0, 0.0]), np.array([5.0, 5.0])]
    cand = [np.array([3.0, np.nan, 0.5]), np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, -1.0])]
    result = compare(ref, cand, [0, 0, 0], STRICT_THRESHOLDS)
    failed = [c.metric for c in result.checks if c.status == "fail"]
    assert failed == [
        "candidate_nonfinite", "sqnr_db", "max_abs_error", "pearson", "spearman",
        "pairwise_agreement", "top1_agreement",
    ]
    assert len(result.failures) == 7 and not result.passed
    assert result.pairwise_agreement == 0.0 and result.top1_agreement == 0.0
    assert "max_abs_error 6 is above max_abs_error 0.001" in result.failures
    assert "pairwise_agreement 0 is below min_pairwise_agreement 0.99" in result.failures
    assert all("\n" not in f for f in result.failures)


@pytest.mark.parametrize(
    ("reference", "candidate", "groups", "message"),
    [
        ([np.ones(3)], [np.ones(4)], None, "reference[0] has 3 values but candidate[0] has 4"),
        ([np.ones(3)], [np.ones(3), np.ones(2)], None, "reference has 1 sequences but candidate has 2"),
        ([np.ones(3)], [np.ones(3)], [0, 1], "groups has shape"),
        ([np.ones((2, 3))], [np.ones((2, 3))], None, "reference[0] must be 1-D"),
        ([np.ones(0)], [np.ones(0)], None, "sequence 0 has no tokens"),
        ([], [], None, "no sequences to compare"),
    ],
)
def test_bad_inputs_raise_vexport_error(reference, candidate, groups, message):
    with pytest.raises(VexportError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compare(reference, candidate, groups, STRICT_THRESHOLDS)


def test_ranking_functions_check_lengths():
    with pytest.raises(VexportError, match="groups has 2"):
        pairwise_agreement([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 0])


# ---------------------------------------------------------------------------------------- thresholds
def test_thresholds_for_known_alias_and_unknown_formats():
    assert thresholds_for("onnx", "float32") == DEFAULT_THRESHOLDS["onnx/float32"]
    assert thresholds_for("GPTQ", "int4") == DEFAULT_THRESHOLDS["gptq/int4"]
    assert thresholds_for("onnx", "fp16") == DEFAULT_THRESHOLDS["onnx/float16"]
    assert thresholds_for("someday-format", "float32") == STRICT_THRESHOLDS


def test_defaults_order_from_strict_to_loose():
    fp32, fp16, int4 = (DEFAULT_THRESHOLDS[k] for k in ("onnx/float32", "onnx/float16", "gptq/int4"))
    for name in ("min_sqnr_db", "min_pearson", "min_spearman", "min_pairwise_agreement"):
        assert getattr(fp32, name) > getattr(fp16, name) > getattr(int4, name)
    assert all(0 < t.min_top1_agreement <= 1 for t in DEFAULT_THRESHOLDS.values())


def test_thresholds_overrides_apply_and_unknown_key_is_named():
    t = thresholds_for("gptq", "int4", {"min_sqnr_db": 5.0, "max_abs_error": 0.5})
    assert t.min_sqnr_db == 5.0 and t.max_abs_error == 0.5
    assert t.min_pearson == DEFAULT_THRESHOLDS["gptq/int4"].min_pearson
    assert DEFAULT_THRESHOLDS["gptq/int4"].min_sqnr_db != 5.0  # the defaults are untouched
    with pytest.raises(VexportError, match="'min_sqrn_db'"):
        thresholds_for("onnx", "float32", {"min_sqrn_db": 50.0})
    with pytest.raises(VexportError, match="'min_pearson' must be a number"):
        STRICT_THRESHOLDS.replace(min_pearson="high")
    assert STRICT_THRESHOLDS.to_dict()["max_abs_error"] == 1e-3


def test_defaults_cannot_be_mutated():
    with pytest.raises(TypeError):
        DEFAULT_THRESHOLDS["onnx/float32"] = LOOSE  # type: ignore[index]


# ------------------------------------------------------------------------------------ results as data
def test_to_dict_is_json_safe_and_summary_is_small():
    ref = _sequences([3, 3])
    result = compare(ref, [r.copy() for r in ref], [0, 0], STRICT_THRESHOLDS)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["sqnr_db"] == "inf" and data["passed"] is True
    assert data["thresholds"]["min_sqnr_db"] == 60.0
    assert {c["metric"] for c in data["checks"]} >= {"sqnr_db", "pairwise_agreement"}
    assert all(type(v) in (int, float, str, bool, list, dict) for v in data.values())
    assert result.summary() == {
        "sqnr_db": "inf", "max_abs_error": 0.0, "pearson": pytest.approx(1.0),
        "pairwise_agreement": 1.0, "top1_agreement": 1.0, "passed": True,
    }


def test_worst_sequences_ranks_by_max_abs_error_and_non_finite_first():
    ref = [np.zeros(3), np.zeros(2), np.zeros(4), np.zeros(1)]
    cand = [np.array([0.0, 0.1, 0.0]), np.array([0.5, 0.0]), np.array([0.0, np.nan, 0, 0]), np.zeros(1)]
    assert worst_sequences(ref, cand, 3) == [(2, math.inf), (1, 0.5), (0, pytest.approx(0.1))]
    assert worst_sequences(ref, cand, 10)[-1] == (3, 0.0)
    assert worst_sequences(ref, cand, 0) == []
