"""`vexport.load`: a drop-in for ``AutoModelForTokenClassification.from_pretrained`` over any artifact.

The backend is chosen from manifest.json alone; a plain Hugging Face folder or hub id gives the reference
torch backend. Every backend is a runner with ``logits(input_ids, attention_mask) -> [B, T, 1]``.

Inputs are checked here, once, above every backend (``ValueModel._inputs``): input_ids an integer [B, T] tensor
of ids inside the vocabulary, attention_mask of the same shape holding only 0 and 1. Rows with no real token
(an all-zero mask row, every row of a [B, 0] or [0, T] batch) are never run: their logits and values are 0
(``_run_rows``), so an empty batch returns an empty result of the right shape on every backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers.modeling_outputs import TokenClassifierOutput

from vexport.backends.base import Runner
from vexport.errors import InputError, ManifestError
from vexport.manifest import MANIFEST_NAME, Manifest, check_format_files, is_artifact, read_manifest

log = logging.getLogger(__name__)

_IGNORED_KWARGS = {"return_dict", "use_cache", "output_attentions", "output_hidden_states", "position_ids"}
_CACHE_KWARGS = ("past_key_values", "cache")  # the transformers 4 and 5 names of the KV cache argument


class ValueModel:
    """A value model on some backend. ``model(input_ids=..., attention_mask=...).logits`` is [B, T, 1]."""

    def __init__(self, runner: Runner, config, path: Path, manifest: Manifest | None = None):
        self.runner = runner
        self.config = config
        self.path = path
        self.manifest = manifest
        self._tokenizer = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.runner.device)

    @property
    def format(self) -> str:
        return self.manifest.format if self.manifest else "torch"

    @property
    def precision(self) -> str:
        if self.manifest:
            return self.manifest.precision
        return str(self.runner.dtype).removeprefix("torch.")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def eval(self) -> "ValueModel":
        return self

    def __call__(self, input_ids=None, attention_mask=None, **kwargs) -> TokenClassifierOutput:
        unknown = sorted(set(kwargs) - _IGNORED_KWARGS - set(_CACHE_KWARGS))
        if unknown:
            raise InputError(f"unsupported argument(s) for a vexport model: {', '.join(unknown)}")
        if self._wants_cache(kwargs):
            return self._call_with_cache(input_ids, attention_mask, kwargs)
        ids, mask = self._inputs(input_ids, attention_mask)
        logits = self._run_rows(ids, mask, lambda i, m: self.runner.logits(i, m).to(self.device), (1,),
                                self.runner.logits_dtype)
        return TokenClassifierOutput(logits=logits)

    forward = __call__

    # Decoding: KV-cached calls, sessions and shared-prompt scoring (vexport/decoding).
    def _wants_cache(self, kwargs: dict) -> bool:
        """A cache was passed (any backend: the others refuse it by name), or asked for on a torch backend."""
        passed = any(kwargs.get(name) is not None for name in _CACHE_KWARGS)
        return passed or bool(kwargs.get("use_cache")) and self.runner.incremental

    def _call_with_cache(self, input_ids, attention_mask, kwargs: dict):
        """``input_ids`` are the new tokens; ``attention_mask`` covers the cached and the new ones. Returns
        ``.logits`` [B, n, 1] and ``.past_key_values`` (also ``.cache``), as a causal LM does."""
        from vexport.decoding import forward_with_cache

        passed = [name for name in _CACHE_KWARGS if kwargs.get(name) is not None]
        if len(passed) > 1:
            raise InputError("pass the KV cache as past_key_values or as cache, not both")
        ids, _ = self._inputs(input_ids, None)
        if attention_mask is not None:  # it spans the cached and the new tokens: only its values are checked here
            _check_mask(_as_tensor(attention_mask, "attention_mask"))
        return forward_with_cache(self, ids, attention_mask, kwargs[passed[0]] if passed else None)

    def session(self, prompt_ids, attention_mask=None):
        """A ``vexport.decoding.Session``: the prompt ([P] or [B, P]) runs once and its KV cache is kept for
        ``score(candidates)`` and ``advance(tokens)`` (torch backends: the fp reference and GPTQ int4)."""
        from vexport.decoding import Session

        return Session(self, prompt_ids, attention_mask)

    def score_group(self, prompt_ids, responses) -> list[torch.Tensor]:
        """Per-token values (float32) of each response after one shared prompt [P], the prompt run once."""
        from vexport.decoding import score_group

        return score_group(self, prompt_ids, responses)

    def values(self, input_ids, attention_mask=None) -> torch.Tensor:
        """float32 [B, T]: the value of every token; padding positions are 0 (a row with no real token is 0)."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return self._run_rows(ids, mask, self._values, (), torch.float32)

    def _values(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = self.runner.values(ids, mask).to(self.device)  # torch backends: the fused head on CUDA
        return values * mask.to(values.device)

    def sequence_values(self, input_ids, attention_mask=None) -> torch.Tensor:
        """float32 [B]: the value of each sequence, read at its last real token (any padding side); 0 for a row
        with no real token."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return self._run_rows(ids, mask, self._sequence_values, None, torch.float32)

    def _sequence_values(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from vexport.head import last_token_index

        return self.runner.values(ids, mask, index=last_token_index(mask)).to(self.device)  # the last tokens only

    def _run_rows(self, ids: torch.Tensor, mask: torch.Tensor, run, tail: tuple[int, ...] | None,
                  dtype: torch.dtype) -> torch.Tensor:
        """RUN(ids, mask) over the rows that have a real token; the others (and an empty batch) are 0.

        The result is [B] for ``tail=None``, else [B, T, *tail]. No backend ever sees an empty batch, an empty
        sequence or a row with no real token (ONNX Runtime's attention divides by the row's length).
        """
        live = mask.any(dim=1)
        if ids.numel() and bool(live.all()):
            return run(ids, mask)
        shape = (ids.shape[0],) if tail is None else (*ids.shape, *tail)
        out = torch.zeros(shape, dtype=dtype, device=self.device)
        if ids.numel() and bool(live.any()):
            rows = live.nonzero()[:, 0]
            out[rows.to(out.device)] = run(ids[rows.to(ids.device)], mask[rows]).to(out.device, out.dtype)
        return out

    def _inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The one check of what every backend is given (see the module docstring)."""
        if input_ids is None:
            raise InputError("input_ids is required")
        ids = _as_tensor(input_ids, "input_ids")
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise InputError(f"input_ids must be an integer tensor [batch, sequence], got {tuple(ids.shape)} {ids.dtype}")
        mask = torch.ones_like(ids) if attention_mask is None else _as_tensor(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        _check_mask(mask)
        _check_ids(ids, self.config)
        return ids.long(), mask.long()

    def __repr__(self) -> str:
        return f"ValueModel(format={self.format}, precision={self.precision}, device={self.device}, path={self.path})"


def _as_tensor(value, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged lists, strings, objects
        raise InputError(f"{name} is not a tensor [batch, sequence] ({' '.join(str(exc).split())[:200]})") from None


def _check_mask(mask: torch.Tensor) -> None:
    """Only 0 (padding) and 1 (a real token): any other value would change values, differently per backend."""
    if mask.dtype == torch.bool or not mask.numel():
        return
    if mask.dtype.is_complex:
        raise InputError(f"attention_mask must hold 0 and 1, got a {mask.dtype} tensor")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"attention_mask has value {mask[at].item()} at [{', '.join(map(str, at))}]: "
                         "only 0 (padding) and 1 (a real token) are allowed")


def _check_ids(ids: torch.Tensor, config) -> None:
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= config.vocab_size:
            raise InputError(f"input_ids has token id {low if low < 0 else high}, outside the vocabulary "
                             f"[0, {config.vocab_size}) (the largest id is {config.vocab_size - 1})")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and ids.shape[1] > limit:
        raise InputError(f"sequence of {ids.shape[1]} tokens is longer than the model's "
                         f"max_position_embeddings ({limit})")


def default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | torch.device | None, flag: str = "device") -> torch.device | None:
    """DEVICE as a torch.device this machine has (None stays None: each backend's default). A misspelt device,
    a type vexport does not run on, or a CUDA device this machine lacks is one InputError naming FLAG and the
    devices available here; the CLI's --device and ``load(device=...)`` both come through here."""
    if device is None:
        return None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ", ".join(["cpu", *(["cuda"] if gpus else []), *(f"cuda:{i}" for i in range(gpus))])
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{flag} {str(device)[:50]!r} is not a device (available here: {available})") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {str(device)[:50]!r}: vexport runs on cpu or cuda (available here: {available})")
    if parsed.type == "cuda" and (parsed.index or 0) >= gpus:
        have = f"{gpus} CUDA GPU{'s' if gpus != 1 else ''}" if gpus else "no CUDA GPU (or no CUDA build of torch)"
        raise InputError(f"{flag} {str(device)[:50]}: this machine has {have} (available here: {available})")
    return parsed


def load(model: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         *, allow_pickle: bool = False, threads: int | None = None, verify_hashes: bool = True,
         cpu_kernels: str = "onednn", cpu_prefill: str = "int4") -> ValueModel:
    """Load an exported artifact (by its manifest) or a Hugging Face value model (the torch reference).

    The reference is float16 on CUDA and float32 on CPU unless ``dtype`` says otherwise. On CPU in float32 its
    decoder Linears run on oneDNN-packed weights (``backends/cpu_linear.py``: same math, faster than MKL's
    sgemm on AMD CPUs and at few tokens) and masked GQA attention keeps its KV heads unrepeated
    (``backends/cpu_attention.py``); ``cpu_kernels="torch"`` keeps plain transformers. An artifact's files
    are checked against its manifest first: sizes always, sha256 hashes unless ``verify_hashes=False`` (for
    very large local files you trust; hashing reads every byte, about 1 minute for 26 GB).

    A GPTQ folder runs its activations in ``dtype`` too (float32 on CPU unless given; ``"bfloat16"`` skips a
    cast around every int4 matmul, whose CPU kernel computes in bfloat16 anyway). ``cpu_prefill="bfloat16"``
    keeps a bfloat16 copy of each int4 Linear for calls of 8 rows or more (prefills; about twice the int4
    op's speed there, 2 more bytes per weight in memory); fewer rows keep the int4 op (``backends/int4_cpu.py``).
    """
    device = check_device(device)
    path = Path(model).expanduser()
    if cpu_prefill not in ("int4", "bfloat16"):  # backends/gptq.py PREFILL_WEIGHTS (imported only for a GPTQ folder)
        raise InputError(f"cpu_prefill {cpu_prefill!r} is not one of int4, bfloat16")
    if is_artifact(path):
        return _load_artifact(path, device, threads, verify_hashes, _torch_dtype(dtype), cpu_prefill)
    if cpu_kernels not in ("onednn", "torch"):
        raise InputError(f"cpu_kernels {cpu_kernels!r} is not one of onednn, torch")
    return _load_reference(model, device, dtype, allow_pickle, cpu_kernels)


def _load_reference(model, device, dtype, allow_pickle: bool, cpu_kernels: str = "onednn") -> ValueModel:
    from vexport.backends.cpu_attention import use_gqa_attention
    from vexport.backends.cpu_linear import pack_linears
    from vexport.backends.torch import TorchRunner
    from vexport.model import open_model

    source = open_model(model, allow_pickle=allow_pickle)
    device = default_device(device)
    dtype = _torch_dtype(dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    module = source.load_torch(dtype=dtype, device=str(device))
    if cpu_kernels == "onednn" and device.type == "cpu":
        pack_linears(module)
        use_gqa_attention(module)
    return ValueModel(TorchRunner(module), source.config, source.path)


def _load_artifact(path: Path, device, threads: int | None, verify_hashes: bool = True,
                   dtype: torch.dtype | None = None, cpu_prefill: str = "int4") -> ValueModel:
    from transformers import AutoConfig

    manifest = read_manifest(path)
    check_files(path, manifest, verify_hashes)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if manifest.format == "onnx":
        from vexport.backends.onnxrt import OnnxRuntimeRunner
        from vexport.safety import inside

        graph = inside(path, str(manifest.format_options.get("graph", "")), f"{MANIFEST_NAME} format_options.graph")
        runner = OnnxRuntimeRunner(graph, device=device and str(device), threads=threads)
    elif manifest.format == "gptq":
        from vexport.backends.gptq import GPTQRunner

        runner = GPTQRunner(path, device=device, dtype=dtype, prefill=cpu_prefill)
    elif manifest.format == "tensorrt":
        from vexport.backends.tensorrt import TensorRTRunner

        runner = TensorRTRunner(path, manifest, device=device)
    else:
        raise ManifestError(f"{path / MANIFEST_NAME} has format {manifest.format!r}, which this vexport cannot load")
    return ValueModel(runner, config, path, manifest)


def check_files(path: Path, manifest: Manifest, verify_hashes: bool = True, progress: bool = False) -> None:
    """The folder must hold exactly what the manifest lists: every listed file inside PATH (symlinks followed)
    with its recorded size, and its sha256 unless ``verify_hashes`` is False; no weight file unlisted; the files
    of the format it names (an ONNX graph with the inputs and outputs it records, an engine, GPTQ weights)."""
    from vexport.progress import progress_bar
    from vexport.safety import HASH_LOG_BYTES, check_entries, inside, is_weight_file, verify_file

    check_entries(path)
    files = {name: inside(path, name, MANIFEST_NAME) for name in manifest.files}
    for key in ("graph", "engine"):  # the file a backend opens must be one of the listed (and so verified) files
        name = manifest.format_options.get(key)
        if name is not None and (not isinstance(name, str) or name not in manifest.files):
            raise ManifestError(f"{path / MANIFEST_NAME}: format_options.{key} {str(name)[:100]!r} is not a file "
                                "the manifest lists")
    check_format_files(path, manifest)
    unlisted = sorted(name for name in os.listdir(path) if is_weight_file(name) and name not in manifest.files)
    if unlisted:
        raise ManifestError(f"{path / unlisted[0]} is a weight file that {path / MANIFEST_NAME} does not list: "
                            "the folder does not match its manifest")
    total = sum(entry["size"] for entry in manifest.files.values())
    bar = progress and verify_hashes and total >= HASH_LOG_BYTES  # a bar for hashing that takes a while
    with progress_bar("verifying artifact files", total, bar) as advance:
        for name, file in files.items():
            verify_file(file, manifest.files[name], verify_hashes, advance)
    if manifest.format == "onnx":  # its external-data locations are files the folder refers to too; its inputs
        from vexport.backends.onnxrt import check_external_data  # and outputs are those the manifest records

        check_external_data(inside(path, str(manifest.format_options.get("graph", "")), MANIFEST_NAME), manifest)


def _torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[str(dtype)]
    except KeyError:
        raise InputError(f"dtype {dtype!r} is not one of float32, float16, bfloat16") from None
