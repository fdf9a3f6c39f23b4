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


# Files only an export writes: a folder holding one of them but no manifest.json is a broken artifact, never a
# Hugging Face model.
_EXPORTED_FILES = {"onnx": ("*.onnx",), "tensorrt": ("*.engine", "*.plan")}
_FORMAT_NAMES = {"onnx": "an ONNX graph", "tensorrt": "a TensorRT engine", "gptq": "GPTQ weights"}


def is_artifact(folder: str | os.PathLike) -> bool:
    """Whether FOLDER is a vexport artifact (it has manifest.json): the one place that decides it, for
    ``load``, ``check`` and ``score`` alike (everything else is read as a Hugging Face model).

    A folder with exported files (an ONNX graph, a TensorRT engine) but no manifest.json raises ManifestError
    saying so, rather than being read as a Hugging Face model that lacks its weights; so does a GPTQ
    checkpoint without one, which nothing here could run as a model (export reads it through ``open_model``).
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        return False
    if (path / MANIFEST_NAME).is_file():
        return True
    if _exported_files(path) or _declares_gptq(path):
        raise ManifestError(_no_manifest(path))
    return False


def _declares_gptq(path: Path) -> bool:
    """config.json has quantization_config.quant_method 'gptq' (an odd or unreadable config is left to model.py,
    which checks links and files before it reads them: a link is not followed here)."""
    file = path / "config.json"
    try:
        if file.is_symlink() or not file.is_file() or file.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        config = json.loads(file.read_text(encoding="utf-8"))
        return str(config["quantization_config"]["quant_method"]).lower() == "gptq"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        return False


def _exported_files(path: Path) -> list[Path]:
    return sorted(file for patterns in _EXPORTED_FILES.values() for pattern in patterns for file in path.glob(pattern))


def _no_manifest(folder: str | os.PathLike) -> str:
    """What a folder without manifest.json is told, by ``is_artifact`` and ``read_manifest`` alike."""
    found = _exported_files(Path(folder))
    if found:
        return (f"{folder} has {found[0].name} but no {MANIFEST_NAME}: not a complete vexport artifact "
                "(export it again; the loader reads only what the manifest records)")
    if _declares_gptq(Path(folder)):
        return (f"{folder} is a GPTQ checkpoint with no {MANIFEST_NAME}: vexport runs the GPTQ folders it exports "
                "(vexport export MODEL --format gptq); export this one with --format onnx to run it")
    return f"{folder} has no {MANIFEST_NAME}: not a vexport artifact folder"


def check_format_files(folder: str | os.PathLike, manifest: Manifest) -> None:
    """The files the manifest lists must be those of its format (an ONNX graph, an engine, safetensors weights);
    a manifest naming another format than the files present says which format they are."""
    path = Path(folder)
    listed = list(manifest.files)
    needs = {"onnx": manifest.format_options.get("graph"), "tensorrt": manifest.format_options.get("engine"),
             "gptq": next((name for name in listed if name.endswith(".safetensors")), None)}
    if manifest.format not in needs or (isinstance(needs[manifest.format], str) and needs[manifest.format] in listed):
        return
    present = [(kind, name) for kind, name in needs.items() if kind != manifest.format and name in listed]
    present += [(kind, file.name) for kind, patterns in _EXPORTED_FILES.items() if kind != manifest.format
                for pattern in patterns for file in sorted(path.glob(pattern))]
    holds = f"holds {_FORMAT_NAMES[present[0][0]]} ({present[0][1]})" if present else "lists none of its files"
    raise ManifestError(f"{path / MANIFEST_NAME} says format {manifest.format!r}, but the folder {holds}: "
                        f"the manifest does not describe this folder")


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate DIR/manifest.json; every problem is a one-line ManifestError naming the file."""
    path = Path(folder) / MANIFEST_NAME
    if not Path(folder).exists():
        raise ManifestError(f"{folder} does not exist")
    if not Path(folder).is_dir():
        raise ManifestError(f"{folder} is a file, not an artifact folder")
    if not path.is_file():
        raise ManifestError(_no_manifest(folder))
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
