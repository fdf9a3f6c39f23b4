"""What a scoring run is: the model's identity (hashes, no weights loaded), the options, run.json and summary.json."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vexport.errors import VexportError
from vexport.manifest import is_artifact, library_versions, now_iso, read_manifest
from vexport.scoring.inputs import InputPlan
from vexport.scoring.scorer import ScorerOptions

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass(frozen=True)
class ModelInfo:
    """A model to score with, described without loading its weights."""

    name: str  # what workers pass to vexport.load: an absolute folder or a hub id
    format: str  # "torch" (a Hugging Face folder or hub id) or the artifact's manifest format
    sha256: str  # over the weight (or artifact file) hashes: the identity resume compares
    max_positions: int | None
    summary: dict  # the artifact's manifest, or the source model id and its weight hashes
    files: dict = field(default_factory=dict)  # sha256 of the config, tokenizer and chat template files (resume)


def describe_model(model: str | Path, allow_pickle: bool = False) -> ModelInfo:
    """Read an artifact's manifest, or validate and hash a Hugging Face value model (local folder or hub id)."""
    path = Path(model).expanduser()
    if is_artifact(path):
        from vexport.runtime import check_files

        manifest = read_manifest(path)
        check_files(path, manifest)
        require_tokenizer(path)
        files = {name: entry.get("sha256") for name, entry in sorted(manifest.files.items())}
        return ModelInfo(str(path.absolute()), manifest.format, _sha256({"format": manifest.format, "files": files}),
                         manifest.model.get("max_position_embeddings"),
                         {"artifact": str(path.absolute()), "manifest": manifest.to_dict()}, support_files(path))
    from vexport.export.common import source_summary
    from vexport.model import open_model

    source = open_model(model, allow_pickle=allow_pickle)
    require_tokenizer(source.path)
    summary = source_summary(source)
    name = str(path.absolute()) if path.is_dir() else str(model)
    weights = {k: v["sha256"] for k, v in sorted(summary["weights"].items())}
    return ModelInfo(name, "torch", _sha256(weights), getattr(source.config, "max_position_embeddings", None),
                     {"source": summary}, support_files(source.path))


def require_tokenizer(folder: Path) -> None:
    """Scoring tokenizes every row with the model's own tokenizer: the folder must hold one."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise VexportError(f"{folder.absolute()} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                           "score tokenizes rows with the model's own tokenizer; copy its tokenizer files there")


def support_files(folder: Path) -> dict[str, str]:
    """sha256 of each config, tokenizer and chat template file in FOLDER, and of the chat template itself:
    what --resume compares besides the weights, so that one output never mixes two tokenisations."""
    from vexport.export.common import SUPPORT_FILES

    files = {}
    for name in SUPPORT_FILES:
        if (folder / name).is_file():
            files[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    template = _chat_template(folder)
    if template is not None:
        files["chat template"] = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()
    return files


def _chat_template(folder: Path) -> str | None:
    """The chat template as the tokenizer reads it: chat_template.jinja, else tokenizer_config.json's entry."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="surrogateescape")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if template is None or isinstance(template, str) else json.dumps(template, sort_keys=True)


def resolve_max_length(max_length: int | None, info: ModelInfo) -> int:
    """--max-length, defaulting to (and never above) the model's max_position_embeddings."""
    limit = info.max_positions
    if max_length is None:
        if not limit:
            raise VexportError("--max-length is required: the model's config has no max_position_embeddings")
        return int(limit)
    if max_length < 1:
        raise VexportError(f"--max-length must be at least 1, got {max_length}")
    if limit and max_length > limit:
        raise VexportError(f"--max-length {max_length} is over the model's max_position_embeddings ({limit})")
    return max_length


def run_state(plan: InputPlan, info: ModelInfo, options: ScorerOptions) -> dict:
    """run.json: what --resume must find unchanged (input bytes, model, options that change the output)."""
    kept = {"per_token": options.per_token, "max_length": options.max_length, "append_eos": options.append_eos,
            "part_rows": plan.part_rows}
    return {
        "version": 1,
        "input": {"sha256": plan.sha256, "path": str(plan.root), "rows": plan.total_rows,
                  "files": len(plan.files), "id": plan.id_kind},
        "model": {"sha256": info.sha256, "model": info.name, "format": info.format, "files": info.files},
        "options": {**kept, "sha256": _sha256(kept)},
    }


def summary(plan: InputPlan, info: ModelInfo, options: ScorerOptions, parts: list, run: dict) -> dict:
    """summary.json: totals over every part of the output, this run's throughput, the engine and the model."""
    tokens, slots = sum(p.tokens for p in parts), sum(p.slots for p in parts)
    seconds = max(run["seconds"], 1e-9)
    return {
        "input": {"path": str(plan.root), "sha256": plan.sha256, "files": [str(f.path) for f in plan.files]},
        "rows_read": sum(p.stop - p.start for p in parts),
        "rows_scored": sum(p.scored for p in parts),
        "rows_rejected": sum(p.rejected for p in parts),
        "tokens": tokens,
        "padding_fraction": 1.0 - tokens / slots if slots else 0.0,
        "complete": sum(p.stop - p.start for p in parts) == plan.total_rows,
        "this_run": {"rows": run["rows"], "tokens": run["tokens"], "seconds": round(run["seconds"], 3),
                     "rows_per_s": run["rows"] / seconds, "tokens_per_s": run["tokens"] / seconds,
                     "parts_already_done": run["skipped_parts"]},
        "engine": run["engine"], "workers": run["workers"], "threads": run.get("threads"),
        "device": run.get("device"), "ray_address": run.get("ray_address"),
        "options": {**asdict(options), "part_rows": plan.part_rows},
        "model": {"name": info.name, "format": info.format, "sha256": info.sha256, "files": info.files,
                  **info.summary},
        "versions": library_versions(), "created": now_iso(),
    }


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
