"""A tree-structured KV cache: every node of a search tree holds one column of keys and values, stored once.

``TreeKV`` keeps one ``DynamicCache`` per model (policy, value model, reference policy) over the same column
layout, ``B`` rows (one search tree per prompt):

- the *root sequence* of each row (the prompt, then every token chosen so far) is the set of ``visible``
  columns; ``next_pos`` is the position the root's next token takes (positions follow the real tokens, so
  left padding is handled);
- a forward appends ``W`` new columns to every row, one per new leaf: a leaf sees the root sequence, the
  columns of its ancestors in the tree and itself, through a 4-D mask (no keys or values are
  concatenated or copied to build an ancestor chain, as PPO-MCTS's reference does at every expansion);
- ``compact`` keeps the root sequence and the columns asked for (the subtree under the chosen token) and
  drops the rest, so memory stays linear in the number of live nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache


class TreeKV:
    """Columns of keys and values for ``B`` search trees, one ``DynamicCache`` per model name."""

    def __init__(self, configs: dict, batch: int, device: torch.device):
        self.caches = {name: DynamicCache(config=config) for name, config in configs.items()}
        self.device = torch.device(device)
        self.visible = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)

    @property
    def columns(self) -> int:
        return self.visible.shape[1]

    def prompt_inputs(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """2-D mask and position ids for the prompts ``[B, P]`` (run first, into empty caches)."""
        mask = mask.to(self.device, torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self.visible = mask.bool()
        self.next_pos = mask.sum(-1)
        return mask, positions

    def leaf_inputs(self, paths: list[list[list[int] | None]]) -> Tensor:
        """The mask ``[B, 1, W, S + W]`` (True: may attend) of ``W`` new leaves per row (turn it into each
        model's additive mask with ``cache.additive_mask``).

        ``paths[b][w]``: the columns of leaf ``w``'s ancestors below the root, or None for a padding leaf
        (it sees only itself; its column is never visible to anything else)."""
        batch, width, start = len(paths), len(paths[0]), self.columns
        seen = torch.zeros(batch, width, start + width, dtype=torch.bool)
        for b, row in enumerate(paths):
            for w, ancestors in enumerate(row):
                seen[b, w, start + w] = True
                if ancestors is not None:
                    seen[b, w, :start] = self.visible[b].cpu()
                    seen[b, w, ancestors] = True
        self.visible = torch.cat([self.visible, torch.zeros(batch, width, dtype=torch.bool, device=self.device)], 1)
        return seen.to(self.device)[:, None]

    def commit(self, columns: list[int | None]) -> None:
        """Append column ``columns[b]`` to row ``b``'s root sequence (None: the row does not move)."""
        for b, column in enumerate(columns):
            if column is not None:
                self.visible[b, column] = True
                self.next_pos[b] += 1

    def compact(self, keep: list[list[int]]) -> list[dict[int, int]]:
        """Keep each row's root sequence and its columns ``keep[b]``; the rest is dropped (copied once per
        call). Returns each row's map from old to new column."""
        rows = [sorted(set(self.visible[b].nonzero()[:, 0].tolist()) | set(keep[b])) for b in range(len(keep))]
        width = max(len(r) for r in rows)
        index = torch.zeros(len(rows), width, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, row in enumerate(rows):
            index[b, :len(row)], real[b, :len(row)] = torch.tensor(row, dtype=torch.long), True
        index, real = index.to(self.device), real.to(self.device)
        for cache in self.caches.values():
            for layer in cache.layers:
                layer.keys, layer.values = _gather(layer.keys, index), _gather(layer.values, index)
        self.visible = self.visible.gather(1, index) & real
        return [{old: new for new, old in enumerate(row)} for row in rows]

    def nbytes(self) -> int:
        """Bytes of keys and values held by every cache."""
        return sum(t.numel() * t.element_size() for cache in self.caches.values() for layer in cache.layers
                   for t in (layer.keys, layer.values) if t is not None)


def _gather(states: Tensor, index: Tensor) -> Tensor:
    """``states[b, :, index[b]]`` ``[B, H, W, D]``."""
    batch, heads, _, dim = states.shape
    return states.gather(2, index[:, None, :, None].expand(batch, heads, index.shape[1], dim)).contiguous()
