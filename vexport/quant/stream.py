"""Streaming GPTQ over a value model: one decoder layer in memory at a time.

The calibration hidden states walk through the model layer by layer. For each layer the weights are read
from the safetensors shards, each Linear is quantized by GPTQ on the inputs it sees *in this forward pass*
(a forward pre-hook quantizes it just before it runs, so q/k/v, then o, then gate/up, then down each see the
outputs of the already-quantized modules before them), the layer's packed tensors are written out, and the
layer is freed. Embeddings, norms and the score head stay in float16.

``GPTQOptions.dynamic`` (GPTQModel's per-module overrides, quant/dynamic.py) gives each Linear its own bits,
group size, sym and act-order, or leaves it float16 (a ``-:`` key): such a Linear is rounded to float16 in the
quantized stream (what the checkpoint holds) and written as ``.weight``; no Hessian is collected for it.

With value-aware calibration a second stream runs the same layers unquantized, so the float reference's
per-token values on the calibration text are known at the end (see quant/value_aware.py).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vexport.errors import InputError
from vexport.model import ModelSource
from vexport.quant.dynamic import ModuleQuant, resolve
from vexport.progress import progress_bar
from vexport.quant.gptq import TARGET_DAMP_PERCENT, GPTQQuantizer
from vexport.quant.pack import pack_gptq_v1

log = logging.getLogger(__name__)
# Per-layer progress lines (layer i of n, elapsed, expected remaining). A run without a terminal has no bar to
# watch, so the CLI raises this logger to INFO when stderr is not a TTY (CI, nohup, a Ray job).
progress_log = logging.getLogger("vexport.progress")

QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class GPTQOptions:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = True  # act-order: measured better on value models; ONNX handles it with one Gather
    damp_percent: float = 0.01
    block_size: int = 128
    float_targets: bool = False  # fit each Linear to the float model's outputs (the export's default)
    target_damp_percent: float = TARGET_DAMP_PERCENT
    dynamic: dict[str, dict[str, Any]] | None = field(default=None, compare=False)  # per-module overrides

    @property
    def base(self) -> ModuleQuant:
        return ModuleQuant(self.bits, self.group_size, self.sym, self.desc_act)

    def module_quant(self, module: str) -> ModuleQuant | None:
        """The settings of MODULE (full name) under ``dynamic``; None: left float16."""
        return resolve(self.dynamic, module, self.base)

    def solver_kwargs(self, quant: ModuleQuant | None = None) -> dict:
        return {**asdict(quant or self.base), "damp_percent": self.damp_percent, "block_size": self.block_size,
                "target_damp_percent": self.target_damp_percent}


@dataclass
class StreamResult:
    """What the pass leaves for the head: final hidden states (quantized and, if kept, float reference)."""

    hidden_quantized: torch.Tensor  # [N, L, H] before the final norm
    hidden_reference: torch.Tensor | None
    seconds_per_layer: list[float] = field(default_factory=list)


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def finite_tensor(source: ModelSource, name: str) -> torch.Tensor:
    """The checkpoint tensor NAME, refused by name when it holds NaN or infinite values (GPTQ cannot use them)."""
    tensor = source.read_tensor(name)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{source.path}: tensor {name} holds NaN or infinite values: GPTQ cannot quantize "
                         "a model with non-finite weights")
    return tensor


def load_layer(source: ModelSource, index: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """One decoder layer (Llama's, or Mistral's: its config has no attention_bias) with its checkpoint weights,
    built without a random initialisation."""
    if source.config.model_type == "mistral":
        from transformers.models.mistral.modeling_mistral import MistralDecoderLayer as DecoderLayer
    else:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as DecoderLayer

    prefix = f"model.layers.{index}."
    with torch.device("meta"):
        layer = DecoderLayer(source.config, index)
    state = {name[len(prefix):]: finite_tensor(source, name).to(dtype) for name in source.tensors
             if name.startswith(prefix)}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.to(device).eval()


def quantize_layer(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, options: GPTQOptions,
                   batch: int, reference: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """GPTQ every decoder Linear of LAYER on its own inputs, in forward order; return the quantized output.

    With REFERENCE (the float model's hidden states on the same samples), each Linear is fitted to the float
    layer's output on those (``GPTQQuantizer.add_batch(x, target=...)``): the error the earlier quantized
    layers left in HIDDEN is corrected, not carried on.
    """
    index = getattr(getattr(layer, "self_attn", None), "layer_idx", "?")
    plan = {name: options.module_quant(f"model.layers.{index}.{name}") for name in QUANTIZED}
    float_layer = copy.deepcopy(layer) if reference is not None else None
    packed = _keep_float16(layer, [name for name, quant in plan.items() if quant is None])
    quantizers = {name: GPTQQuantizer(layer.get_submodule(name).weight, f"model.layers.{index}.{name}.weight")
                  for name, quant in plan.items() if quant is not None}
    # Pass 1..4: one sub-module group at a time, every calibration sample through the (partly quantized) layer.
    for full_group in (QUANTIZED[:3], QUANTIZED[3:4], QUANTIZED[4:6], QUANTIZED[6:]):
        group = [name for name in full_group if name in quantizers]
        if not group:
            continue
        targets: dict[str, torch.Tensor] = {}
        hooks = [layer.get_submodule(n).register_forward_pre_hook(_collector(quantizers[n], n, targets))
                 for n in group]
        if float_layer is not None:
            hooks += [float_layer.get_submodule(n).register_forward_pre_hook(_keeper(n, targets)) for n in group]
        for start in range(0, hidden.shape[0], batch):
            if float_layer is not None:  # the float inputs of this chunk first, then the quantized path's
                _run(float_layer, reference[start:start + batch], layer_kwargs, batch, stop_after=group[-1])
            _run(layer, hidden[start:start + batch], layer_kwargs, batch, stop_after=group[-1])
        for hook in hooks:
            hook.remove()
        for name in group:
            linear = layer.get_submodule(name)
            qw = quantizers.pop(name).quantize(**options.solver_kwargs(plan[name]))
            linear.weight.data = qw.dequantize(linear.weight.dtype)
            packed[name] = pack_gptq_v1(qw)
    return _run(layer, hidden, layer_kwargs, batch), packed


def _keep_float16(layer: nn.Module, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The Linears NAMES left unquantized: their weight rounded to float16 in place (what the checkpoint
    holds, so the layers after them see the same inputs as a reader), and returned as ``weight`` tensors."""
    kept = {}
    for name in names:
        linear = layer.get_submodule(name)
        half = linear.weight.detach().half()
        linear.weight.data = half.to(linear.weight.dtype)
        kept[name] = {"weight": half}
    return kept


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the sub-modules of interest have seen their inputs."""


def _collector(quantizer: GPTQQuantizer, name: str, targets: dict[str, torch.Tensor]) -> Callable:
    """A pre-hook adding the Linear's inputs to its quantizer (with the float inputs _keeper left, if any)."""
    def hook(module, args):
        quantizer.add_batch(args[0], target=targets.pop(name, None))

    return hook


def _keeper(name: str, targets: dict[str, torch.Tensor]) -> Callable:
    def hook(module, args):
        targets[name] = args[0]

    return hook


def _run(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, batch: int,
         stop_after: str | None = None) -> torch.Tensor:
    """LAYER over HIDDEN in chunks of BATCH samples; with STOP_AFTER, end each chunk once that module ran."""
    outputs = []
    stopper = None
    if stop_after is not None:
        def stop(module, args, output):
            raise _Stop

        stopper = layer.get_submodule(stop_after).register_forward_hook(stop)
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], batch):
            try:
                outputs.append(layer(hidden[start:start + batch], **layer_kwargs))
            except _Stop:
                continue
    if stopper is not None:
        stopper.remove()
        return hidden
    return torch.cat(outputs)


def layer_kwargs(config, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Rotary tables for positions 0..L-1; attention is causal (SDPA, no mask: windows hold no padding)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    positions = torch.arange(seq_len, device=device)[None]
    probe = torch.zeros(1, seq_len, 1, device=device, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(config).to(device)(probe, positions)
    return {"attention_mask": None, "position_ids": positions, "position_embeddings": (cos, sin)}


def quantize_stream(source: ModelSource, samples: torch.Tensor, options: GPTQOptions, write: Callable[[dict], None],
                    *, device: str | torch.device = "cpu", keep_reference: bool = True, batch: int = 8,
                    progress: bool = False) -> StreamResult:
    """Quantize every decoder layer of SOURCE on SAMPLES [N, L]; WRITE receives each layer's tensors."""
    device = torch.device(device)
    dtype = compute_dtype(device)
    config = source.config
    config._attn_implementation = "sdpa"
    embed = finite_tensor(source, "model.embed_tokens.weight")
    write({"model.embed_tokens.weight": embed.half()})
    hidden = nn.functional.embedding(samples, embed).to(device, dtype)
    del embed
    reference = hidden.clone() if keep_reference or options.float_targets else None
    kwargs = layer_kwargs(config, samples.shape[1], device, dtype)
    result = StreamResult(hidden, reference)
    pace = LayerPace(config.num_hidden_layers)
    with progress_bar("quantizing decoder layers", config.num_hidden_layers, progress) as advance:
        for index in range(config.num_hidden_layers):
            start = time.perf_counter()
            layer = load_layer(source, index, device, dtype)
            before = reference
            if reference is not None:
                reference = _run(layer, reference, kwargs, batch)
            hidden, packed = quantize_layer(layer, hidden, kwargs, options, batch,
                                            before if options.float_targets else None)
            write(_layer_tensors(index, layer, packed))
            del layer
            result.seconds_per_layer.append(time.perf_counter() - start)
            pace.layer_done(result.seconds_per_layer[-1])
            advance()
    result.hidden_quantized, result.hidden_reference = hidden, reference
    return result


class LayerPace:
    """Logs each finished layer on ``progress_log``: i of n, its time, the elapsed time and the expected
    remaining time (the mean time per layer so far, times the layers left). Layers are alike, so this is a
    steady pace: one line per layer."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def layer_done(self, seconds: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / self.done * (self.total - self.done)
        progress_log.info("GPTQ: layer %d of %d quantized in %.1f s; elapsed %s, about %s remaining", self.done,
                          self.total, seconds, clock(elapsed), clock(remaining))


def clock(seconds: float) -> str:
    """``1h02m03s``, ``2m03s`` or ``3s``."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _layer_tensors(index: int, layer: nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> dict:
    prefix = f"model.layers.{index}."
    tensors = {}
    for name, parts in packed.items():
        for part, tensor in parts.items():
            tensors[f"{prefix}{name}.{part}"] = tensor.cpu().contiguous()
        bias = layer.get_submodule(name).bias
        if bias is not None:
            tensors[f"{prefix}{name}.bias"] = bias.detach().half().cpu()
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"{prefix}{norm}.weight"] = layer.get_submodule(norm).weight.detach().half().cpu()
    return tensors
