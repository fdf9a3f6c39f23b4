"""TensorRT backend: one engine, one execution context, run on torch CUDA tensors on the current torch stream.

Inputs and the output are torch CUDA tensors whose addresses are bound to the engine's I/O tensors
(``set_input_shape`` + ``set_tensor_address``), and ``execute_async_v3`` is enqueued on torch's current stream:
no host copies, and torch's later work on that stream is ordered after the engine's.
An engine is tied to the GPU and the TensorRT version it was built with: a mismatch is refused before
deserialization, with the rebuild command in the message.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vexport.backends.base import Runner
from vexport.errors import ManifestError, MissingDependencyError, VexportError
from vexport.manifest import Manifest

log = logging.getLogger(__name__)

_IO = ("input_ids", "attention_mask", "logits")


def engine_mismatch(recorded: dict, current: dict) -> str | None:
    """Why an engine built on RECORDED (gpu, compute_capability, tensorrt_version) cannot run on CURRENT."""
    problems = []
    if recorded.get("tensorrt_version") != current.get("tensorrt_version"):
        problems.append(f"TensorRT {recorded.get('tensorrt_version')} (this machine has "
                        f"{current.get('tensorrt_version')})")
    if (recorded.get("gpu"), recorded.get("compute_capability")) != (current.get("gpu"),
                                                                    current.get("compute_capability")):
        problems.append(f"{recorded.get('gpu')} (sm {recorded.get('compute_capability')}; this machine has "
                        f"{current.get('gpu')}, sm {current.get('compute_capability')})")
    if not problems:
        return None
    return "the engine was built for " + " and ".join(problems) + ": rebuild it here with vexport export ... --format tensorrt"


class TensorRTRunner(Runner):
    """logits(input_ids, attention_mask) -> float32 [B, T, 1] on the engine's GPU."""

    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest, device: str | torch.device | None = None):
        from vexport.backends.tensorrt_env import gpu_identity, require_tensorrt

        trt = require_tensorrt()
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise MissingDependencyError(f"a TensorRT engine runs only on a CUDA device, not {self.device}")
        why = engine_mismatch(manifest.format_options, gpu_identity(self.device.index or 0))
        if why:
            raise ManifestError(f"{folder}: {why}")
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine((folder / manifest.format_options["engine"]).read_bytes())
            if self.engine is None:
                raise ManifestError(f"{folder}: TensorRT could not deserialize {manifest.format_options['engine']}")
            self.context = self.engine.create_execution_context()
        names = sorted(self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))
        if names != sorted(_IO):
            raise ManifestError(f"{folder}: the engine's tensors are {names}, expected {sorted(_IO)}")
        self.profile = manifest.format_options.get("profile")
        log.info("TensorRT engine on %s", self.device)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device, torch.int64).contiguous()
        mask = attention_mask.to(self.device, torch.int64).contiguous()
        out = torch.empty((*ids.shape, 1), dtype=torch.float32, device=self.device)
        for name, tensor in (("input_ids", ids), ("attention_mask", mask)):
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise VexportError(f"{name} shape {tuple(tensor.shape)} is outside the engine's optimization "
                                   f"profile {self.profile}: rebuild with other --min-shape/--max-shape")
        for name, tensor in (("input_ids", ids), ("attention_mask", mask), ("logits", out)):
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise VexportError("TensorRT execute_async_v3 failed (see the log above)")
        return out
