"""The value head of the torch backends: the fused Triton kernel on CUDA, Hugging Face's norm + score elsewhere.

Both torch runners (the fp reference and GPTQ int4) hold a transformers ``LlamaForTokenClassification``.
On CUDA with triton installed, the backbone runs without its final RMSNorm (``prenorm_backbone``: the same
modules and weights, the norm replaced by an identity) and ``vexport.kernels.value_head`` computes norm and
score in one read of the hidden states. Anywhere else the module runs as Hugging Face runs it. Either way
``index`` (positions into the flattened [B * T] tokens) restricts the head to the tokens asked for.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor, nn


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_head_available(device: torch.device) -> bool:
    """Whether ``device`` runs the fused head: a CUDA device and triton importable."""
    return device.type == "cuda" and _triton_installed()


def prenorm_backbone(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module.model`` whose final norm is an identity: it shares every weight and returns
    the hidden states before the norm. ``module`` itself is left as it was."""
    backbone = nn.Module.__new__(type(module.model))
    backbone.__dict__.update(module.model.__dict__)
    backbone._modules = {**module.model._modules, "norm": nn.Identity()}
    return backbone


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Flat positions (``b * T + t``) of each row's last real token, on the mask's device (no host sync)."""
    batch, width = attention_mask.shape
    positions = torch.arange(width, device=attention_mask.device).expand(batch, width)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1).clamp_min(0)
    return torch.arange(batch, device=attention_mask.device) * width + last


def fused_values(module: nn.Module, hidden: Tensor, index: Tensor | None = None) -> Tensor:
    """float32 values from the pre-norm ``hidden`` [B, T, H] with the module's own norm and score weights."""
    from vexport.kernels.value_head import value_head

    norm, score = module.model.norm, module.score
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return value_head(hidden, norm.weight, score.weight, score.bias, eps=eps, index=index)


def hf_values(module: nn.Module, hidden: Tensor, index: Tensor | None = None) -> Tensor:
    """float32 values from the normed ``hidden`` [B, T, H] through the HF score Linear (model dtype)."""
    rows = hidden if index is None else hidden.reshape(-1, hidden.shape[-1])[index]
    return module.score(module.dropout(rows))[..., 0].float()


class ValueHead:
    """Backbone + head of a transformers value model: ``values(ids, mask, positions, index)`` in float32."""

    def __init__(self, module: nn.Module, fused: bool | None = None):
        self.module = module
        device = next(module.parameters()).device
        self.fused = fused_head_available(device) if fused is None else fused
        self.backbone = prenorm_backbone(module) if self.fused else module.model

    def values(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor,
               index: Tensor | None = None, backbone: nn.Module | None = None) -> Tensor:
        """[B, T] (or [K] for ``index``) values; ``attention_mask=None`` means no padding to mask
        (right-padded batches may pass None: causal attention never lets a real token see padding after it).
        ``backbone``: a stand-in for ``self.backbone`` (its ``torch.compile``d form)."""
        backbone = self.backbone if backbone is None else backbone
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False)
        hidden = out.last_hidden_state
        return fused_values(self.module, hidden, index) if self.fused else hf_values(self.module, hidden, index)
