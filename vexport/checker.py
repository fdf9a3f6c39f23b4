"""`vexport.check`: the same batches through the reference and the candidate, then parity on real tokens."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vexport import __version__
from vexport.batching import pad_batch, token_budget_batches, unpad
from vexport.evalset import EncodedSample, builtin_prompt_groups, encode_groups, read_prompt_groups
from vexport.manifest import library_versions, now_iso
from vexport.parity import ParityResult, compare, thresholds_for, worst_sequences
from vexport.progress import progress_bar
from vexport.runtime import ValueModel, load

log = logging.getLogger(__name__)


@dataclass
class CheckOutcome:
    result: ParityResult
    report: dict[str, Any]


def check(artifact: str | os.PathLike, reference: str | os.PathLike, *, prompts: str | os.PathLike | None = None,
          thresholds: dict[str, float] | None = None, device: str | None = None, batch_tokens: int = 4096,
          report: str | os.PathLike | None = None, record: bool = True, allow_pickle: bool = False,
          progress: bool = False) -> CheckOutcome:
    """Compare ARTIFACT against the REFERENCE model; write REPORT (.json/.md) and the manifest's parity summary."""
    candidate = load(artifact, device=device)
    ref = load(reference, device=device, allow_pickle=allow_pickle)
    groups, evalset = (read_prompt_groups(prompts), str(prompts)) if prompts else (builtin_prompt_groups(), "builtin")
    samples = encode_groups(candidate.tokenizer, groups, max_length=candidate.config.max_position_embeddings)
    ref_values, cand_values = run_pair(ref, candidate, samples, batch_tokens, progress)
    limits = thresholds_for(candidate.format, _compared_precision(ref, candidate), thresholds)
    result = compare(ref_values, cand_values, [s.group for s in samples], limits)
    doc = _report(candidate, ref, reference, samples, evalset, len(groups), result, ref_values, cand_values)
    if report:
        from vexport.report import write_report

        write_report(report, doc)
    if record and candidate.manifest is not None:
        candidate.manifest.parity = {**result.summary(), "reference": doc["reference"], "evalset": evalset,
                                     "checked": doc["created"]}
        candidate.manifest.write(Path(artifact))
    return CheckOutcome(result, doc)


def run_pair(ref: ValueModel, candidate: ValueModel, samples: list[EncodedSample], batch_tokens: int,
             progress: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-sequence values of both models on identical right-padded batches, in sample order."""
    pad_id = _pad_id(candidate)
    batches = token_budget_batches([len(s.input_ids) for s in samples], batch_tokens)
    ref_out: list = [None] * len(samples)
    cand_out: list = [None] * len(samples)
    with progress_bar("scoring reference and candidate", len(samples), progress) as advance:
        for batch in batches:
            ids, mask = pad_batch([samples[i].input_ids for i in batch], pad_id)
            for out, model in ((ref_out, ref), (cand_out, candidate)):
                for i, row in zip(batch, unpad(model.values(ids, mask), mask)):
                    out[i] = row
            advance(len(batch))
    return ref_out, cand_out


def _compared_precision(ref: ValueModel, candidate: ValueModel) -> str:
    """An fp32 export checked against the fp16 CUDA reference can only be held to fp16 limits."""
    if ref.precision == "float16" and candidate.precision == "float32":
        return "float16"
    return candidate.precision


def _pad_id(model: ValueModel) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = model.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


def _report(candidate: ValueModel, ref: ValueModel, reference, samples, evalset: str, num_groups: int,
            result: ParityResult, ref_values, cand_values) -> dict[str, Any]:
    worst = worst_sequences(ref_values, cand_values, 5)
    return {
        "vexport_version": __version__,
        "created": now_iso(),
        "artifact": {"path": str(candidate.path), "format": candidate.format, "precision": candidate.precision,
                     "backend": candidate.runner.name, "device": str(candidate.device)},
        "reference": {"model": str(reference), "backend": ref.runner.name, "device": str(ref.device),
                      "dtype": ref.precision},
        "evalset": {"name": evalset, "groups": num_groups, "sequences": len(samples),
                    "tokens": int(sum(len(s.input_ids) for s in samples))},
        "seed": None,
        "environment": library_versions(),
        "parity": result.to_dict(),
        "worst": [{"index": i, "max_abs_error": err, "text": samples[i].text} for i, err in worst],
    }
