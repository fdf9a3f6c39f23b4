"""`vexport.check` and `vexport.check_many`: the same batches through the reference and every candidate.

`check_many` loads and scores the reference once, then loads, times and scores each candidate in turn on
the identical batches (one candidate in memory at a time), compares each with `parity.compare`, and builds
one comparison report: per artifact its size on disk, load time, scoring throughput, every parity metric, the
worst sequences and the data of its plots. `check` is the one-artifact form; its JSON and Markdown keep the
one-artifact layout, its HTML is the comparison page.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from vexport.batching import CHECK_BATCH_TOKENS, pad_batch, pad_id_of, plan_batches, run_in_order, unpad
from vexport.errors import InputError, VexportError
from vexport.evalset import (EncodedSample, builtin_prompt_groups, encode_groups, long_context_samples,
                             read_prompt_groups)
from vexport.manifest import MANIFEST_NAME, is_artifact, now_iso, read_manifest
from vexport.parity import STRICT_THRESHOLDS, ParityResult, Thresholds, compare, thresholds_for
from vexport.paths import refuse_overlap
from vexport.progress import progress_bar
from vexport.report import validate_report
from vexport.report.build import WORST_K, folder_size, single_report, worst_rows
from vexport.report.build import comparison_report as _comparison_report
from vexport.report.build import describe as _describe
from vexport.report.build import reference_entry as _reference_entry
from vexport.report.build import reference_identity as _reference_identity
from vexport.report.build import settings as _settings
from vexport.report.environment import device_name, environment
from vexport.report.files import ReportPaths, report_paths, write_reports
from vexport.runtime import ValueModel, check_files, load

log = logging.getLogger(__name__)

__all__ = ["WORST_K", "CheckOutcome", "ComparisonOutcome", "Recorded", "Scored", "artifact_labels", "check",
           "check_inputs", "check_many", "device_name", "environment", "folder_size", "loosened", "record_parity",
           "score", "single_report", "worst_rows", "write_reports"]
T = TypeVar("T")


@dataclass
class Recorded:
    """An artifact's manifest.json and whether it now holds this check's parity summary (`error` says why not)."""

    manifest: Path
    error: str | None = None


@dataclass
class CheckOutcome:
    result: ParityResult
    report: dict[str, Any]
    reports: list[Path] = field(default_factory=list)  # the report files written
    records: list[Recorded] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.result.passed


@dataclass
class ComparisonOutcome:
    """One ParityResult per artifact, in the order given, and the comparison report dict."""

    results: list[ParityResult]
    report: dict[str, Any]
    reports: list[Path] = field(default_factory=list)  # the report files written
    records: list[Recorded] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)


@dataclass
class Scored:
    """Per-sequence values of one model and the time its scoring took (after one warm-up sequence)."""

    values: list[np.ndarray]
    seconds: float
    warmup_seconds: float

    def timing(self, samples: Sequence[EncodedSample], batches: Sequence[Sequence[int]]) -> dict[str, Any]:
        tokens = sum(len(s.input_ids) for s in samples)
        timed = self.seconds > 0
        return {"seconds": self.seconds, "warmup_seconds": self.warmup_seconds, "tokens": tokens,
                "sequences": len(samples), "batches": len(batches),
                "tokens_per_second": tokens / self.seconds if timed else None,
                "sequences_per_second": len(samples) / self.seconds if timed else None}


@dataclass(frozen=True)
class _Run:
    """What every candidate of one comparison shares: the batches, the reference's values, the settings."""

    samples: list[EncodedSample]
    batches: list[list[int]]
    pad_id: int
    ref: ValueModel
    ref_values: list[np.ndarray]
    overrides: Mapping[str, float] | None
    device: str | None
    seed: int
    record: dict[str, Any] | None
    progress: bool


def check(artifact: str | os.PathLike, reference: str | os.PathLike, *, prompts: str | os.PathLike | None = None,
          thresholds: dict[str, float] | None = None, device: str | None = None, batch_tokens: int = CHECK_BATCH_TOKENS,
          report: ReportPaths = None, record: bool = True, allow_pickle: bool = False, seed: int = 0,
          progress: bool = False, verify_hashes: bool = True) -> CheckOutcome:
    """Compare ARTIFACT against the REFERENCE model; write REPORT and the manifest's parity summary.

    REPORT is one path or several: .json and .md get the one-artifact report, .html the comparison page.
    """
    check_inputs([artifact], reference, report, thresholds)
    outcome, pending = _compare_all([artifact], reference, prompts=prompts, thresholds=thresholds, device=device,
                                    batch_tokens=batch_tokens, record=record, allow_pickle=allow_pickle, seed=seed,
                                    progress=progress, verify_hashes=verify_hashes)
    single = single_report(outcome.report)
    reports = write_reports(report, outcome.report, single=single)
    return CheckOutcome(outcome.results[0], single, reports, record_parity(pending))


def check_many(artifacts: Sequence[str | os.PathLike], reference: str | os.PathLike, *,
               prompts: str | os.PathLike | None = None, thresholds: dict[str, float] | None = None,
               device: str | None = None, batch_tokens: int = CHECK_BATCH_TOKENS, report: ReportPaths = None,
               record: bool = True, allow_pickle: bool = False, seed: int = 0,
               progress: bool = False, verify_hashes: bool = True) -> ComparisonOutcome:
    """Compare every ARTIFACT with REFERENCE on the same batches; the reference is loaded and run once.

    Every artifact is opened and its tokenizer checked before the reference runs, so bad input fails fast.
    REPORT (.json, .md, .html; one path or several) gets the comparison report; with `record` each
    artifact's manifest.json keeps its parity summary. `seed` seeds torch and the plots' token sample
    (scoring itself draws no random numbers). Each artifact's files are verified against its manifest up front
    (sizes always, sha256 unless `verify_hashes` is False). The manifests are written last, after the reports:
    a run that fails records nothing.
    """
    check_inputs(artifacts, reference, report, thresholds)
    outcome, pending = _compare_all(artifacts, reference, prompts=prompts, thresholds=thresholds, device=device,
                                    batch_tokens=batch_tokens, record=record, allow_pickle=allow_pickle, seed=seed,
                                    progress=progress, verify_hashes=verify_hashes)
    outcome.reports = write_reports(report, outcome.report)
    outcome.records = record_parity(pending)
    return outcome


def check_inputs(artifacts: Sequence[str | os.PathLike], reference: str | os.PathLike, report: ReportPaths,
                 thresholds: Mapping[str, float] | None) -> None:
    """Everything that can be refused before any work: no artifact, a bad threshold, a bad report path, or a
    report path that is, holds or lies inside an artifact or the reference."""
    if not artifacts:
        raise InputError("give at least one artifact to check")
    try:
        STRICT_THRESHOLDS.replace(**dict(thresholds or {}))
    except VexportError as exc:  # an unknown key or a value that is not a number
        raise VexportError(f"--threshold: {exc}") from None
    for path in report_paths(report):
        refuse_overlap(path, [*artifacts, reference], flag="--report")


def _compare_all(artifacts: Sequence[str | os.PathLike], reference: str | os.PathLike, *,
                 prompts: str | os.PathLike | None, thresholds: dict[str, float] | None, device: str | None,
                 batch_tokens: int, record: bool, allow_pickle: bool, seed: int, progress: bool,
                 verify_hashes: bool) -> tuple[ComparisonOutcome, list[tuple[Path, Any, dict[str, Any]]]]:
    """Run the comparison; return it and the parity summaries to record (nothing is written here)."""
    created = now_iso()
    torch.manual_seed(seed)
    groups, evalset = (read_prompt_groups(prompts), str(prompts)) if prompts else (builtin_prompt_groups(), "builtin")
    samples = _encode_all(artifacts, groups, allow_pickle, verify_hashes, progress)
    if not prompts:  # the built-in set also crosses the model's sliding window and rope thresholds (evalset.py)
        samples = samples + long_context_samples(samples, _config_of(reference))
    batches = plan_batches([len(s.input_ids) for s in samples], batch_tokens)
    ref, ref_load = _timed(lambda: load(reference, device=device, allow_pickle=allow_pickle))
    ref_scored = score(ref, samples, batches, pad_id_of(ref), progress, "reference")
    settings = _settings(evalset, len(groups), samples, batch_tokens, seed, thresholds)
    stamp = {"reference": _reference_identity(reference, ref), "evalset": evalset, "checked": created}
    run = _Run(samples, batches, pad_id_of(ref), ref, ref_scored.values, thresholds, device, seed,
               stamp if record else None, progress)
    entries, results, pending = [], [], []
    for label, artifact in zip(artifact_labels(artifacts), artifacts):
        entry, result, summary = _check_one(run, label, artifact)
        entries.append(entry)
        results.append(result)
        pending += [summary] if summary is not None else []
    ref_entry = _reference_entry(reference, ref, ref_load, ref_scored.timing(samples, batches))
    doc = _comparison_report(created, artifacts, ref_entry, settings, entries, device=ref.device)
    validate_report(doc)
    return ComparisonOutcome(results, doc), pending


def _check_one(run: _Run, label: str, artifact: str | os.PathLike) -> tuple[dict[str, Any], ParityResult, Any]:
    """Load, time and score one candidate and compare it with the reference; the summary to record, if any."""
    from vexport.report.figures import figure_data

    candidate, load_seconds = _timed(lambda: load(artifact, device=run.device, verify_hashes=False))  # verified
    scored = score(candidate, run.samples, run.batches, run.pad_id, run.progress, label)
    limits = thresholds_for(candidate.format, _compared_precision(run.ref, candidate), run.overrides)
    result = compare(run.ref_values, scored.values, [s.group for s in run.samples], limits)
    entry = {
        **_describe(label, candidate),
        "load_seconds": load_seconds,
        "scoring": scored.timing(run.samples, run.batches),
        "parity": result.to_dict(),
        "worst": worst_rows(run.samples, run.ref_values, scored.values),
        "figures": figure_data(run.ref_values, scored.values, seed=run.seed),
    }
    summary = None
    if run.record is not None and candidate.manifest is not None:
        defaults = thresholds_for(candidate.format, _compared_precision(run.ref, candidate))
        parity = {**result.summary(), **run.record, "thresholds": limits.to_dict(),
                  "loosened": loosened(limits, defaults)}
        summary = (Path(artifact), candidate.manifest, parity)
    return entry, result, summary


def loosened(limits: Thresholds, defaults: Thresholds) -> list[str]:
    """The limits in LIMITS looser than DEFAULTS, as 'sqnr_db>=20' (metric, comparison, limit)."""
    out = []
    for name, value in limits.to_dict().items():
        default = getattr(defaults, name)
        if name.startswith("min_") and value is not None and default is not None and value < default:
            out.append(f"{name[4:]}>={value:g}")
        elif name.startswith("max_") and default is not None and (value is None or value > default):
            out.append(f"{name}<=" + ("none" if value is None else f"{value:g}"))
    return out


def record_parity(pending: Sequence[tuple[Path, Any, dict[str, Any]]]) -> list[Recorded]:
    """Write each parity summary into its artifact's manifest.json; a manifest that cannot be written (a
    read-only artifact) is skipped, with the reason."""
    notes = []
    for folder, manifest, parity in {os.path.realpath(p[0]): p for p in pending}.values():  # a folder given twice
        manifest.parity = parity
        try:
            notes.append(Recorded(manifest.write(folder)))
        except OSError as exc:
            reason = f"{folder / MANIFEST_NAME} is not writable ({exc.strerror or exc})"
            log.warning("parity not recorded: %s", reason)
            notes.append(Recorded(folder / MANIFEST_NAME, reason))
    return notes


def score(model: ValueModel, samples: Sequence[EncodedSample], batches: Sequence[Sequence[int]], pad_id: int,
          progress: bool = False, label: str = "model") -> Scored:
    """Per-sequence values of MODEL on BATCHES (right-padded), in sample order, and the seconds they took.

    The shortest sequence is run once alone before timing: lazy initialisation (sessions, kernels) is not
    scoring. The timing includes the copy of the values to the host, which waits for a GPU to finish.
    """
    padded = [pad_batch([samples[i].input_ids for i in batch], pad_id) for batch in batches]
    ids, mask = pad_batch([min((s.input_ids for s in samples), key=len)], pad_id)
    _, warmup = _timed(lambda: unpad(model.values(ids, mask), mask))
    seconds = 0.0
    with progress_bar(f"scoring {label}", len(samples), progress) as advance:
        def run(k: int, rows: Sequence[int]) -> list[np.ndarray]:
            nonlocal seconds
            values, elapsed = _timed(lambda: unpad(model.values(*padded[k]), padded[k][1]))
            seconds += elapsed
            advance(len(rows))
            return values

        out = run_in_order(batches, len(samples), run)
    return Scored(out, seconds, warmup)


def _timed(work: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ inputs
def _encode_all(artifacts: Sequence[str | os.PathLike], groups, allow_pickle: bool,
                verify_hashes: bool = True, progress: bool = False) -> list[EncodedSample]:
    """The evaluation set as the first artifact's tokenizer encodes it; every other one must agree."""
    samples: list[EncodedSample] | None = None
    for artifact in artifacts:
        tokenizer, max_length = _tokenizer_of(artifact, allow_pickle, verify_hashes, progress)
        encoded = encode_groups(tokenizer, groups, max_length=max_length)
        if samples is None:
            samples = encoded
        elif [s.input_ids for s in encoded] != [s.input_ids for s in samples]:
            raise InputError(f"{artifact} tokenizes the evaluation set differently from {artifacts[0]}: "
                             "compare artifacts of one model")
    assert samples is not None
    return samples


def _tokenizer_of(artifact: str | os.PathLike, allow_pickle: bool, verify_hashes: bool = True,
                  progress: bool = False) -> tuple[Any, int | None]:
    """The tokenizer and max_position_embeddings of an artifact folder or model, checked before any scoring
    (an artifact's files against its manifest: sizes, and sha256 unless `verify_hashes` is False)."""
    from transformers import AutoTokenizer

    from vexport.model import load_config, open_model

    path = Path(artifact).expanduser()
    if is_artifact(path):
        check_files(path, read_manifest(path), verify_hashes, progress)
        config = load_config(path)
    else:
        source = open_model(artifact, allow_pickle=allow_pickle)
        path, config = source.path, source.config
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise VexportError(f"{path}: its tokenizer cannot be loaded ({type(exc).__name__})") from None
    return tokenizer, getattr(config, "max_position_embeddings", None)


def _config_of(model: str | os.PathLike) -> Any:
    from vexport.model import load_config, resolve

    return load_config(resolve(model))


def artifact_labels(artifacts: Sequence[str | os.PathLike]) -> list[str]:
    """A short name per artifact (its folder name), made unique with '#2', '#3' ... when names repeat."""
    labels: list[str] = []
    for artifact in artifacts:
        base = Path(artifact).name or str(artifact)
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base} #{n}"
        labels.append(label)
    return labels


def _compared_precision(ref: ValueModel, candidate: ValueModel) -> str:
    """An fp32 export checked against the fp16 CUDA reference can only be held to fp16 limits."""
    if ref.precision == "float16" and candidate.precision == "float32":
        return "float16"
    return candidate.precision
