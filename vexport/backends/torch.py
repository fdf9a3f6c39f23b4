"""The reference backend: the Hugging Face model itself, run with position ids that follow the mask."""

from __future__ import annotations

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded sequence gets the positions it has alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class TorchRunner:
    """Runs a transformers ``*ForTokenClassification`` module; returns logits [B, T, 1] on its device."""

    name = "torch"

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.module(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False)
        return out.logits
