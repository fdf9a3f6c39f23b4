"""ONNX Runtime backend: CUDA provider with I/O binding on torch CUDA tensors when possible, CPU otherwise."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from vexport.backends.base import Runner
from vexport.errors import CorruptFileError, ManifestError, MissingDependencyError
from vexport.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

GPU_INSTALL = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
_RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


@functools.cache
def warn_if_two_runtimes() -> None:
    """Once per process: onnxruntime and onnxruntime-gpu both installed share one `onnxruntime` package folder,
    so whichever was installed last wins, file by file; the result may lack the CUDA provider or not load."""
    from importlib.metadata import PackageNotFoundError, distribution

    found = []
    for name in _RUNTIME_DISTRIBUTIONS:
        try:
            found.append(f"{name} {distribution(name).version}")
        except PackageNotFoundError:
            pass
    if len(found) > 1:
        log.warning("both %s are installed; they conflict (one package folder, two builds). Keep one: %s",
                    " and ".join(found), GPU_INSTALL)


class OnnxRuntimeRunner(Runner):
    """One InferenceSession over an exported graph; logits [B, T, 1] float32 as a torch tensor."""

    name = "onnxruntime"

    def __init__(self, graph: Path, device: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        warn_if_two_runtimes()
        self.device = torch.device(device or ("cuda" if _cuda_provider_usable() else "cpu"))
        if self.device.type == "cuda" and not _cuda_provider_usable():
            raise MissingDependencyError(
                "device cuda needs onnxruntime-gpu with the CUDA provider and a CUDA GPU "
                f"(providers here: {', '.join(ort.get_available_providers())}); {GPU_INSTALL}"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT fuses blocked int4 DequantizeLinear + MatMul (the TensorRT-bound graph) into MatMulNBits with
        # int8 activations by default (accuracy level 4); level 1 keeps float32 compute, the graph's own numerics
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if threads:
            options.intra_op_num_threads = threads
        check_external_data(graph)
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=self._providers())
        except Exception as exc:  # ORT raises its own pybind types (Fail, InvalidGraph, ...): one line for the user
            raise CorruptFileError(f"{graph}: ONNX Runtime cannot load it "
                                   f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
        log.info("ONNX Runtime session on %s (%s)", self.device, self.session.get_providers()[0])

    def _providers(self) -> list:
        if self.device.type == "cuda":
            return [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._run_cuda(input_ids, attention_mask)
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False)}
        (logits,) = self.session.run(["logits"], feeds)
        return torch.from_numpy(logits)

    def _run_cuda(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """I/O binding: inputs and output stay on the GPU as torch tensors, no host copies."""
        ids = input_ids.to(self.device, torch.int64).contiguous()
        mask = attention_mask.to(self.device, torch.int64).contiguous()
        out = torch.empty((*ids.shape, 1), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, tensor in (("input_ids", ids), ("attention_mask", mask)):
            binding.bind_input(name, "cuda", index, np.int64, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("logits", "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return out


FEEDS = ("input_ids", "attention_mask")  # what OnnxRuntimeRunner feeds, and the one output it reads
FETCH = "logits"


def check_external_data(graph: Path, manifest=None) -> None:
    """Every external-data location of GRAPH (subgraphs included) must resolve inside its folder; the graph is
    parsed without its external data, so nothing the locations name is opened. With MANIFEST, the graph's inputs
    and outputs must also be those it records and the runner feeds (``check_signature``)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    from vexport.safety import inside

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CorruptFileError(f"{graph} is not a readable ONNX model ({type(exc).__name__})") from None
    if manifest is not None:
        check_signature(model.graph, graph, manifest)
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        inside(graph.parent, location, f"{graph.name} (external data of {tensor.name})")


def check_signature(proto, graph: Path, manifest) -> None:
    """The graph's (a GraphProto's) inputs and outputs must be those MANIFEST records and the runner feeds:
    names, element types, ranks. A foreign graph in the artifact's place is one ManifestError naming GRAPH and
    what it lacks, before ONNX Runtime ever sees a feed."""
    recorded = {io["name"]: io.get("dtype") for io in [*manifest.inputs, *manifest.outputs]}
    initializers = {t.name for t in proto.initializer}  # IR < 4 lists initializers among the inputs
    inputs = {i.name: i for i in proto.input if i.name not in initializers}
    outputs = {o.name: o for o in proto.output}
    problems = []
    lacks = [name for name in dict.fromkeys([*FEEDS, *(io["name"] for io in manifest.inputs)]) if name not in inputs]
    if lacks:
        problems.append(f"lacks input{'s' if len(lacks) > 1 else ''} {', '.join(lacks)} "
                        f"(its inputs: {', '.join(list(inputs)[:5]) or 'none'})")
    extra = [name for name in inputs if name not in FEEDS]
    if extra and not lacks:
        problems.append(f"has input{'s' if len(extra) > 1 else ''} {', '.join(extra[:5])} that vexport does not feed")
    if FETCH not in outputs:
        problems.append(f"lacks output {FETCH} (its outputs: {', '.join(list(outputs)[:5]) or 'none'})")
    expected = [(name, inputs.get(name), "int64", 2) for name in FEEDS] + [(FETCH, outputs.get(FETCH), "float32", 3)]
    for name, info, default, rank in expected:
        if info is None:
            continue
        dtype, dims = _tensor_type(info)
        want = recorded.get(name) or default
        if dtype != want or (dims is not None and dims != rank):
            problems.append(f"has {name} as {dtype} of rank {dims} ({want} of rank {rank} expected)")
    if problems:
        raise ManifestError(f"{graph}: the graph {'; '.join(problems)}: not the graph {MANIFEST_NAME} describes")


def _tensor_type(info) -> tuple[str, int | None]:
    """(numpy dtype name, rank or None when the graph leaves it open) of a ValueInfoProto."""
    import onnx

    kind = info.type.tensor_type
    try:
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type))
    except (KeyError, ValueError, TypeError):
        dtype = f"element type {kind.elem_type}"
    return dtype, (len(kind.shape.dim) if kind.HasField("shape") else None)


def _cuda_provider_usable() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
