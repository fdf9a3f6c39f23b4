"""The parity report dict: what each artifact is, its costs and parity, the worst sequences, how to repeat it.

``vexport.checker`` runs the comparison and hands the pieces here; the layout is
vexport/data/report.schema.json. Models are described through what ``vexport.load`` returns (path,
format, precision, runner name, device, manifest); nothing here runs a model.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vexport import __version__
from vexport.evalset import EncodedSample
from vexport.parity import worst_sequences
from vexport.report.environment import environment

WORST_K = 5  # worst sequences kept per artifact


def describe(label: str, model) -> dict[str, Any]:
    """What the artifact is: format, precision, bits, group size, backend, device, size on disk, export options."""
    options = dict(model.manifest.format_options) if model.manifest else {}
    bits = options.get("bits") or {"float32": 32, "float16": 16, "bfloat16": 16}.get(model.precision)
    export = {k: v for k, v in options.items() if k not in ("operator_counts", "seconds_per_layer")}
    return {"label": label, "path": str(model.path), "format": model.format, "precision": model.precision,
            "bits": bits, "group_size": options.get("group_size"), "backend": model.runner.name,
            "device": str(model.device), "size_bytes": folder_size(model.path), "export": export}


def folder_size(path: Path) -> int | None:
    """Bytes of every file under PATH (None when PATH is not a local folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def reference_identity(reference: str | os.PathLike, ref) -> dict[str, str]:
    return {"model": str(reference), "backend": ref.runner.name, "device": str(ref.device), "dtype": ref.precision}


def reference_entry(reference, ref, load_seconds: float, timing: dict[str, Any]) -> dict[str, Any]:
    where = "CUDA" if ref.device.type == "cuda" else ref.device.type.upper()
    if ref.device.index is not None:
        where += f" {ref.device.index}"
    return {**reference_identity(reference, ref), "path": str(ref.path), "size_bytes": folder_size(ref.path),
            "load_seconds": load_seconds, "scoring": timing,
            "description": f"{ref.runner.name} {ref.precision} on {where}"}


def worst_rows(samples: Sequence[EncodedSample], ref_values: Sequence[np.ndarray],
               cand_values: Sequence[np.ndarray], k: int = WORST_K) -> list[dict[str, Any]]:
    """The k sequences with the largest max |error|: where it is, the final values and the text."""
    rows = []
    for index, error in worst_sequences(ref_values, cand_values, k):
        ref, cand = ref_values[index], cand_values[index]
        diff = np.abs(cand.astype(np.float64) - ref)
        sample = samples[index]
        rows.append({"index": index, "group": sample.group, "response": sample.response, "tokens": len(ref),
                     "max_abs_error": error, "position": int(np.argmax(np.where(np.isnan(diff), np.inf, diff))),
                     "reference_final": float(ref[-1]), "candidate_final": float(cand[-1]),
                     "group_order_kept": group_order_kept(samples, ref_values, cand_values, sample.group),
                     "text": sample.text})
    return rows


def group_order_kept(samples, ref_values, cand_values, group: int) -> bool:
    """Whether the candidate orders the responses of GROUP (by final value) as the reference does."""
    members = [i for i, s in enumerate(samples) if s.group == group]
    ref = np.array([ref_values[i][-1] for i in members])
    cand = np.array([cand_values[i][-1] for i in members])
    return bool(np.array_equal(np.argsort(-ref, kind="stable"), np.argsort(-cand, kind="stable")))


def settings(evalset: str, num_groups: int, samples: Sequence[EncodedSample], batch_tokens: int, seed: int,
              thresholds: Mapping[str, float] | None) -> dict[str, Any]:
    digest = sha256("\n\0".join(s.text for s in samples).encode("utf-8")).hexdigest()[:16]
    return {"evalset": {"name": evalset, "groups": num_groups, "sequences": len(samples),
                        "tokens": int(sum(len(s.input_ids) for s in samples)), "digest": digest},
            "batch_tokens": batch_tokens, "seed": seed, "threshold_overrides": dict(thresholds or {})}


def comparison_report(created: str, artifacts: Sequence, ref_entry: dict[str, Any], settings: dict[str, Any],
                       entries: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    return {
        "vexport_version": __version__,
        "created": created,
        "reference": ref_entry,
        "evalset": settings["evalset"],
        "seed": settings["seed"],
        "batch_tokens": settings["batch_tokens"],
        "threshold_overrides": settings["threshold_overrides"],
        "command": repeat_command(artifacts, ref_entry["model"], settings, device),
        "environment": environment(device),
        "passed": all(e["parity"]["passed"] for e in entries),
        "artifacts": entries,
    }


def repeat_command(artifacts: Sequence, reference: str, settings: dict[str, Any], device: torch.device) -> str:
    """The `vexport check` line that repeats this comparison."""
    words = ["vexport", "check", *map(str, artifacts), "--reference", reference]
    if settings["evalset"]["name"] != "builtin":
        words += ["--prompts", settings["evalset"]["name"]]
    words += ["--device", device.type, "--batch-tokens", str(settings["batch_tokens"]), "--seed", str(settings["seed"])]
    for key, value in settings["threshold_overrides"].items():
        words += ["--threshold", f"{key}={'none' if value is None else format(value, 'g')}"]  # none: unchecked
    return shlex.join(words)


def single_report(comparison: Mapping[str, Any]) -> dict[str, Any]:
    """The one-artifact report (the layout of `vexport check DIR --report r.json`) of a one-artifact comparison."""
    entry = comparison["artifacts"][0]
    keys = ("vexport_version", "created", "reference", "evalset", "seed", "environment")
    return {**{k: comparison[k] for k in keys},
            "artifact": {**{k: entry[k] for k in ("path", "format", "precision", "backend", "device")},
                         **_allocation(entry)},
            "parity": entry["parity"], "worst": [{k: w[k] for k in ("index", "max_abs_error", "text")}
                                                 for w in entry["worst"]]}


def _allocation(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A mixed-precision export's per-module allocation, kept in the one-artifact report (its bits table)."""
    allocation = entry.get("export", {}).get("allocation")
    return {"allocation": allocation} if allocation is not None else {}
