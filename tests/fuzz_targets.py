"""One fuzz target per reader of outside data, shared by tests/test_fuzz_readers.py (hypothesis) and
scripts/fuzz_readers.py (atheris). Each target feeds the bytes to the reader the way vexport reads a file;
the caller accepts a VexportError and nothing else.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

MANIFEST_KEYS = ("format", "precision", "source", "model", "inputs", "outputs", "files", "format_options",
                 "versions", "parity", "created", "manifest_version")


def valid_manifest() -> dict[str, Any]:
    return {"format": "onnx", "precision": "float32", "source": {"model": "m"}, "model": {"vocab_size": 8},
            "inputs": [], "outputs": [], "files": {"model.onnx": {"size": 0, "sha256": "0" * 64, "role": "model"}},
            "format_options": {"graph": "model.onnx"}, "versions": {}, "parity": None, "created": "",
            "manifest_version": 1}


def _write(base: Path, name: str, data: bytes) -> Path:
    folder = Path(base) / "fuzz"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def manifest(base: Path, data: bytes) -> None:
    """read_manifest, `vexport info`'s rows, then the folder checked against it (containment, sizes, hashes)."""
    from vexport.manifest import read_manifest
    from vexport.runtime import check_files

    from vexport.cli import _info_rows

    folder = _write(base, "manifest.json", data).parent
    manifest = read_manifest(folder)
    _info_rows(manifest)  # what `vexport info` prints
    check_files(folder, manifest)


def prompt_groups(base: Path, data: bytes) -> None:
    from vexport.evalset import read_prompt_groups

    read_prompt_groups(_write(base, "prompts.jsonl", data))


def calibration(base: Path, data: bytes) -> None:
    from vexport.calibration import read_calibration_file

    read_calibration_file(_write(base, "calibration.jsonl", data))


def safetensors(base: Path, data: bytes) -> None:
    """A header read_safetensors_header accepts must load with the safetensors library, every tensor."""
    from safetensors import safe_open

    from vexport.model import read_safetensors_header

    path = _write(base, "model.safetensors", data)
    header = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as fh:
        for name in header:
            fh.get_tensor(name)


def shard_index(base: Path, text: str) -> None:
    from vexport.model import _files_from_index

    path = _write(base, "model.safetensors.index.json", text.encode())
    _write(base, "model-1.safetensors", b"")
    _files_from_index(path)


def gptq(tensors: dict[str, torch.Tensor]) -> None:
    from vexport.quant.pack import unpack_gptq_v1

    unpack_gptq_v1(tensors).dequantize(torch.float32)


def onnx_graph(base: Path, data: bytes) -> None:
    from vexport.backends.onnxrt import check_external_data

    check_external_data(_write(base, "model.onnx", data))


@functools.cache
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def scoring_row(tok, line: bytes, max_length: int = 64) -> None:
    """A row is scored or rejected with a reason: RowEncoder.encode never raises for a bad row."""
    from vexport.scoring.rows import EncodedRow, RowEncoder

    for kind in (None, "int", "str"):
        (out,) = RowEncoder(tok, max_length, id_kind=kind).encode([line])
        assert isinstance(out, (EncodedRow, str)), out


def scoring_input(base: Path, data: bytes, suffix: str) -> None:
    """index_input then read_windows over every window (the bytes of a JSONL or a Parquet file)."""
    from vexport.scoring.inputs import index_input, read_windows

    path = _write(base, f"input{suffix}", data)
    plan = index_input(path, part_rows=2)
    for _ in read_windows(plan, plan.windows(), line_limit=1 << 16):
        pass
