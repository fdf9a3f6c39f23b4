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
    *,
    bits: int = 4,
) -> Tensor:
    """``x @ W^T (+ bias)`` with W dequantized from the GPTQ v1 ``bits``-bit tensors, as the kernel defines it:
    W is rounded to x's dtype (what the kernel feeds its dot product), products are summed in float32 and the
    result is cast to x's dtype once."""
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    weight = dequantize_gptq_v1(tensors, dtype=x.dtype, bits=bits).to(torch.float32)
    out = x.to(torch.float32) @ weight.T
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def value_head_reference(
    hidden: Tensor,
    norm_weight: Tensor,
    score_weight: Tensor,
    score_bias: Tensor | None = None,
    eps: float = 1e-6,
    index: Tensor | None = None,
    linear_dtype: torch.dtype | None = None,
) -> Tensor:
    """Hugging Face's value head, op for op: ``LlamaRMSNorm`` (inverse RMS in float32, cast back to the input
    dtype before the weight multiply) then the score ``Linear`` with its bias, in the model dtype; the
    values are returned as float32 ([N] / [B, T], or [K] for ``index`` into the flattened tokens).
    ``linear_dtype=torch.float32`` runs only the score Linear in float32 on the same normed states, which
    is the fused kernel's definition (HF rounds the value to the model dtype; the kernel does not)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if index is not None:
        rows = rows[index.long()]
    input_dtype = rows.dtype
    x = rows.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    normed = norm_weight * (x * torch.rsqrt(variance + eps)).to(input_dtype)
    weight = score_weight.reshape(1, -1)
    bias = score_bias.reshape(1) if score_bias is not None else None
    dtype = linear_dtype or normed.dtype
    values = torch.nn.functional.linear(normed.to(dtype), weight.to(dtype),
                                        bias.to(dtype) if bias is not None else None)[:, 0].float()
    return values if index is not None else values.reshape(hidden.shape[:-1])
