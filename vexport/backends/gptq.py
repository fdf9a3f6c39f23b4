"""The int4 torch backend: a GPTQ v1 checkpoint run with its Linears kept packed on the device.

The model is built on the meta device from config.json, so no float copy of the whole model is ever made;
every tensor is then read from its shard and assigned in place (float tensors in the runtime dtype: float16
on CUDA, float32 on CPU). Each decoder Linear is a ``QuantLinear`` holding ``qweight``, ``qzeros``,
``scales`` and ``g_idx`` as stored, at the bits its checkpoint gives it: a mixed checkpoint's
``quantization_config.dynamic`` (quant/dynamic.py) sets bits per module (4 or 8), and a Linear it skips stays a
plain ``nn.Linear`` with the checkpoint's float16 ``.weight``.

``QuantLinear.forward`` has three paths:
- on CPU, PyTorch's packed int4 matmul (``vexport.backends.int4_cpu``: bfloat16 compute, the weights repacked
  once at load by ``pack_for_cpu``), for every 4-bit Linear whose shapes and groups the op takes; the others
  (8-bit ones included) keep the dequantized path, with the reason logged.
- dequantize (``dequantize_packed``: the same numbers as ``vexport.quant.pack.dequantize_gptq_v1``, the
  plain reference of the format, without its checks and int64 temporaries), then one matmul in the
  activation dtype. The plain reference of the two fast paths; used on CPU where the packed op cannot
  run, and on CUDA above ``TRITON_MAX_TOKENS`` rows, where one cuBLAS GEMM
  on the dequantized weight beats the fused kernel (the dequantization is amortised over many rows).
- the fused Triton dequant-matmul (``vexport.kernels.int4_matmul``, 4 or 8 bits) on CUDA for up to
  ``TRITON_MAX_TOKENS`` rows (decoding, short prompts), where reading the packed weights is what bounds the time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os

import torch
from torch import Tensor, nn

from vexport.backends import int4_cpu
from vexport.backends.base import ModuleRunner
from vexport.errors import InputError, VexportError
from vexport.quant.checkpoint import QUANTIZED_LINEARS, gptq_options, module_quant
from vexport.quant.pack import bits_of, per_word, unpack_codes

log = logging.getLogger(__name__)

TRITON_MAX_TOKENS = 64  # rows (batch x tokens) up to which CUDA uses the fused Triton kernel
PREFILL_WEIGHTS = ("int4", "bfloat16")  # what CPU prefills multiply: the int4 op, or bfloat16 copies (int4_cpu)


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W held as GPTQ v1 4- or 8-bit tensors (buffers, so ``.to(device)`` moves them)."""

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, bits: int = 4):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        width = per_word(bits)
        self.register_buffer("qweight", torch.empty(in_features // width, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // width, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.cpu_int4: int4_cpu.PackedInt4 | None = None  # set by pack_for_cpu; not part of the state dict

    @classmethod
    def from_packed(cls, packed: dict[str, Tensor], bias: Tensor | None = None) -> "QuantLinear":
        """A QuantLinear over the four GPTQ v1 tensors of one Linear (e.g. ``pack_gptq_v1``'s output); its bits
        follow from qweight's rows per g_idx entry."""
        in_features, out_features = packed["g_idx"].shape[0], packed["qweight"].shape[1]
        bits = bits_of(packed["qweight"].shape[0], in_features)
        if bits is None:
            raise InputError(f"qweight {tuple(packed['qweight'].shape)} packs no supported width for "
                             f"{in_features} inputs")
        dtype = bias.dtype if bias is not None else torch.float32
        module = cls(in_features, out_features, packed["scales"].shape[0], bias is not None, dtype, "meta", bits)
        state = {**packed, **({"bias": bias} if bias is not None else {})}
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def packed(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight [O, I] in ``dtype`` (computed in float32, as the format defines it)."""
        return dequantize_packed(self.qweight, self.qzeros, self.scales, self.g_idx, dtype, self.bits)

    def pack_for_cpu(self, dense: bool = False) -> str | None:
        """Repack the weight for the CPU int4 op (kept beside the GPTQ tensors), with a bfloat16 copy for
        prefills when ``dense``; None, or why it cannot."""
        reason = int4_cpu.unsupported_reason(self.out_features, self.g_idx, self.scales.shape[0], bits=self.bits)
        if reason is None:
            codes, zeros = unpack_codes(self.qweight, self.qzeros)
            weight = dequantize_codes(codes, zeros, self.scales, self.g_idx, torch.float32) if dense else None
            self.cpu_int4 = int4_cpu.pack_for_cpu(codes, zeros, self.scales, self.g_idx, weight)
        return reason

    def forward(self, x: Tensor) -> Tensor:
        if self.cpu_int4 is not None and x.device.type == "cpu":
            return int4_cpu.int4_linear(x, self.cpu_int4, self.bias)
        rows = x.numel() // self.in_features
        if x.is_cuda and rows <= TRITON_MAX_TOKENS and triton_available():
            return self._forward_triton(x)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _forward_triton(self, x: Tensor) -> Tensor:
        from vexport.kernels.int4_matmul import int4_matmul

        flat = x.reshape(-1, self.in_features)
        out = int4_matmul(flat, self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, bits=self.bits)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"groups={self.scales.shape[0]}, bias={self.bias is not None}"


@functools.cache
def triton_available() -> bool:
    """Whether the fused kernel can run; without triton, CUDA uses dequantize + cuBLAS for every size."""
    return importlib.util.find_spec("triton") is not None


def dequantize_packed(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, dtype: torch.dtype,
                      bits: int = 4) -> Tensor:
    """``dequantize_gptq_v1`` without its validation and int64 [O, I] temporaries (no host syncs on CUDA):
    ``scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`` in float32, returned [O, I] in ``dtype``. The v1
    zero offset is added to the whole word; only bits 0..31 are read, so int64 sign bits never matter."""
    codes, zeros = unpack_codes(qweight, qzeros, bits)
    return dequantize_codes(codes, zeros, scales, g_idx, dtype)


def dequantize_codes(codes: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``dequantize_packed`` from codes [I, O] and zero points [G, O] already unpacked (``unpack_codes``)."""
    groups = g_idx.long()
    weight = (codes - zeros[groups]).to(torch.float32) * scales[groups].to(torch.float32)
    return weight.T.to(dtype)


def pack_linears_for_cpu(module: nn.Module, prefill: str = "int4") -> int:
    """Give every QuantLinear of ``module`` the packed CPU int4 path where the op takes it; log the others
    (one line per reason). ``prefill="bfloat16"`` also keeps each one's bfloat16 copy for calls of
    ``int4_cpu.DENSE_MIN_ROWS`` rows or more (``int4_cpu``'s docstring). Returns how many Linears were packed."""
    dense = prefill == "bfloat16"
    if dense and (why := int4_cpu.dense_unavailable_reason()):
        log.warning("int4 CPU: prefill='bfloat16' unavailable (%s): every call uses the int4 op", why)
        dense = False
    skipped: dict[str, list[str]] = {}
    packed = 0
    for name, layer in module.named_modules():
        if isinstance(layer, QuantLinear):
            reason = layer.pack_for_cpu(dense)
            if reason is None:
                packed += 1
            else:
                skipped.setdefault(reason, []).append(name)
    for reason, names in skipped.items():
        log.warning("int4 CPU: %d Linear(s) keep the dequantized float path (%s), e.g. %s", len(names), reason,
                    names[0])
    if packed:
        log.info("int4 CPU: %d Linear(s) use torch's packed int4 matmul (bfloat16 compute)%s", packed,
                 f", oneDNN bfloat16 copies from {int4_cpu.DENSE_MIN_ROWS} rows" if dense else "")
    return packed


@contextlib.contextmanager
def dequantized_linears(module: nn.Module):
    """Inside the block, every QuantLinear of ``module`` runs the dequantized float path (the reference of
    the packed CPU one); the packed weights are kept and restored on exit."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    packed = [m.cpu_int4 for m in layers]
    try:
        for m in layers:
            m.cpu_int4 = None
        yield module
    finally:
        for m, p in zip(layers, packed):
            m.cpu_int4 = p


class GPTQRunner(ModuleRunner):
    """A GPTQ v1 checkpoint folder as a runner: ``logits(input_ids, attention_mask) -> [B, T, 1]``.

    ``module`` is the transformers ``LlamaForTokenClassification`` with QuantLinear layers; ``values`` runs
    the fused norm + score on CUDA (vexport/head.py), as the fp reference does.
    """

    name = "gptq"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, prefill: str = "int4"):
        from vexport.model import open_model

        source = open_model(folder)
        self.options = gptq_options(source.config, source.path / "config.json")
        device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        if prefill not in PREFILL_WEIGHTS:
            raise InputError(f"prefill {prefill!r} is not one of {', '.join(PREFILL_WEIGHTS)}")
        super().__init__(build_quantized_module(source, device, dtype, prefill), device=device)
        if self.device.type == "cuda" and not triton_available():
            log.warning("triton is not installed: int4 matmuls dequantize then use cuBLAS at every batch size "
                        "(pip install 'vexport[triton]' for the fused kernel)")
        log.info("GPTQ int4 model from %s on %s (%s activations)", source.path, self.device, self.dtype)


def build_quantized_module(source, device: torch.device, dtype: torch.dtype, prefill: str = "int4") -> nn.Module:
    """LlamaForTokenClassification from the source config, QuantLinear layers, every tensor read once."""
    from transformers import AutoModelForTokenClassification

    config = source.config
    with torch.device("meta"):
        module = AutoModelForTokenClassification.from_config(config, dtype=dtype)
    options = gptq_options(config, source.path / "config.json")
    for i, layer in enumerate(module.model.layers):
        for name in QUANTIZED_LINEARS:
            prefix = f"model.layers.{i}.{name}"
            quant = module_quant(options, prefix, str(source.path / "config.json"))
            if quant is not None:  # else the float16 Linear, loaded from PREFIX.weight
                _replace_linear(layer, name, source, prefix, dtype, quant.bits)
    state = {name: _read(source, name, device, dtype) for name in module.state_dict()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # size mismatches: tensors of shapes the config does not allow
        raise VexportError(f"{source.path}: GPTQ tensors of inconsistent shapes "
                           f"({' '.join(str(exc).split())[:300]})") from None
    _check_g_idx(module, source.path)
    _rebuild_rotary(module, device)
    if device.type == "cpu":
        from vexport.backends.cpu_attention import use_gqa_attention

        pack_linears_for_cpu(module, prefill)
        use_gqa_attention(module)
    return module


def _check_g_idx(module: nn.Module, path) -> None:
    """Every g_idx entry must name one of its Linear's groups (else the dequantization would index out of range)."""
    for name, layer in module.named_modules():
        if isinstance(layer, QuantLinear) and layer.g_idx.numel():
            low, high = int(layer.g_idx.min()), int(layer.g_idx.max())
            if low < 0 or high >= layer.scales.shape[0]:
                raise VexportError(f"{path}: {name}.g_idx has group {low if low < 0 else high}, "
                                   f"outside [0, {layer.scales.shape[0]})")


def _replace_linear(layer: nn.Module, name: str, source, prefix: str, dtype: torch.dtype, bits: int) -> None:
    parent_name, attr = name.split(".")
    parent = getattr(layer, parent_name)
    linear = getattr(parent, attr)
    if f"{prefix}.qweight" not in source.tensors:
        raise VexportError(f"{source.path} has no {prefix}.qweight, which its quantization_config says is "
                           f"quantized ({bits} bits)")
    scales = source.tensors.get(f"{prefix}.scales")
    if scales is None or len(scales[2]) != 2:
        raise VexportError(f"{source.path}: {prefix}.scales is missing or not 2-D [groups, out_features]")
    groups = scales[2][0]
    quant = QuantLinear(linear.in_features, linear.out_features, groups, linear.bias is not None, dtype, "meta",
                        bits)
    setattr(parent, attr, quant)


def _read(source, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    if name not in source.tensors:
        raise VexportError(f"{source.path} has no tensor {name}, which the model needs")
    tensor = source.read_tensor(name)
    keep = name.endswith((".qweight", ".qzeros", ".g_idx", ".scales")) or not tensor.is_floating_point()
    return tensor.to(device=device, dtype=None if keep else dtype)


def _rebuild_rotary(module: nn.Module, device: torch.device) -> None:
    """The rotary tables are buffers computed from the config, not checkpoint tensors: build them for real."""
    with torch.device("cpu"):  # computed on the CPU, as transformers does, then moved
        rotary = type(module.model.rotary_emb)(config=module.config)
    module.model.rotary_emb = rotary.to(device)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise VexportError(f"GPTQ model tensors never loaded: {', '.join(leftover[:3])}")

