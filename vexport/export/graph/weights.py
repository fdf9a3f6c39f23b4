"""What every ONNX writer shares about weights: the one external-data streamer, the one nibble packer, and the
folded norm-times-score head weight.

- ``write_weights`` streams each initializer a graph builder asked for (``WeightSpec``: a checkpoint tensor,
  cast and maybe transposed, or made by a function) into one external-data file, page-aligned so ONNX
  Runtime can memory-map it, one tensor in memory at a time; ``PackedInt4`` tensors go in as their bytes.
- ``pack_nibbles`` puts two 4-bit codes in a byte, the first in the low nibble (MatMulNBits' ``B`` and
  ``zero_points``, ONNX's INT4 tensors).
- ``folded_score``: ``score(w_norm * n) = n @ (w_norm * w_score)^T``, computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from vexport.errors import VexportError
from vexport.export.graph.plain import WeightSpec
from vexport.model import ModelSource
from vexport.progress import progress_bar

ALIGN = 4096  # page-aligned tensors, so ONNX Runtime can memory-map the external data
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class PackedInt4:
    """A signed INT4 tensor as ONNX stores it: ``data`` uint8, two elements per byte (low nibble first)."""

    data: np.ndarray
    shape: tuple[int, ...]
    data_type: int = TensorProto.INT4

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes (0..15) [..., C] -> uint8 [..., ceil(C / 2)], element 2j in the low nibble of byte j."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def pack_int4(values: np.ndarray) -> PackedInt4:
    """int8 values in [-8, 7] -> ONNX INT4 packing of the row-major flattened tensor."""
    if values.size and (values.min() < -8 or values.max() > 7):
        raise VexportError("int4 values must lie in [-8, 7]")
    flat = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    return PackedInt4(pack_nibbles(flat), tuple(values.shape))


def unpack_int4(packed: PackedInt4) -> np.ndarray:
    """The int8 values back (the reference for tests)."""
    nibbles = np.stack([packed.data & 0xF, packed.data >> 4], axis=1).reshape(-1)[: math.prod(packed.shape)]
    return ((nibbles.astype(np.int8) ^ 8) - 8).reshape(packed.shape)  # sign extension: 0..7 stay, 8..15 become -8..-1


def folded_score(read: Callable[[str], torch.Tensor], dtype: str = "float32") -> np.ndarray:
    """[hidden, labels]: the final norm's weight times the score weight, in float32, cast once to DTYPE."""
    folded = read("model.norm.weight").float()[None, :] * read("score.weight").float()
    return folded.t().contiguous().to(_TORCH_DTYPE[dtype]).numpy()


def tensor_reader(source: ModelSource) -> Callable[[str], torch.Tensor]:
    """Checkpoint tensors by name: from the safetensors shards, or (pickle weights, allowed explicitly) from one
    state dict in memory."""
    if not source.pickle:
        return source.read_tensor
    state = source.load_torch().state_dict()
    return state.__getitem__


def write_weights(graph: onnx.ModelProto, weights: list[WeightSpec], read: Callable[[str], torch.Tensor],
                  data_file: Path, dtype: str, progress: bool,
                  written: Callable[[WeightSpec, Any], None] | None = None) -> None:
    """Stream every initializer into DATA_FILE, page-aligned, and reference it from GRAPH as external data
    (``written(spec, array)`` sees each array as it is written)."""
    offset = 0
    with open(data_file, "wb") as fh, progress_bar("writing ONNX weights", len(weights), progress) as advance:
        for spec in weights:
            array = spec.make(read) if spec.make else _prepare(read(spec.source), spec, dtype)
            if written is not None:
                written(spec, array)
            pad = (-offset) % ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            data = array.data if isinstance(array, PackedInt4) else np.ascontiguousarray(array)
            fh.write(memoryview(data).cast("B"))
            graph.graph.initializer.append(_external(spec.name, array, offset, data_file.name))
            offset += data.nbytes
            del array, data
            advance()


def _prepare(tensor: torch.Tensor, spec: WeightSpec, dtype: str) -> np.ndarray:
    tensor = tensor.to(_TORCH_DTYPE[dtype])
    return (tensor.t() if spec.transpose else tensor).contiguous().numpy()


def _external(name: str, array: np.ndarray | PackedInt4, offset: int, location: str) -> TensorProto:
    if isinstance(array, PackedInt4):
        data_type, dims = array.data_type, list(array.shape)
    else:
        data_type, dims = helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)
    tensor = TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
