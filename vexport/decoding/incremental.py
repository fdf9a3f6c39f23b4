"""``model(input_ids, attention_mask, past_key_values=..., use_cache=True)`` the way a causal LM answers it.

Code written against Hugging Face decoders (PPO-MCTS's ``generate`` takes its value model this way and reads
``logits[:, -1]``) feeds the new tokens with the running cache and the mask of the whole sequence so far.
On the torch backends a vexport model then returns ``.logits`` ``[B, n, 1]`` for the new tokens and the
grown cache as ``.past_key_values`` (and ``.cache``, the transformers 5 name). Position ids follow the
attention mask, as everywhere in vexport, so left padding is handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Cache, DynamicCache
from transformers.utils import ModelOutput

from vexport.batching import position_ids
from vexport.decoding.forward import check_length, incremental_runner
from vexport.errors import InputError


@dataclass
class ValueOutputWithPast(ModelOutput):
    """``logits`` ``[B, n, 1]`` of the new tokens and the KV cache after them."""

    logits: Tensor | None = None
    cache: Cache | None = None

    @property
    def past_key_values(self) -> Cache | None:
        return self.cache


@torch.inference_mode()
def forward_with_cache(model, ids: Tensor, attention_mask, cache: Cache | None) -> ValueOutputWithPast:
    """One incremental call: ``ids`` ``[B, n]`` after the ``cache``'s tokens; ``attention_mask`` covers both."""
    runner = incremental_runner(model)
    if cache is None:
        cache = DynamicCache(config=runner.config)
    elif not isinstance(cache, Cache):
        raise InputError(f"past_key_values must be a transformers Cache (e.g. DynamicCache), "
                         f"got {type(cache).__name__}")
    past = cache.get_seq_length()
    mask = _full_mask(ids, attention_mask, past)
    check_length(int(mask.sum(-1).max()), runner.config)
    ids, mask = ids.to(runner.device), mask.to(runner.device)
    logits = runner.cached_logits(ids, mask, position_ids(mask)[:, past:], cache)
    return ValueOutputWithPast(logits=logits, cache=cache)


def _full_mask(ids: Tensor, attention_mask, past: int) -> Tensor:
    """The ``[B, past + n]`` mask (all ones when none is given)."""
    batch, new = ids.shape
    if attention_mask is None:
        return torch.ones(batch, past + new, dtype=torch.long, device=ids.device)
    mask = torch.as_tensor(attention_mask).long()
    if mask.shape != (batch, past + new):
        raise InputError(f"attention_mask {tuple(mask.shape)} must cover the cached and the new tokens: "
                         f"({batch}, {past} + {new})")
    return mask
