"""vexport/checker.py: `check` and `check_many` on tiny models (a torch reference against ONNX exports of it and of
another model), the refusals made before any work, the parity summary written into a manifest, `score`'s batches
and the outcome objects. The CLI and the report files' layout are tested in test_cli.py and test_report_html.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vexport.batching import pad_id_of, plan_batches
from vexport.checker import (CheckOutcome, ComparisonOutcome, Recorded, Scored, artifact_labels, check,
                             check_inputs, check_many, loosened, record_parity, score)
from vexport.errors import InputError, ManifestError, VexportError
from vexport.evalset import encode_groups, read_prompt_groups
from vexport.manifest import read_manifest
from vexport.parity import DEFAULT_THRESHOLDS, STRICT_THRESHOLDS, compare, thresholds_for
from vexport.paths import OutputOverlapError
from vexport.runtime import load

PROMPTS = [
    {"prompt": "What is the capital of France?",
     "responses": ["The capital of France is Paris.", "Paris, I think.", "It is Berlin.", "No idea."]},
    {"prompt": "What is 12 times 7?", "responses": ["12 times 7 is 84.", "About 80.", "It is 19."]},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Give me a tip for better sleep."}],
     "responses": ["Keep a regular schedule and avoid screens before bed.", "Sleep more.",
                   "Drink coffee late in the evening, every evening, and keep the lights on."]},
]
SEQUENCES = sum(len(group["responses"]) for group in PROMPTS)
SUMMARY_KEYS = {"sqnr_db", "max_abs_error", "pearson", "pairwise_agreement", "top1_agreement", "passed"}


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def recorded_parity(folder: Path) -> dict | None:
    return json.loads((folder / "manifest.json").read_text())["parity"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """A small evaluation set (3 groups, 10 sequences): a check takes about a second, not the built-in 72."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(group) + "\n" for group in PROMPTS))
    return path


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A different value model of the same shape and tokenizer: the tiny model's config, other random weights."""
    from transformers import AutoConfig, LlamaForTokenClassification

    from vexport.tiny import init_value_weights

    out = tmp_path_factory.mktemp("other") / "other"
    model = LlamaForTokenClassification(AutoConfig.from_pretrained(tiny_model_dir))
    init_value_weights(model, seed=5)
    model.save_pretrained(out)
    for name in os.listdir(tiny_model_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copyfile(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def exports(tiny_model_dir, other_model_dir, tmp_path_factory) -> SimpleNamespace:
    """ONNX float32 exports of the tiny model (`good`) and of the other model (`bad`), in two folders of one name.
    Tests that record parity check copies: these manifests stay as exported."""
    from vexport.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("exports")
    return SimpleNamespace(good=export_onnx(tiny_model_dir, root / "a" / "onnx"),
                           bad=export_onnx(other_model_dir, root / "b" / "onnx"))


@pytest.fixture(scope="module")
def comparison(exports, tiny_model_dir, prompts, tmp_path_factory) -> SimpleNamespace:
    """check_many over copies of both exports (the good one first), recording parity and writing two reports."""
    root = tmp_path_factory.mktemp("comparison")
    good = copy_artifact(exports.good, root / "x" / "onnx")
    bad = copy_artifact(exports.bad, root / "y" / "onnx")
    reports = [root / "r.json", root / "r.md"]
    outcome = check_many([good, bad], tiny_model_dir, prompts=prompts, device="cpu", report=reports)
    return SimpleNamespace(outcome=outcome, good=good, bad=bad, reports=reports)


# ------------------------------------------------------------------------------------------------ check
def test_check_passes_an_onnx_export_of_the_reference(exports, tiny_model_dir, prompts, tmp_path):
    artifact = copy_artifact(exports.good, tmp_path / "onnx")
    reports = [tmp_path / "r.json", tmp_path / "r.md"]
    outcome = check(artifact, tiny_model_dir, prompts=prompts, device="cpu", report=reports)
    assert isinstance(outcome, CheckOutcome) and outcome.passed and outcome.result.passed
    assert outcome.result.failures == [] and outcome.result.num_sequences == SEQUENCES
    assert outcome.result.num_groups == len(PROMPTS) and outcome.result.sqnr_db > 100
    assert outcome.result.thresholds == STRICT_THRESHOLDS  # onnx/float32 against a float32 reference
    assert outcome.report["artifact"]["path"] == str(artifact) and outcome.report["artifact"]["format"] == "onnx"
    assert outcome.report["evalset"]["sequences"] == SEQUENCES
    assert outcome.reports == reports and all(path.is_file() for path in reports)
    assert json.loads(reports[0].read_text())["parity"]["sqnr_db"] == pytest.approx(outcome.result.sqnr_db)
    assert outcome.records == [Recorded(artifact / "manifest.json")]
    assert recorded_parity(artifact)["passed"] is True


def test_check_fails_against_a_different_model(exports, other_model_dir, prompts):
    """The tiny model's export checked against another model: every metric fails; record=False writes nothing."""
    before = (exports.good / "manifest.json").read_bytes()
    outcome = check(exports.good, other_model_dir, prompts=prompts, device="cpu", record=False)
    assert not outcome.passed and not outcome.result.passed
    assert outcome.result.sqnr_db < 10 and outcome.report["parity"]["passed"] is False
    failed = {c.metric for c in outcome.result.checks if c.status == "fail"}
    assert {"sqnr_db", "max_abs_error", "pearson", "spearman"} <= failed
    assert any(re.match(r"sqnr_db -?[\d.]+ is below min_sqnr_db 60$", message) for message in outcome.result.failures)
    assert outcome.reports == [] and outcome.records == []
    assert (exports.good / "manifest.json").read_bytes() == before


def test_check_records_the_summary_thresholds_and_what_was_loosened(exports, tiny_model_dir, prompts, tmp_path):
    """What `record_parity` writes for a check: the result's summary, the reference, the evaluation set, when, the
    thresholds used and which of them are looser than the defaults. Nothing else in the manifest changes."""
    artifact = copy_artifact(exports.good, tmp_path / "onnx")
    before = read_manifest(artifact).to_dict()
    outcome = check(artifact, tiny_model_dir, prompts=prompts, device="cpu",
                    thresholds={"min_sqnr_db": 20, "min_pearson": 0.5, "min_top1_agreement": 1.0})
    parity = recorded_parity(artifact)
    assert set(parity) == SUMMARY_KEYS | {"reference", "evalset", "checked", "thresholds", "loosened"}
    assert {k: parity[k] for k in SUMMARY_KEYS} == pytest.approx(outcome.result.summary())
    assert parity["reference"] == {"model": str(tiny_model_dir), "backend": "torch", "device": "cpu",
                                   "dtype": "float32"}
    assert parity["evalset"] == str(prompts) and parity["checked"] == outcome.report["created"]
    assert parity["thresholds"] == {**STRICT_THRESHOLDS.to_dict(), "min_sqnr_db": 20, "min_pearson": 0.5}
    assert parity["loosened"] == ["sqnr_db>=20", "pearson>=0.5"]  # min_top1_agreement=1.0 is the default
    after = read_manifest(artifact).to_dict()
    assert after.pop("parity") == parity and before.pop("parity") is None and after == before


def test_check_accepts_an_unchecked_max_abs_error(exports, tiny_model_dir, prompts, tmp_path):
    """max_abs_error=None (not checked) runs, is recorded as loosened, and the repeat line says it (the CLI
    reads `--threshold max_abs_error=none` back)."""
    artifact = copy_artifact(exports.good, tmp_path / "onnx")
    check_inputs([artifact], tiny_model_dir, None, {"max_abs_error": None})  # accepted up front
    outcome = check(artifact, tiny_model_dir, prompts=prompts, device="cpu", thresholds={"max_abs_error": None})
    assert outcome.passed and outcome.result.thresholds.max_abs_error is None
    assert recorded_parity(artifact)["loosened"] == ["max_abs_error<=none"]
    from vexport.cli import _overrides
    from vexport.report.build import repeat_command

    settings = {"evalset": {"name": "builtin"}, "batch_tokens": 4096, "seed": 0,
                "threshold_overrides": {"max_abs_error": None}}
    assert repeat_command([artifact], "ref", settings, torch.device("cpu")).endswith("--threshold max_abs_error=none")

    assert _overrides(["max_abs_error=none", "min_sqnr_db=50"]) == {"max_abs_error": None, "min_sqnr_db": 50.0}


# ------------------------------------------------------------------------------------------- check_many
def test_check_many_keeps_the_order_and_verdict_of_each_artifact(comparison, exports):
    outcome = comparison.outcome
    assert isinstance(outcome, ComparisonOutcome)
    good, bad = outcome.results
    assert good.passed and not bad.passed and not outcome.passed
    assert good.sqnr_db > 100 and bad.sqnr_db < 10
    entries = outcome.report["artifacts"]
    assert [e["label"] for e in entries] == ["onnx", "onnx #2"]  # two folders named onnx
    assert [e["path"] for e in entries] == [str(comparison.good), str(comparison.bad)]
    assert [e["parity"]["passed"] for e in entries] == [True, False] and outcome.report["passed"] is False
    assert all(e["parity"]["num_sequences"] == SEQUENCES for e in entries)


def test_check_many_writes_its_reports_then_every_manifest(comparison):
    outcome = comparison.outcome
    assert outcome.reports == comparison.reports and all(path.is_file() for path in comparison.reports)
    assert json.loads(comparison.reports[0].read_text())["passed"] is False
    assert outcome.records == [Recorded(comparison.good / "manifest.json"), Recorded(comparison.bad / "manifest.json")]
    for folder, result in zip((comparison.good, comparison.bad), outcome.results):
        parity = recorded_parity(folder)
        assert parity["passed"] is result.passed and parity["sqnr_db"] == pytest.approx(result.sqnr_db)
        assert parity["loosened"] == []


def test_check_many_verifies_every_artifact_before_the_reference(exports, tiny_model_dir, prompts, tmp_path):
    """A truncated file in the second artifact is refused before the reference is opened (that reference has no
    weights: opening it would fail first, naming it); no report is written and no manifest is recorded."""
    good = copy_artifact(exports.good, tmp_path / "good")
    broken = copy_artifact(exports.good, tmp_path / "broken")
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    reference = copy_artifact(tiny_model_dir, tmp_path / "reference")
    (reference / "model.safetensors").unlink()
    before = (good / "manifest.json").read_bytes()
    with pytest.raises(ManifestError, match=re.escape(f"{data} has ") + r"\d+ bytes, manifest.json says \d+"):
        check_many([good, broken], reference, prompts=prompts, device="cpu", report=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists() and (good / "manifest.json").read_bytes() == before
    with pytest.raises(VexportError, match=re.escape(str(reference))):  # that reference would have failed
        check_many([good], reference, prompts=prompts, device="cpu")


# ------------------------------------------------------------------------------------------ check_inputs
def test_check_inputs_needs_an_artifact(tiny_model_dir):
    with pytest.raises(InputError, match="give at least one artifact to check"):
        check_inputs([], tiny_model_dir, None, None)


@pytest.mark.parametrize(("thresholds", "message"), [
    ({"min_sqnr": 20}, "--threshold: unknown parity threshold 'min_sqnr' (known: max_abs_error, "),
    ({"min_sqnr_db": math.nan}, "--threshold: parity threshold 'min_sqnr_db' must be a number, got nan"),
    ({"min_pearson": "high"}, "--threshold: parity threshold 'min_pearson' must be a number, got 'high'"),
    ({"min_spearman": True}, "--threshold: parity threshold 'min_spearman' must be a number, got True"),
    ({"min_sqnr_db": None}, "--threshold: parity threshold 'min_sqnr_db' must be a number, got None"),
])
def test_check_inputs_refuses_bad_thresholds(tiny_model_dir, tmp_path, thresholds, message):
    with pytest.raises(VexportError, match=re.escape(message)):
        check_inputs([tmp_path / "not-there"], tiny_model_dir, None, thresholds)


def test_check_inputs_accepts_good_thresholds_and_reports(exports, tiny_model_dir, tmp_path):
    assert check_inputs([exports.good], tiny_model_dir, [tmp_path / "r.json", tmp_path / "r.HTML"],
                        {"min_sqnr_db": 20.5, "max_abs_error": None, "min_top1_agreement": 0}) is None


def test_check_inputs_refuses_report_paths_inside_an_input(exports, tiny_model_dir, tmp_path):
    """A report inside an artifact or the reference, also through a symlink, and a bad report path: each refused
    before anything is read or written (the artifact given here need not even exist)."""
    link = tmp_path / "link"
    link.symlink_to(exports.good, target_is_directory=True)
    cases = [
        (exports.good / "r.json", OutputOverlapError, f"--report {exports.good / 'r.json'} is inside the input "
         f"{exports.good}: refusing to write there"),
        (tiny_model_dir / "sub" / "r.md", OutputOverlapError, f"--report {tiny_model_dir / 'sub' / 'r.md'} is "
         f"inside the input {tiny_model_dir}"),
        (link / "r.html", OutputOverlapError, f"--report {link / 'r.html'} is inside the input {exports.good}"),
        (tmp_path / "r.pdf", VexportError, f"--report {tmp_path / 'r.pdf'}: unsupported suffix '.pdf'"),
        (tmp_path, VexportError, f"--report {tmp_path}: unsupported suffix '(none)'"),
    ]
    (tmp_path / "d.json").mkdir()
    cases.append((tmp_path / "d.json", VexportError, f"--report {tmp_path / 'd.json'}: is a folder"))
    for report, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            check_inputs([tmp_path / "missing", exports.good], tiny_model_dir, [tmp_path / "ok.json", report], None)


def test_check_refuses_a_report_inside_the_artifact_before_any_work(exports, tiny_model_dir, tmp_path):
    """`check` calls check_inputs first: the bad report path is named although the reference does not exist."""
    artifact = copy_artifact(exports.good, tmp_path / "onnx")
    before = (artifact / "manifest.json").read_bytes()
    with pytest.raises(OutputOverlapError, match=re.escape(f"--report {artifact / 'r.json'} is inside")):
        check(artifact, tmp_path / "no-such-model", report=artifact / "r.json")
    assert not (artifact / "r.json").exists() and (artifact / "manifest.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------- loosened
@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, []),
    ({"min_sqnr_db": 20}, ["sqnr_db>=20"]),
    ({"min_sqnr_db": 61, "min_pearson": 0.99999}, []),  # stricter than the defaults
    ({"min_pearson": 0.995, "min_sqnr_db": 59.5}, ["sqnr_db>=59.5", "pearson>=0.995"]),  # in field order
    ({"max_abs_error": 0.01}, ["max_abs_error<=0.01"]),
    ({"max_abs_error": 1e-4}, []),
    ({"max_abs_error": None}, ["max_abs_error<=none"]),
    ({"min_spearman": 0.5, "min_pairwise_agreement": 0.5, "min_top1_agreement": 0},
     ["spearman>=0.5", "pairwise_agreement>=0.5", "top1_agreement>=0"]),
    ({"min_sqnr_db": 1e-5}, ["sqnr_db>=1e-05"]),
])
def test_loosened_lists_the_limits_looser_than_strict(overrides, expected):
    assert loosened(STRICT_THRESHOLDS.replace(**overrides), STRICT_THRESHOLDS) == expected


def test_loosened_against_defaults_that_check_no_abs_error():
    """fp16's defaults leave max_abs_error unchecked (None): any limit on it is stricter, never loosened."""
    half = DEFAULT_THRESHOLDS["onnx/float16"]
    assert half.max_abs_error is None
    assert loosened(half.replace(max_abs_error=0.5), half) == []
    assert loosened(half.replace(max_abs_error=None, min_sqnr_db=29), half) == ["sqnr_db>=29"]
    assert loosened(thresholds_for("gptq", "int4"), STRICT_THRESHOLDS) == [
        "sqnr_db>=8", "max_abs_error<=none", "pearson>=0.9", "spearman>=0.88", "pairwise_agreement>=0.75",
        "top1_agreement>=0.5"]


# ----------------------------------------------------------------------------------------- record_parity
def test_record_parity_writes_each_manifest_in_order(exports, tmp_path):
    folders = [copy_artifact(exports.good, tmp_path / name) for name in ("b", "a")]
    pending = [(folder, read_manifest(folder), {"passed": True, "which": folder.name}) for folder in folders]
    assert record_parity(pending) == [Recorded(folders[0] / "manifest.json"), Recorded(folders[1] / "manifest.json")]
    assert [recorded_parity(folder) for folder in folders] == [{"passed": True, "which": "b"},
                                                               {"passed": True, "which": "a"}]
    read_manifest(folders[0])  # still a valid manifest
    assert record_parity([]) == []


def test_record_parity_writes_a_folder_given_twice_once(exports, tmp_path):
    """The same folder named two ways (a symlink): one write, one Recorded, the summary given last."""
    folder = copy_artifact(exports.good, tmp_path / "onnx")
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    pending = [(folder, read_manifest(folder), {"run": 1}), (link, read_manifest(link), {"run": 2})]
    assert record_parity(pending) == [Recorded(link / "manifest.json")]
    assert recorded_parity(folder) == {"run": 2}


def test_record_parity_skips_a_manifest_it_cannot_write(exports, tmp_path, caplog):
    """A manifest that cannot be replaced (its temporary file's name is taken by a folder) is skipped with the
    reason and a warning; the others are still written and nothing is left half-done."""
    blocked = copy_artifact(exports.good, tmp_path / "blocked")
    fine = copy_artifact(exports.good, tmp_path / "fine")
    (blocked / "manifest.json.tmp").mkdir()
    before = (blocked / "manifest.json").read_bytes()
    pending = [(folder, read_manifest(folder), {"passed": True}) for folder in (blocked, fine)]
    with caplog.at_level("WARNING", logger="vexport.checker"):
        notes = record_parity(pending)
    reason = f"{blocked / 'manifest.json'} is not writable (Is a directory)"
    assert notes == [Recorded(blocked / "manifest.json", reason), Recorded(fine / "manifest.json")]
    assert [r.getMessage() for r in caplog.records] == [f"parity not recorded: {reason}"]
    assert (blocked / "manifest.json").read_bytes() == before and recorded_parity(fine) == {"passed": True}


# ------------------------------------------------------------------------------------------------- score
@pytest.fixture(scope="module")
def samples(tiny_model_dir, prompts) -> list:
    from transformers import AutoTokenizer

    return encode_groups(AutoTokenizer.from_pretrained(tiny_model_dir), read_prompt_groups(prompts))


class CountingModel:
    """A real model whose `values` calls are recorded (their input shapes), for what `score` runs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def values(self, ids, mask=None):
        self.calls.append(tuple(ids.shape))
        return self.model.values(ids, mask)


@pytest.mark.parametrize("which", ["reference", "onnx"])
def test_score_returns_values_in_input_order(which, exports, tiny_model_dir, samples):
    """Several planned batches, none in input order: each sequence's values are those of the model on it alone;
    the shortest sequence runs once first (the warm-up), then each batch once."""
    model = load(tiny_model_dir if which == "reference" else exports.good, device="cpu")
    lengths = [len(s.input_ids) for s in samples]
    batches = plan_batches(lengths, batch_tokens=2 * max(lengths))
    assert len(batches) >= 3 and [i for batch in batches for i in batch] != list(range(len(samples)))
    counting = CountingModel(model)
    scored = score(counting, samples, batches, pad_id_of(model))
    assert counting.calls[0] == (1, min(lengths))
    assert counting.calls[1:] == [(len(batch), max(lengths[i] for i in batch)) for batch in batches]
    assert [v.shape for v in scored.values] == [(n,) for n in lengths]
    assert all(v.dtype == np.float32 for v in scored.values)
    for sample, values in zip(samples, scored.values):
        alone = model.values(torch.tensor([sample.input_ids]))[0].numpy()
        np.testing.assert_allclose(values, alone, rtol=1e-5, atol=1e-5)
    assert scored.seconds > 0 and scored.warmup_seconds > 0


def test_scored_timing_counts_tokens_sequences_and_batches(samples):
    batches = [[0, 1], [2]]
    tokens = sum(len(s.input_ids) for s in samples[:3])
    timing = Scored([], seconds=2.0, warmup_seconds=0.5).timing(samples[:3], batches)
    assert timing == {"seconds": 2.0, "warmup_seconds": 0.5, "tokens": tokens, "sequences": 3, "batches": 2,
                      "tokens_per_second": tokens / 2.0, "sequences_per_second": 1.5}
    untimed = Scored([], seconds=0.0, warmup_seconds=0.0).timing(samples[:3], batches)
    assert untimed["tokens_per_second"] is None and untimed["sequences_per_second"] is None


# ---------------------------------------------------------------------------------------- artifact_labels
@pytest.mark.parametrize(("artifacts", "labels"), [
    ([], []),
    (["runs/a/onnx", Path("runs/b/onnx"), "runs/c/gptq"], ["onnx", "onnx #2", "gptq"]),
    (["a/x/", "b/x", "c/x", "d/x"], ["x", "x #2", "x #3", "x #4"]),
    (["a/x", "b/x", "c/x #2"], ["x", "x #2", "x #2 #2"]),  # a folder named like a made-up label
    ([".", "/"], [".", "/"]),  # no folder name: the path itself
])
def test_artifact_labels_are_distinct_folder_names(artifacts, labels):
    assert artifact_labels(artifacts) == labels
    assert len(set(labels)) == len(labels)


# --------------------------------------------------------------------------------------------- outcomes
def _result(shift: float):
    """A real ParityResult of two groups of values against the same values shifted by SHIFT."""
    ref = [np.linspace(-1, 1, 8, dtype=np.float32) * (k + 1) for k in range(4)]
    return compare(ref, [r + shift for r in ref], [0, 0, 1, 1], STRICT_THRESHOLDS)


def test_outcomes_hold_results_reports_and_records():
    passing, failing = _result(0.0), _result(0.5)
    assert passing.passed and not failing.passed
    single = CheckOutcome(failing, {"parity": {}})
    assert single.passed is False and single.reports == [] and single.records == []
    assert CheckOutcome(passing, {}).passed is True
    single.records.append(Recorded(Path("m.json")))
    assert CheckOutcome(passing, {}).records == []  # each outcome its own lists
    both = ComparisonOutcome([passing, failing], {"artifacts": []}, [Path("r.json")])
    assert both.passed is False and both.reports == [Path("r.json")] and both.records == []
    assert ComparisonOutcome([passing, passing], {}).passed is True
    assert Recorded(Path("m.json")).error is None
