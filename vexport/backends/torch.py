"""The reference backend: the Hugging Face model itself, run with position ids that follow the mask."""

from __future__ import annotations

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded sequence gets the positions it has alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class TorchRunner:
    """Runs a transformers ``*ForTokenClassification`` module; returns logits [B, T, 1] on its device.

    ``values`` goes through ``vexport.head.ValueHead``: on CUDA (with triton) the final norm and the score
    are one fused kernel, and ``index`` scores only the tokens asked for.
    """

    name = "torch"

    def __init__(self, module: torch.nn.Module):
        from vexport.head import ValueHead

        self.module = module.eval()
        self.head = ValueHead(self.module)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self.module(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False)
        return out.logits

    @torch.inference_mode()
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               index: torch.Tensor | None = None) -> torch.Tensor:
        """float32 values [B, T] (padding not zeroed), or [K] at ``index`` (flat ``b * T + t`` positions)."""
        ids, mask = input_ids.to(self.device, non_blocking=True), attention_mask.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True) if index is not None else None
        return self.head.values(ids, mask, position_ids(mask), index)
