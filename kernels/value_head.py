"""The value head fused: Llama's final RMSNorm and the one-column score ``Linear`` in one read of the hidden states.

Per token ``x`` (a row of the pre-norm hidden states, fp16/bf16/fp32) the kernel computes, in the order of
Hugging Face's ``LlamaRMSNorm`` followed by ``nn.Linear(hidden, 1)``::

    r     = 1 / sqrt(mean(float32(x)^2) + eps)           # float32, as LlamaRMSNorm
    n     = cast_to_x_dtype(float32(x) * r)              # "cast back to the input dtype before the weight"
    y     = cast_to_p_dtype(norm_weight * n)             # the weight multiply, rounded as torch rounds it
    value = sum_float32(y * score_weight) + score_bias   # float32 accumulation, float32 output

``p_dtype`` is ``torch.promote_types(x.dtype, norm_weight.dtype)`` (what ``self.weight * hidden`` gives).
Every rounding Hugging Face does is reproduced except the last one: the score ``Linear`` runs in the
model dtype, so HF rounds the value (and adds the bias) in fp16/bf16; the kernel keeps float32. The
remaining differences are that rounding (half an ulp of the dtype at the value's magnitude), float32
summation order, and ``r``: the kernel rounds ``1 / sqrt`` correctly while torch's CUDA ``rsqrt`` is
approximate (one ulp of ``r`` can move ``n`` by one ulp of the dtype in a few elements).
``kernels/reference.py`` (``value_head_reference``) is the Hugging Face path itself;
``tests/test_value_head.py`` holds the per-dtype tolerance table.

Each program takes ``BLOCK_T`` tokens. When the hidden size fits one ``BLOCK_H`` chunk (hidden <= 16384 on
the GPU) a row is loaded once and kept in registers: the sum of squares and the dot product come out of
that one read. Wider rows are read in chunks twice (sum of squares, then the dot; the second read is
mostly served from L2). ``index`` picks rows (e.g. the last real token of each sequence), so only
those are read at all. Under the Triton interpreter (CPU tensors) bfloat16 rounding is emulated in float32,
because the interpreter's float32 -> bfloat16 cast truncates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from vexport.errors import InputError, MissingDependencyError

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SINGLE_PASS = 16384  # widest hidden size read once, whole rows in registers (GPU)
_ROUND_NONE, _ROUND_FP16, _ROUND_BF16, _ROUND_BF16_EMULATED = 0, 1, 2, 3


@triton.jit
def _round_to_bf16(v):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32 (finite inputs)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(v, MODE: tl.constexpr):
    """float32 ``v`` rounded to the dtype MODE names (nearest, ties to even), returned as float32."""
    if MODE == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif MODE == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif MODE == 3:
        v = _round_to_bf16(v)
    return v


@triton.jit
def _head_terms(x, r, cols, mask_h, norm_w_ptr, score_w_ptr, X_ROUND: tl.constexpr, P_ROUND: tl.constexpr):
    """Per-element products ``y * score_weight`` in float32 for a [BLOCK_T, BLOCK_H] chunk of rows."""
    n = _round_to(x * r[:, None], X_ROUND)
    w_norm = tl.load(norm_w_ptr + cols, mask=mask_h, other=0.0).to(tl.float32)
    w_score = tl.load(score_w_ptr + cols, mask=mask_h, other=0.0).to(tl.float32)
    y = _round_to(n * w_norm[None, :], P_ROUND)
    return y * w_score[None, :]


@triton.jit
def _value_head_kernel(
    x_ptr, index_ptr, norm_w_ptr, score_w_ptr, bias_ptr, out_ptr,
    n_rows, hidden, seq_len, stride_b, stride_t, stride_h, eps,
    HAS_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr, X_ROUND: tl.constexpr, P_ROUND: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = rows < n_rows
    token = rows.to(tl.int64)
    if HAS_INDEX:
        token = tl.load(index_ptr + rows, mask=mask_t, other=0).to(tl.int64)
    row_ptr = x_ptr + (token // seq_len) * stride_b + (token % seq_len) * stride_t
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_H)
        mask_h = cols < hidden
        x = tl.load(row_ptr[:, None] + cols[None, :] * stride_h, mask=mask_t[:, None] & mask_h[None, :], other=0.0)
        x = x.to(tl.float32)
        r = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=1) / hidden + eps))
        acc = tl.sum(_head_terms(x, r, cols, mask_h, norm_w_ptr, score_w_ptr, X_ROUND, P_ROUND), axis=1)
    else:
        squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = mask_t[:, None] & (cols < hidden)[None, :]
            x = tl.load(row_ptr[:, None] + cols[None, :] * stride_h, mask=mask, other=0.0).to(tl.float32)
            squares += tl.sum(x * x, axis=1)
        r = tl.div_rn(1.0, tl.sqrt_rn(squares / hidden + eps))
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask_h = cols < hidden
            x = tl.load(row_ptr[:, None] + cols[None, :] * stride_h, mask=mask_t[:, None] & mask_h[None, :], other=0.0)
            acc += tl.sum(_head_terms(x.to(tl.float32), r, cols, mask_h, norm_w_ptr, score_w_ptr, X_ROUND, P_ROUND),
                          axis=1)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr).to(tl.float32)
    tl.store(out_ptr + rows, acc, mask=mask_t)


def value_head(
    hidden: Tensor,
    norm_weight: Tensor,
    score_weight: Tensor,
    score_bias: Tensor | None = None,
    eps: float = 1e-6,
    index: Tensor | None = None,
    *,
    block_hidden: int | None = None,
) -> Tensor:
    """Values (float32) of the pre-norm ``hidden`` states [N, H] or [B, T, H] (any strides): RMSNorm with
    ``norm_weight`` [H] and ``eps``, then the score Linear (``score_weight`` [1, H] or [H], ``score_bias``
    [1] or None). Returns ``hidden.shape[:-1]``, or [K] for ``index`` (K integer positions into the
    flattened tokens, ``b * T + t``; trusted, not range-checked: a check would synchronise with the host).
    ``block_hidden`` forces the chunk width (tuning and tests; rows wider than it are read in chunks)."""
    _check_inputs(hidden, norm_weight, score_weight, score_bias, index)
    if not hidden.is_cuda and isinstance(_value_head_kernel, JITFunction):
        raise MissingDependencyError("value_head: CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    size = hidden.shape[-1]
    x = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    n_rows = index.numel() if index is not None else x.shape[0] * x.shape[1]
    out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return out.reshape(index.shape if index is not None else hidden.shape[:-1])
    block_t, block_h, warps = _block_sizes(size, hidden.is_cuda, block_hidden)
    p_dtype = torch.promote_types(hidden.dtype, norm_weight.dtype)
    _value_head_kernel[(triton.cdiv(n_rows, block_t),)](
        x, index.contiguous() if index is not None else out, norm_weight.contiguous(),
        score_weight.reshape(-1).contiguous(), score_bias if score_bias is not None else out, out,
        n_rows, size, x.shape[1], x.stride(0), x.stride(1), x.stride(2), float(eps),
        HAS_INDEX=index is not None, HAS_BIAS=score_bias is not None,
        X_ROUND=_round_mode(hidden.dtype, hidden.is_cuda), P_ROUND=_round_mode(p_dtype, hidden.is_cuda),
        ONE_CHUNK=size <= block_h, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    return out.reshape(index.shape if index is not None else hidden.shape[:-1])


def _round_mode(dtype: torch.dtype, on_gpu: bool) -> int:
    """How the kernel rounds to ``dtype``: bfloat16 is emulated under the interpreter (its cast truncates)."""
    if dtype == torch.float16:
        return _ROUND_FP16
    if dtype == torch.bfloat16:
        return _ROUND_BF16 if on_gpu else _ROUND_BF16_EMULATED
    return _ROUND_NONE


def _block_sizes(size: int, on_gpu: bool, block_hidden: int | None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps). Whole rows when they fit; about 2K elements a program on the GPU (one
    row of a 13B model, 8 warps), larger tiles under the CPU interpreter where each program costs overhead."""
    whole = triton.next_power_of_2(size)
    block_h = block_hidden or (whole if size <= MAX_SINGLE_PASS else 1024)
    if not on_gpu:
        return max(1, min(64, 2**19 // block_h)), block_h, 4
    block_t = max(1, 2048 // block_h)
    return block_t, block_h, 8 if block_h >= 4096 else 4


def _check_inputs(hidden: Tensor, norm_weight: Tensor, score_weight: Tensor, score_bias: Tensor | None,
                  index: Tensor | None) -> None:
    if hidden.dim() not in (2, 3) or hidden.dtype not in _DTYPES:
        raise InputError(f"value_head: hidden must be [N, H] or [B, T, H] float16/bfloat16/float32, got "
                         f"{hidden.dtype} {tuple(hidden.shape)}")
    size = hidden.shape[-1]
    if size == 0:
        raise InputError("value_head: hidden size must be at least 1")
    if tuple(norm_weight.shape) != (size,) or norm_weight.dtype not in _DTYPES:
        raise InputError(f"value_head: norm_weight must be a float tensor [{size}], got {tuple(norm_weight.shape)}")
    if score_weight.numel() != size or score_weight.dim() not in (1, 2) or not score_weight.is_floating_point():
        raise InputError(f"value_head: score_weight must be [1, {size}] (one label), got {tuple(score_weight.shape)}")
    if score_bias is not None and (score_bias.numel() != 1 or not score_bias.is_floating_point()):
        raise InputError(f"value_head: score_bias must be a float tensor [1], got {tuple(score_bias.shape)}")
    if index is not None and (index.dim() != 1 or index.dtype not in (torch.int32, torch.int64)):
        raise InputError(f"value_head: index must be a 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}")
    tensors = [hidden, norm_weight, score_weight] + [t for t in (score_bias, index) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise InputError("value_head: all tensors must be on the same device")
