"""Containment and integrity: a model or artifact folder is untrusted input.

Every file a folder refers to (index shards, ONNX external data, manifest entries, tokenizer files) must
resolve inside that folder after following symlinks; anything else is refused before it is opened. Weight
files are checked against the sizes and sha256 hashes the manifest records.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from vexport.errors import ManifestError, VexportError

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 24
HASH_LOG_BYTES = 1 << 30  # hashing a file this large is logged (about 2 s per GB)
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".bin", ".pt", ".pth", ".ckpt", ".engine", ".plan")
HF_CACHE_SNAPSHOTS = "snapshots"  # hub cache: <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>


class ContainmentError(VexportError):
    """A folder refers to a file outside itself (absolute path, '..', or a symlink leading out)."""


def containment_root(folder: Path) -> Path:
    """The folder files must stay inside: a hub-cache snapshot may link into its repo's blobs/ folder."""
    folder = Path(folder)
    if folder.parent.name == HF_CACHE_SNAPSHOTS and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent
    return folder


def inside(folder: str | os.PathLike, relpath: str, what: str = "", root: Path | None = None) -> Path:
    """FOLDER/RELPATH, refused unless it is relative, has no '..', and resolves (symlinks followed) inside
    ROOT (default FOLDER). Nothing is opened. WHAT names the file that refers to RELPATH, for the message."""
    folder = Path(folder)
    by = f" (named in {what})" if what else ""
    text = str(relpath)
    if not text or "\0" in text:
        raise ContainmentError(f"{folder}: empty or invalid file name {text!r}{by}")
    if _is_absolute(text) or ".." in PurePosixPath(text.replace("\\", "/")).parts:
        raise ContainmentError(f"{folder}: refusing {text!r}{by}: the path leads outside the folder")
    path = folder / text
    base = Path(os.path.realpath(root or containment_root(folder)))
    target = Path(os.path.realpath(path))
    if target != base and base not in target.parents:
        raise ContainmentError(f"{path}: refusing it{by}: it resolves to {target}, outside {base}")
    return path


def _is_absolute(text: str) -> bool:
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or bool(PureWindowsPath(text).drive)


def check_entries(folder: Path, names: list[str] | None = None) -> None:
    """Every entry of FOLDER (or the NAMES given) must resolve inside it: no symlink leads out."""
    folder = Path(folder)
    for name in sorted(names if names is not None else os.listdir(folder)):
        inside(folder, name)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The sha256 of PATH, read in chunks; PROGRESS gets the bytes read after each chunk."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    if size >= HASH_LOG_BYTES:
        log.info("hashing %s (%.1f GB); pass verify_hashes=False (--no-verify-hashes) to skip", path, size / 1e9)
    with open(path, "rb") as fh:
        while block := fh.read(HASH_CHUNK):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def verify_file(path: Path, entry: dict, verify_hash: bool = True,
                progress: Callable[[int], None] | None = None) -> None:
    """PATH must be a regular file with the recorded size, and (when VERIFY_HASH) the recorded sha256."""
    if not path.is_file():
        raise ManifestError(f"{path} is listed in manifest.json but missing")
    size = path.stat().st_size
    if size != entry.get("size"):
        raise ManifestError(f"{path} has {size} bytes, manifest.json says {entry.get('size')}: "
                               "truncated or replaced")
    if verify_hash and entry.get("sha256") is not None:
        if sha256_file(path, progress) != entry["sha256"]:
            raise ManifestError(f"{path} does not match the sha256 in manifest.json: the file was changed")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)
