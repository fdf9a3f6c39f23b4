"""Intake: find, validate and load a value model (a local folder or a hub id).

A value model is a ``*ForTokenClassification`` checkpoint of a Llama-family decoder with one label. Everything
is checked from config.json and the safetensors headers before a single weight is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vexport.errors import CorruptFileError, NotAValueModelError, VexportError
from vexport.safety import check_entries, inside
from vexport.tensors import OPTIONAL as OPTIONAL_TENSORS
from vexport.tensors import WeightMismatchError, add_shard, check_tensors

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # fullmatch: "org/name\n" is not one
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                       "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class ModelSource:
    """A validated value model on local disk: its config, weight files and tensor index."""

    model_id: str  # as the user named it (a path or a hub id)
    path: Path  # the local folder
    config: Any  # transformers PretrainedConfig
    weight_files: list[Path]
    tensors: dict[str, tuple[Path, str, list[int]]] = field(default_factory=dict)  # name -> (file, dtype, shape)
    pickle: bool = False

    @property
    def score_has_bias(self) -> bool:
        """Pickle weights are read through transformers' module, whose score Linear always has a bias (the
        file's, or zeros when it has none); a safetensors checkpoint has one when its shards hold it."""
        return self.pickle or "score.bias" in self.tensors

    def read_tensor(self, name: str):
        """Read one tensor from its safetensors shard (the shard is mapped only while reading)."""
        from safetensors import safe_open

        file = self.tensors[name][0]
        with safe_open(str(file), framework="pt") as fh:
            return fh.get_tensor(name)

    def load_torch(self, dtype=None, device: str | None = None):
        """The reference: the checkpoint loaded with transformers, in eval mode."""
        from transformers import AutoModelForTokenClassification

        model, info = AutoModelForTokenClassification.from_pretrained(
            self.path, dtype=dtype, use_safetensors=not self.pickle, trust_remote_code=False,
            output_loading_info=True,
        )
        missing = [name for name in info.get("missing_keys", ()) if name not in OPTIONAL_TENSORS]
        if missing or info.get("mismatched_keys"):  # never run with weights transformers made up
            first = sorted(missing)[0] if missing else info["mismatched_keys"][0][0]
            raise WeightMismatchError(f"{self.path}: tensor {first} is "
                                      f"{'missing from' if missing else 'of the wrong shape in'} the weights")
        if device is not None:
            model = model.to(device)
        return model.eval()


def resolve(model: str | os.PathLike) -> Path:
    """A local folder as is; a hub id (org/name) downloaded with huggingface_hub; anything else refused.

    A name that looks like a path (starts with '.', '/' or '~', or is not exactly org/name) or any name while
    HF_HUB_OFFLINE is set is "no such folder" at once: no hub lookup."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VexportError(f"{model} is a file, not a model folder")
        return path
    text = str(model)
    _refuse_unless_hub_id(text)
    return _download(text)


def check_model_name(model: str | os.PathLike) -> None:
    """Refuse at once (before any heavy import) a MODEL that is no folder here and that resolve() would not look
    up on the hub; nothing is downloaded."""
    if not Path(model).expanduser().exists():
        _refuse_unless_hub_id(str(model))


def _refuse_unless_hub_id(text: str) -> None:
    if not looks_like_hub_id(text):
        raise VexportError(f"no such folder: {text} (it does not exist, and it is not a hub id org/name)")
    if _offline():
        raise VexportError(f"no such folder: {text} (it does not exist, and HF_HUB_OFFLINE is set: no hub lookup)")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and not text.startswith((".", "/", "~")) and ".." not in text \
        and "\\" not in text


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub", model_id)
    try:
        folder = snapshot_download(
            model_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # network, auth, missing repo: all one line for the user
        raise VexportError(f"{model_id} does not exist locally and could not be downloaded: "
                           f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    return Path(folder)


def open_model(model: str | os.PathLike, allow_pickle: bool = False) -> ModelSource:
    """Resolve, then validate config and weights of a value model; nothing heavy is loaded."""
    path = resolve(model)
    check_entries(path)  # no config, tokenizer or weight file may be a symlink leading out of the folder
    config = load_config(path)
    check_value_model(config, path)
    weight_files, is_pickle = find_weight_files(path, allow_pickle)
    tensors = {} if is_pickle else index_tensors(weight_files)
    if not is_pickle and "score.weight" not in tensors:
        raise NotAValueModelError(f"{path} has no score head (score.weight) in its weights: not a value model")
    if not is_pickle:  # names and shapes against config.json, from the headers (pickle: checked at load)
        check_tensors(path, config, tensors, _gptq_group_size(config), _gptq_plan(config, path))
    return ModelSource(str(model), path, config, weight_files, tensors, is_pickle)


def load_config(path: Path):
    config_file = path / "config.json"
    if not config_file.is_file():
        raise VexportError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        json.loads(config_file.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit integer
        raise CorruptFileError(f"{config_file} is not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise VexportError(f"{config_file} is not a config transformers can read: "
                           f"{' '.join(str(exc).split())[:200]}") from None


def check_value_model(config, path: Path) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else "(no architectures in config.json)"
    if not arch.endswith("ForTokenClassification"):
        kind = "a causal LM" if arch.endswith("ForCausalLM") else f"a {arch} checkpoint"
        raise NotAValueModelError(
            f"{path} is {kind} ({arch}) with no score head: not a value model "
            "(expected a *ForTokenClassification checkpoint with num_labels 1)"
        )
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise NotAValueModelError(f"{path}: model_type {config.model_type!r} is not a supported Llama-family "
                                  f"decoder (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if config.num_labels != 1:
        raise NotAValueModelError(f"{path} has num_labels {config.num_labels}: a value model has exactly 1")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise NotAValueModelError(f"{path}: hidden_act {config.hidden_act!r} is not supported (only silu)")
    check_config_features(config, path)


def rope_parameters(config) -> dict:
    """config.rope_parameters as transformers standardized it (rope_type, rope_theta, factors...)."""
    params = getattr(config, "rope_parameters", None)
    return dict(params) if isinstance(params, dict) else {}


def rope_type(config) -> str:
    return str(rope_parameters(config).get("rope_type", "default"))


def attention_window(config) -> int | None:
    """The sliding attention window transformers applies (Mistral's ``sliding_window``), None when it never
    limits a sequence the model takes (no window, or one of at least max_position_embeddings).
    LlamaModel ignores ``sliding_window``, so a Llama config carrying one has none."""
    window = getattr(config, "sliding_window", None)
    if config.model_type != "mistral" or window is None:
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return None if limit is not None and window >= limit else int(window)


def position_thresholds(config) -> list[int]:
    """Sequence lengths past which the model computes differently: the sliding window, and the pretraining length
    of a scaled rope (original_max_position_embeddings), each below max_position_embeddings."""
    limit = getattr(config, "max_position_embeddings", None)
    found = [attention_window(config)]
    if rope_type(config) in ("llama3", "yarn", "longrope"):
        found.append(rope_parameters(config).get("original_max_position_embeddings"))
    return sorted({int(n) for n in found if _whole(n) and n > 0 and (limit is None or n < limit)})


def check_config_features(config, path: Path) -> None:
    """Config features transformers itself cannot run are refused by name (the export refuses more)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = rope_type(config)
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        known = ", ".join(["default", *sorted(ROPE_INIT_FUNCTIONS)])
        raise NotAValueModelError(f"{path / 'config.json'}: rope_type {kind[:40]!r} is not a rope type "
                                  f"transformers knows ({known})")
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window is not None and not (_whole(window) and window > 0):
        raise NotAValueModelError(f"{path / 'config.json'}: sliding_window {str(window)[:40]} is not a positive "
                                  "integer")


def find_weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _files_from_index(index), False
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors, False
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise VexportError(f"{path} has no weight files (*.safetensors)")
    if not allow_pickle:
        raise VexportError(
            f"{path} has weights only in pickle files ({pickles[0].name}), which can run code when loaded: "
            "refused (pass --allow-pickle if you trust them, or convert them to safetensors)"
        )
    log.warning("loading pickle weights from %s because allow_pickle was given", path)
    return pickles, True


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) for name in names):
            raise TypeError("a weight_map value is not a string")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{index} is not a valid safetensors index ({type(exc).__name__})") from None
    files = []
    for name in names:
        file = inside(index.parent, name, index.name)  # '../outside.safetensors' is refused unopened
        if not file.is_file():
            raise CorruptFileError(f"{index} names {name!r}, which is missing")
        files.append(file)
    return files


def index_tensors(files: list[Path]) -> dict[str, tuple[Path, str, list[int]]]:
    """name -> (file, dtype, shape) over every shard; a tensor in two shards is refused."""
    tensors: dict[str, tuple[Path, str, list[int]]] = {}
    for file in files:
        add_shard(tensors, file, read_safetensors_header(file))
    return tensors


def _gptq_group_size(config) -> int | None:
    """None for a float checkpoint; a GPTQ checkpoint's group size (0 when config.json gives none usable)."""
    from vexport.quant.checkpoint import is_gptq_config, quantization_config_of

    if not is_gptq_config(config):
        return None
    size = quantization_config_of(config).get("group_size", -1)
    return size if isinstance(size, int) and not isinstance(size, bool) and (size == -1 or size > 0) else 0


def _gptq_plan(config, path: Path):
    """A mixed GPTQ checkpoint's (bits, group size) per Linear, None for one left float16; None when the
    checkpoint has no ``dynamic`` (its one group size applies). A bad ``dynamic`` is refused here, by name."""
    from vexport.quant.checkpoint import gptq_options, module_quant, quantization_config_of

    if _gptq_group_size(config) is None or not (quantization_config_of(config) or {}).get("dynamic"):
        return None
    options = gptq_options(config, path / "config.json")

    def plan(prefix: str):
        quant = module_quant(options, prefix, str(path / "config.json"))
        return None if quant is None else (quant.bits, quant.group_size)

    return plan


def read_safetensors_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Parse and check a safetensors header: the byte ranges must tile the data exactly (catches truncation)."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 << 20:
            raise CorruptFileError(f"{file} is truncated or not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, or a 5000-digit integer
            raise CorruptFileError(f"{file} is corrupt: its safetensors header is not valid JSON") from None
    return _check_header(file, header, size - 8 - length)


def _check_header(file: Path, header: Any, data_size: int) -> dict[str, tuple[str, list[int]]]:
    if not isinstance(header, dict):
        raise CorruptFileError(f"{file} is corrupt: its safetensors header is not an object")
    out, ranges = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, stop = _header_entry(file, name, info)
        nbytes = _SAFETENSORS_DTYPES[dtype] * _prod(shape)
        if stop - begin != nbytes:
            raise CorruptFileError(f"{file} is corrupt: {name!r} has {stop - begin} bytes, expected {nbytes}")
        out[name] = (dtype, list(shape))
        ranges.append((begin, stop))
    end = 0
    for begin, stop in sorted(ranges):
        if begin != end:
            raise CorruptFileError(f"{file} is corrupt: its tensors overlap or leave a gap at byte {end}")
        end = stop
    if end != data_size:
        raise CorruptFileError(f"{file} is truncated or padded: its header needs {end} data bytes, "
                               f"the file has {data_size}")
    return out


def _header_entry(file: Path, name: str, info: Any) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, stop) of one header entry, every field of the right type."""
    try:
        dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CorruptFileError(f"{file} is corrupt: bad header entry for {name!r}") from None
    if not (isinstance(dtype, str) and dtype in _SAFETENSORS_DTYPES):
        raise CorruptFileError(f"{file} is corrupt: {name!r} has unknown dtype {str(dtype)[:20]!r}")
    if not (isinstance(shape, list) and all(map(_whole, [*shape, begin, stop])) and begin <= stop):
        raise CorruptFileError(f"{file} is corrupt: bad shape or data_offsets for {name!r}")
    return dtype, shape, begin, stop


def _whole(value: Any) -> bool:
    """A JSON whole number >= 0 (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
