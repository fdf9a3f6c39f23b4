"""``x @ W^T`` with W held as GPTQ v1 int4 (or int8) tensors, dequantized inside the matmul (Triton).

Each program computes a [BLOCK_M, BLOCK_N] tile of the output. For every BLOCK_K slice of the input
dimension it reads the int32 words of ``qweight`` [I/p, O] (p = 32 / BITS codes per word: 8 at 4 bits, 4 at
8 bits), unpacks one code per input row, looks up the row's group through ``g_idx`` (so act-order needs
nothing special), reads that group's scale and packed zero (v1: stored ``zero - 1``, restored by adding a 1 in
every field, 0x11111111 at 4 bits or 0x01010101 at 8, to the whole word), dequantizes in float32, casts to
x's dtype and accumulates ``tl.dot`` in float32. ``BITS`` is a compile-time constant: a mixed checkpoint's 4-
and 8-bit Linears run two specializations of the one kernel. The plain torch reference is ``kernels/reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from vexport.errors import InputError, MissingDependencyError

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BITS = (4, 8)


def _v1_zero_offset(bits: int) -> int:
    return sum(1 << (bits * j) for j in range(32 // bits))


@triton.jit
def _round_to_bf16(v):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32 (finite inputs)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk,
    HAS_BIAS: tl.constexpr, X_FP32: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    zero_shift = ((offs_n % PER_WORD) * BITS).to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        mask_kn = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask_kn, other=0)
        q = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & MASK
        group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0)
        zero_words = tl.load(qzeros_ptr + group[:, None] * (N // PER_WORD) + (offs_n // PER_WORD)[None, :],
                             mask=mask_kn, other=0)
        zero_words = zero_words.to(tl.int64) + ZERO_OFFSET  # whole-word add; bits above 31 never read
        zero = ((zero_words >> zero_shift) & MASK).to(tl.int32)
        w = (q - zero).to(tl.float32) * scale.to(tl.float32)
        if EMULATE_BF16:  # bf16 x bf16 products are exact in fp32: the same sums as a bf16 dot
            acc = tl.dot(x.to(tl.float32), _round_to_bf16(w), acc, input_precision="ieee")
        elif X_FP32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EMULATE_BF16:
        acc = _round_to_bf16(acc)
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def int4_matmul(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bias: Tensor | None = None,
    *,
    bits: int = 4,
) -> Tensor:
    """``x`` [M, I] (fp16/bf16/fp32, any strides) times the GPTQ v1 ``bits``-bit weight [O, I] (4 or 8),
    transposed, plus ``bias`` [O]: returns [M, O] in x's dtype. ``g_idx`` values are trusted (not range-checked
    here; ``vexport.quant.pack.unpack_gptq_v1`` checks them)."""
    if bits not in _BITS:
        raise InputError(f"int4_matmul: bits must be 4 or 8, got {bits!r}")
    _check_inputs(x, qweight, qzeros, scales, g_idx, bias, 32 // bits)
    if not x.is_cuda and isinstance(_int4_matmul_kernel, JITFunction):
        raise MissingDependencyError("int4_matmul: CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k = _block_sizes(m, x.is_cuda)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](
        x, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous(),
        bias.contiguous() if bias is not None else out, out,
        m, n, k, x.stride(0), x.stride(1),
        HAS_BIAS=bias is not None, X_FP32=x.dtype == torch.float32, EMULATE_BF16=_emulate_bf16(x),
        BITS=bits, ZERO_OFFSET=_v1_zero_offset(bits), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def _emulate_bf16(x: Tensor) -> bool:
    """Under the Triton interpreter (CPU tensors) bfloat16 is emulated in float32: the interpreter multiplies
    bfloat16 bit patterns in tl.dot (triton-lang/triton#11584) and its float32 -> bfloat16 cast truncates."""
    return x.dtype == torch.bfloat16 and not x.is_cuda


def _block_sizes(m: int, on_gpu: bool) -> tuple[int, int, int]:
    """Small tiles under the CPU interpreter (speed); on a GPU, BLOCK_M grows with M (tl.dot needs >= 16)."""
    if not on_gpu:
        return 16, 32, 32
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return block_m, 64, 64


def _check_inputs(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bias: Tensor | None, per_word: int
) -> None:
    if x.dim() != 2 or x.dtype not in _X_DTYPES:
        raise InputError(f"int4_matmul: x must be 2-D float16/bfloat16/float32, got {x.dtype} {tuple(x.shape)}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise InputError(f"int4_matmul: {name} must be int32, got {t.dtype}")
    if qweight.dim() != 2 or x.shape[1] != qweight.shape[0] * per_word:
        raise InputError(f"int4_matmul: x {tuple(x.shape)} does not match qweight [I/{per_word}, O] "
                         f"{tuple(qweight.shape)}")
    n = qweight.shape[1]
    if n % per_word or scales.dim() != 2 or scales.shape[1] != n or scales.dtype not in _SCALE_DTYPES:
        raise InputError(f"int4_matmul: scales must be float [G, {n}] with {n} divisible by {per_word}")
    if tuple(qzeros.shape) != (scales.shape[0], n // per_word) or tuple(g_idx.shape) != (x.shape[1],):
        raise InputError(f"int4_matmul: qzeros must be [G, {n // per_word}] and g_idx [{x.shape[1]}]")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise InputError(f"int4_matmul: bias must be a float tensor [{n}]")
    tensors = [x, qweight, qzeros, scales, g_idx] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise InputError("int4_matmul: all tensors must be on the same device")
