"""Plain torch references for the Triton kernels in this package."""

from __future__ import annotations

import torch
from torch import Tensor

from vexport.quant.pack import dequantize_gptq_v1


def int4_matmul_reference(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """``x @ W^T (+ bias)`` with W dequantized from the GPTQ v1 tensors, as the kernel defines it: W is
    rounded to x's dtype (what the kernel feeds its dot product), products are summed in float32 and the
    result is cast to x's dtype once."""
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    weight = dequantize_gptq_v1(tensors, dtype=x.dtype).to(torch.float32)
    out = x.to(torch.float32) @ weight.T
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)
