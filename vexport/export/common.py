"""What every exporter writes besides its own files: config, tokenizer, manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

from vexport.artifact import OWNER_FILE
from vexport.manifest import Manifest, file_entry, library_versions, now_iso
from vexport.model import ModelSource
from vexport.progress import progress_bar

SUPPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "vocab.json", "merges.txt")


def value_io_spec() -> tuple[list[dict], list[dict]]:
    """Every artifact takes input_ids and attention_mask and gives logits [batch, sequence, 1] in float32."""
    inputs = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in ("input_ids", "attention_mask")]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 1]}]
    return inputs, outputs


def copy_support_files(source: Path, dest: Path) -> list[str]:
    """Copy config and tokenizer files so the artifact folder is self-contained."""
    copied = []
    for name in SUPPORT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied


def source_summary(source: ModelSource, progress: bool = False) -> dict:
    with progress_bar("hashing source weights", len(source.weight_files), progress) as advance:
        weights = {}
        for file in source.weight_files:
            entry = file_entry(file, "weights")
            weights[file.name] = {"size": entry["size"], "sha256": entry["sha256"]}
            advance()
    arch = (getattr(source.config, "architectures", None) or [""])[0]
    return {"model": source.model_id, "architecture": arch, "weights": weights}


def model_summary(config) -> dict:
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", heads),
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
    }


def write_manifest(folder: Path, fmt: str, precision: str, source: ModelSource, io_spec, options: dict,
                   progress: bool = False) -> Manifest:
    """Hash every file in FOLDER and write manifest.json last: its presence marks a complete artifact."""
    inputs, outputs = io_spec
    files = {p.name: file_entry(p, _role(p.name)) for p in sorted(folder.iterdir())
             if p.is_file() and p.name != OWNER_FILE}  # the staging folder's owner marker is not the artifact's
    manifest = Manifest(format=fmt, precision=precision, source=source_summary(source, progress),
                        model=model_summary(source.config), inputs=inputs, outputs=outputs, files=files,
                        format_options=options, versions=library_versions(), created=now_iso())
    manifest.write(folder)
    return manifest


def _role(name: str) -> str:
    if name.startswith("tokenizer") or name in ("special_tokens_map.json", "added_tokens.json", "vocab.json",
                                                "merges.txt") or name.startswith("chat_template"):
        return "tokenizer"
    if name.endswith(".json"):
        return "config"
    return "model"
