"""ONNX Runtime backend: CUDA provider with I/O binding on torch CUDA tensors when possible, CPU otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vexport.errors import MissingDependencyError

log = logging.getLogger(__name__)


class OnnxRuntimeRunner:
    """One InferenceSession over an exported graph; logits [B, T, 1] float32 as a torch tensor."""

    name = "onnxruntime"

    def __init__(self, graph: Path, device: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.device = torch.device(device or ("cuda" if _cuda_provider_usable() else "cpu"))
        if self.device.type == "cuda" and not _cuda_provider_usable():
            raise MissingDependencyError(
                "device cuda needs onnxruntime-gpu with the CUDA provider and a CUDA GPU "
                f"(providers here: {', '.join(ort.get_available_providers())}); pip install 'vexport[gpu]'"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        providers = self._providers()
        self.session = ort.InferenceSession(str(graph), options, providers=providers)
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


def _cuda_provider_usable() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
