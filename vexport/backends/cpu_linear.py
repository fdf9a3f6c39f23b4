"""oneDNN-packed Linears for the torch reference on CPU: the same float32 matmul, from a faster library.

PyTorch's CPU ``F.linear`` calls MKL's sgemm, which is slow on AMD CPUs and at the few-token shapes of
incremental scoring. oneDNN (bundled with PyTorch, what ``torch.compile``'s CPU freezing uses) runs the same
float32 product from a weight reordered once into its blocked layout; the results differ from ``F.linear`` by
float32 rounding only. ``scripts/bench_cpu_linear.py`` measures both side by side (README: Performance).

``pack_linears`` swaps every ``nn.Linear`` of the decoder layers for a ``PackedLinear`` in place; the score head
stays as it is. ``vexport.load(..., cpu_kernels="torch")`` keeps plain ``F.linear`` (the reference this is
tested against).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BATCH_HINT = 1024  # oneDNN picks its blocked layout for this many rows (64 and 1024 were the fastest hints tried)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward over a oneDNN-reordered float32 weight (the plain weight is not kept)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The plain ``[out, in]`` weight, reordered back (a copy: for inspection, not for speed)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain torch computation this replaces."""
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module) -> int:
    """Replace the float32 CPU ``nn.Linear`` modules of MODULE's decoder layers by ``PackedLinear``; returns how
    many were replaced (0 when oneDNN is missing or the weights are not float32 on CPU)."""
    if not available():
        return 0
    layers = getattr(getattr(module, module.base_model_prefix, module), "layers", None)
    if layers is None:
        return 0
    count = 0
    with torch.no_grad():
        for layer in layers:
            for name, child in list(layer.named_modules()):
                weight = getattr(child, "weight", None)
                if type(child) is nn.Linear and weight.dtype == torch.float32 and weight.device.type == "cpu":
                    parent_name, _, attr = name.rpartition(".")
                    setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, PackedLinear(child))
                    count += 1
    log.info("packed %d decoder Linears for oneDNN", count)
    return count
