"""A Hugging Face causal-LM policy stepped over its own KV cache (``TreeCache``): a block of tokens at a
time, or K candidate chunks side by side with tree attention, keeping the chosen one's keys and values."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from vexport.decoding.cache import TreeCache
from vexport.decoding.forward import cache_kwarg, module_device, module_dtype
from vexport.decoding.inputs import Chunk


@functools.cache
def _keeps_logits(policy_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(policy_type.forward).parameters


def policy_logits(policy, ids: Tensor, mask: Tensor, positions: Tensor, cache, last_only: bool) -> Tensor:
    """float32 logits ``[B, n, V]`` (``[B, 1, V]`` with ``last_only``); the cache grows by ``n`` tokens."""
    kwargs = {cache_kwarg(type(policy)): cache}
    if last_only and _keeps_logits(type(policy)):
        kwargs["logits_to_keep"] = 1
    out = policy(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1:].float() if last_only else out.logits.float()


class PolicyState:
    """The policy's cache over the prompt and every accepted token; ``logits`` ``[B, V]``: the next-token
    logits after them (the last accepted token has always been run)."""

    def __init__(self, policy, prompt: Tensor, vocab_limit: int | None = None):
        self.policy = policy
        self.device, self.dtype = module_device(policy), module_dtype(policy)
        self.state = TreeCache(policy.config, prompt.shape[0], self.device)
        self.vocab_limit = vocab_limit
        self.logits = self.run_block(prompt.to(self.device), torch.ones_like(prompt, device=self.device))

    def run_block(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Run and commit ``ids`` ``[B, n]`` (``mask`` 0: padding); the logits after the block ``[B, V]``."""
        attention, positions = self.state.block_inputs(mask)
        logits = policy_logits(self.policy, ids, attention, positions, self.state.cache, last_only=True)[:, -1]
        self.state.commit_block(mask)
        return self._limit(logits)

    def run_tree(self, ids: Tensor, depth: int) -> Tensor:
        """Run one token for each of K candidate chunks (one row) at ``depth``; logits ``[K, V]``."""
        owner = torch.arange(ids.shape[0], device=self.device)[None]
        mask, positions = self.state.tree_inputs(owner, torch.full_like(owner, depth), self.dtype)
        logits = policy_logits(self.policy, ids[None].to(self.device), mask, positions, self.state.cache, False)
        return self._limit(logits[0])

    def broadcast(self, rows: int) -> None:
        self.state.broadcast(rows)
        self.logits = self.logits.expand(rows, -1)

    def accept(self, pick: int, candidates: int, chosen: Chunk) -> None:
        """Keep candidate ``pick`` (of ``candidates`` run by ``run_tree``, one row) and run its last token."""
        fed = [depth * candidates + pick for depth in range(len(chosen) - 1)]
        if self.state.pending:
            self.state.commit(torch.tensor([fed], dtype=torch.long))
        last = torch.tensor([[chosen[-1]]], device=self.device)
        self.logits = self.run_block(last, torch.ones_like(last))

    def _limit(self, logits: Tensor) -> Tensor:
        """No token the value model does not know (a policy's vocabulary may be padded past it)."""
        if self.vocab_limit is not None and logits.shape[-1] > self.vocab_limit:
            logits[..., self.vocab_limit:] = float("-inf")
        return logits
