"""What every backend is: a ``Runner``; what the torch backends add: ``IncrementalRunner`` (KV-cached use).

A runner has a ``name``, a ``device``, the dtype of its logits (``logits_dtype``) and two calls:
``logits(input_ids, attention_mask) -> [B, T, 1]`` and ``values(input_ids, attention_mask, index=None) ->
float32 [B, T]`` (or ``[K]`` at the flat ``b * T + t`` positions ``index``). ONNX Runtime and TensorRT
implement ``logits`` and inherit ``values``.

Sessions, ``score_group``, ``past_key_values`` calls and the CUDA fast scorer need more than that: the
backbone run with explicit position ids, with or without a KV cache. Runners that can do it subclass
``IncrementalRunner`` and so declare it (``runner.incremental`` is True); nothing is discovered from a
runner's attributes. ``ModuleRunner`` is that runner over a transformers ``*ForTokenClassification`` module:
the fp reference (``backends/torch.py``) and the GPTQ int4 runtime (``backends/gptq.py``) are both one.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from vexport.batching import position_ids


class Runner(ABC):
    """One loaded model on one device (see the module docstring)."""

    name: ClassVar[str]
    incremental: ClassVar[bool] = False  # True: this runner is an IncrementalRunner (sessions, KV caches)
    device: torch.device

    @property
    def logits_dtype(self) -> torch.dtype:
        """The dtype ``logits`` returns (float32 here: ONNX Runtime's and TensorRT's graphs end in float32)."""
        return torch.float32

    @abstractmethod
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T, 1] logits on the runner's device."""

    def values(self, input_ids: Tensor, attention_mask: Tensor, index: Tensor | None = None) -> Tensor:
        """float32 values [B, T] from ``logits``, or [K] at ``index`` (flat positions; padding there is 0)."""
        values = self.logits(input_ids, attention_mask)[..., 0].float()
        if index is None:
            return values
        masked = values * attention_mask.to(values.device)
        return masked.reshape(-1)[index.to(values.device)]


class IncrementalRunner(Runner):
    """A runner that runs the backbone with explicit position ids and, optionally, a transformers KV cache."""

    incremental: ClassVar[bool] = True
    config: object  # the transformers config (vocabulary, positions, cache layout)
    dtype: torch.dtype  # activation dtype

    @abstractmethod
    def positional_values(self, input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor,
                          index: Tensor | None = None, compiled: bool = False) -> Tensor:
        """float32 values [B, T] (or [K] at ``index``) with the given position ids; ``attention_mask=None``
        runs causal attention with no mask (right-padded batches). ``compiled``: a ``torch.compile``d backbone."""

    @abstractmethod
    def cached_logits(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, cache) -> Tensor:
        """Logits [B, n, 1] (model dtype) of ``n`` new tokens after ``cache``'s, whose keys and values are
        appended to ``cache``; ``attention_mask`` is 2-D over cached + new tokens, or an additive 4-D mask."""

    def cached_values(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, cache) -> Tensor:
        """float32 ``[B, n]``: ``cached_logits`` as values."""
        return self.cached_logits(input_ids, attention_mask, positions, cache)[..., 0].float()


@functools.cache
def cache_kwarg(module_type: type) -> str:
    """The name the module's forward gives its cache argument: ``cache`` (transformers >= 5.x) or the older
    ``past_key_values``."""
    parameters = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def module_dtype(module: nn.Module) -> torch.dtype:
    """The activation dtype (the first floating-point parameter's; int4 buffers are not parameters)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


class ModuleRunner(IncrementalRunner):
    """A transformers ``*ForTokenClassification`` module, run with position ids that follow the mask.

    ``values`` goes through ``vexport.head.ValueHead`` (``head``): on CUDA (with triton) the final norm and
    the score are one fused kernel, and ``index`` scores only the tokens asked for.
    """

    def __init__(self, module: nn.Module, device: torch.device | None = None):
        from vexport.head import ValueHead

        self.module = module.eval()
        self.head = ValueHead(self.module)
        self._device = device
        self._compiled: tuple[nn.Module, nn.Module] | None = None  # (backbone, its torch.compile)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.module)

    @property
    def logits_dtype(self) -> torch.dtype:  # the module's logits are in its activation dtype
        return self.dtype

    @property
    def config(self):
        return self.module.config

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self.module(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False)
        return out.logits

    @torch.inference_mode()
    def values(self, input_ids: Tensor, attention_mask: Tensor, index: Tensor | None = None) -> Tensor:
        """float32 values [B, T] (padding not zeroed), or [K] at ``index`` (flat ``b * T + t`` positions)."""
        ids, mask = input_ids.to(self.device, non_blocking=True), attention_mask.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True) if index is not None else None
        return self.head.values(ids, mask, position_ids(mask), index)

    def positional_values(self, input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor,
                          index: Tensor | None = None, compiled: bool = False) -> Tensor:
        backbone = self._compiled_backbone() if compiled else None
        return self.head.values(input_ids, attention_mask, positions, index, backbone=backbone)

    def _compiled_backbone(self) -> nn.Module:
        if self._compiled is None or self._compiled[0] is not self.head.backbone:
            self._compiled = (self.head.backbone, torch.compile(self.head.backbone, dynamic=True))
        return self._compiled[1]

    def cached_logits(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, cache) -> Tensor:
        body = getattr(self.module, self.module.base_model_prefix)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                      **{cache_kwarg(type(body)): cache}).last_hidden_state
        return self.module.score(hidden)
