"""A KV cache of committed tokens followed by a pending tree of candidates, for any Hugging Face decoder.

``TreeCache`` wraps a transformers ``DynamicCache`` and keeps the bookkeeping the model itself does not:

- the committed key mask ``[B, S]`` (1 real, 0 padding; padding may sit anywhere, as after a left-padded
  prompt or a short row of a batched chunk) and the next position of every row (positions follow the mask,
  as in ``vexport.backends.torch.position_ids``);
- the pending tree: tokens run after the committed ones, each tagged with its candidate (``owner``, -1 for
  padding) and its ``depth`` in that candidate. A pending token sees the committed real tokens and the
  tokens of its own candidate at smaller or equal depth, nothing of the other candidates.

``block_inputs`` runs tokens that are committed at once (a prompt, a chosen chunk): causal over the block,
with a 2-D mask that transformers turns into its own causal mask. ``tree_inputs`` runs candidates with an
explicit additive 4-D mask (SDPA and eager attention both take it; GQA is the model's own business).
``commit`` keeps one candidate per row by moving its keys and values next to the committed ones (only
those tokens are copied) and dropping the rest with a crop, which is a view.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache


class TreeCache:
    """Committed tokens and pending candidates over one ``DynamicCache`` (batch ``B``)."""

    def __init__(self, config, batch: int, device: torch.device):
        self.cache = DynamicCache(config=config)
        self.device = torch.device(device)
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.owner = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.depth = torch.zeros(batch, 0, dtype=torch.long, device=self.device)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def committed(self) -> int:
        return self.mask.shape[1]

    @property
    def pending(self) -> int:
        return self.owner.shape[1]

    def block_inputs(self, block_mask: Tensor) -> tuple[Tensor, Tensor]:
        """2-D mask ``[B, S + n]`` and position ids ``[B, n]`` for ``n`` tokens committed as they run."""
        self.discard()
        block_mask = block_mask.to(self.device, torch.long)
        positions = self.next_pos[:, None] + (block_mask.cumsum(-1) - 1).clamp_min(0)
        return torch.cat([self.mask, block_mask], dim=1), positions

    def commit_block(self, block_mask: Tensor) -> None:
        """Record the block just run by ``block_inputs`` as committed."""
        block_mask = block_mask.to(self.device, torch.long)
        self.mask = torch.cat([self.mask, block_mask], dim=1)
        self.next_pos = self.next_pos + block_mask.sum(-1)

    def tree_inputs(self, owner: Tensor, depth: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Additive mask ``[B, 1, n, S + N + n]`` and position ids ``[B, n]`` for ``n`` more pending tokens."""
        owner, depth = owner.to(self.device), depth.to(self.device)
        self.owner = torch.cat([self.owner, owner], dim=1)
        self.depth = torch.cat([self.depth, depth], dim=1)
        same = owner[:, :, None] == self.owner[:, None, :]
        earlier = self.depth[:, None, :] <= depth[:, :, None]
        tree = (same & earlier & (self.owner >= 0)[:, None, :]) | _last_columns_eye(owner.shape[1], self.pending,
                                                                                    self.device)
        prefix = self.mask.bool()[:, None, :].expand(-1, owner.shape[1], -1)
        visible = torch.cat([prefix, tree], dim=2)
        return additive_mask(visible, dtype)[:, None], self.next_pos[:, None] + depth

    def commit(self, index: Tensor) -> None:
        """Keep pending tokens ``index`` ``[B, W]`` (-1: padding) after the committed ones; drop the rest."""
        index = index.to(self.device)
        real = index >= 0
        start = self.committed
        source = start + index.clamp_min(0)
        for layer in self.cache.layers:
            layer.keys[:, :, start:start + index.shape[1]] = _gather_tokens(layer.keys, source)
            layer.values[:, :, start:start + index.shape[1]] = _gather_tokens(layer.values, source)
        self.cache.crop(start + index.shape[1] - self.cache.get_seq_length())
        self.owner, self.depth = self.owner[:, :0], self.depth[:, :0]
        self.commit_block(real.long())

    def discard(self) -> None:
        """Drop the pending tree (a crop: a view, nothing is copied)."""
        if self.pending:
            self.cache.crop(-self.pending)
            self.owner, self.depth = self.owner[:, :0], self.depth[:, :0]

    def broadcast(self, rows: int) -> None:
        """Turn a one-row cache into ``rows`` rows sharing it (a view; the next forward materialises it)."""
        self.discard()
        for layer in self.cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        self.mask = self.mask.expand(rows, -1)
        self.next_pos = self.next_pos.expand(rows)
        self.owner, self.depth = self.owner.expand(rows, -1), self.depth.expand(rows, -1)


def additive_mask(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where attention is allowed, the dtype's lowest value elsewhere (as transformers builds its masks)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def _last_columns_eye(n: int, total: int, device: torch.device) -> Tensor:
    """``[n, total]``: every new token sees itself (so a padding query is never left with nothing to see)."""
    eye = torch.zeros(n, total, dtype=torch.bool, device=device)
    eye[:, total - n:] = torch.eye(n, dtype=torch.bool, device=device)
    return eye


def _gather_tokens(states: Tensor, source: Tensor) -> Tensor:
    """``states[b, :, source[b, w]]`` as ``[B, H, W, D]`` (a new tensor, so the write back never overlaps)."""
    batch, heads, _, dim = states.shape
    index = source[:, None, :, None].expand(batch, heads, source.shape[1], dim)
    return states.gather(2, index)
