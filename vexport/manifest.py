"""manifest.json: what an artifact folder holds. The loader decides what to do from this file alone."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vexport.errors import ManifestError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few kB; a larger one is refused before it is read
_FIELD_TYPES = {"format": str, "precision": str, "source": dict, "model": dict, "inputs": list, "outputs": list,
                "files": dict, "format_options": dict, "versions": dict, "parity": (dict, type(None)), "created": str}
_VERSIONED_PACKAGES = ("vexport", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                       "safetensors", "tokenizers", "triton", "tensorrt")


@dataclass
class Manifest:
    """Everything the loader and the parity check need to know about an artifact folder."""

    format: str  # "onnx" | "gptq" | "tensorrt"
    precision: str  # "float32" | "float16" | "int4"
    source: dict[str, Any]  # model id, weight file hashes, architecture
    model: dict[str, Any]  # hidden size, layers, vocab, max positions ...
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    files: dict[str, dict[str, Any]]  # relative path -> {"size", "sha256", "role"}
    format_options: dict[str, Any] = field(default_factory=dict)  # opset, graph file, group size ...
    versions: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    created: str = ""
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, folder: Path) -> Path:
        """Write atomically (temp file + rename), so a reader never sees half a manifest."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError:
            if tmp.is_file():  # a full disk: no half-written temporary file is left beside the manifest
                tmp.unlink()
            raise
        return path


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate DIR/manifest.json; every problem is a one-line ManifestError naming the file."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: not a vexport artifact folder")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is {path.stat().st_size} bytes, more than a manifest can be")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, huge ints
        raise ManifestError(f"{path} is not readable JSON ({_one_line(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object")
    version = data.get("manifest_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path} has no valid manifest_version (a whole number >= 1)")
    if version > MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has manifest_version {version}, newer than this vexport reads ({MANIFEST_VERSION}): "
            "upgrade vexport (pip install -U vexport)"
        )
    names = {f.name for f in dataclasses.fields(Manifest)}
    missing = sorted(n for n in names if n not in data and n not in ("parity", "created", "versions", "format_options"))
    if missing:
        raise ManifestError(f"{path} lacks field(s): {', '.join(missing)}")
    _check_types(path, data)
    return Manifest(**{k: v for k, v in data.items() if k in names})


def _check_types(path: Path, data: dict[str, Any]) -> None:
    """Every field of the type the loader expects; every files entry {"size": int >= 0, "sha256": hex}."""
    for key, kind in _FIELD_TYPES.items():
        if key in data and not isinstance(data[key], kind):
            raise ManifestError(f"{path}: field {key!r} has the wrong type ({type(data[key]).__name__})")
    for key in ("inputs", "outputs"):
        if not all(isinstance(io, dict) and {"name", "dtype", "shape"} <= io.keys() for io in data[key]):
            raise ManifestError(f"{path}: every {key} entry must be an object with name, dtype and shape")
    for name, entry in data["files"].items():
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{path}: files entry {name[:100]!r} has no valid size")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ManifestError(f"{path}: files entry {name[:100]!r} has no valid sha256")


def file_entry(path: Path, role: str) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path), "role": role}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
