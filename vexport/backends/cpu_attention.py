"""transformers' SDPA attention with grouped-query heads handled inside the kernel, also under a mask.

transformers repeats the key/value heads of a GQA model (``repeat_kv``, a copy of every layer's keys and values)
whenever an attention mask is given, because CUDA's fused kernels need a mask-free call for ``enable_gqa``.
PyTorch's CPU kernel takes ``enable_gqa`` with a mask, which is the case of every cached call vexport makes
(``score_group``'s responses over the shared prompt, a session's candidates under the tree mask): the copy is
skipped and the kernel reads each KV head once per group.

Registered with transformers as ``"vexport_sdpa"`` (masks built as for ``"sdpa"``); every other case (no mask, no
GQA, not CPU) is transformers' own ``sdpa_attention_forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "vexport_sdpa"


def sdpa_gqa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(module: torch.nn.Module) -> bool:
    """Switch MODULE (a transformers model using SDPA) to ``vexport_sdpa``; False if it uses something else."""
    if getattr(module.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, sdpa_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    module.set_attn_implementation(NAME)
    return True
