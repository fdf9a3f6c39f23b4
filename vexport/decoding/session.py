"""Sessions: a prompt run once, candidates scored in one forward with tree attention, the chosen one kept.

    s = model.session(prompt_ids)          # [P] (or [B, P]: every call then takes and returns a batch dim)
    s.score(torch.tensor([5, 9, 11]))      # float32 [3]: value after each candidate next token
    s.score([[5, 6], [9], [11, 12, 13]])   # float32 [3]: value at each chunk's last token
    s.advance([9])                         # append; a scored candidate's keys and values are reused
    s.values                               # float32 [T]: the value of every token so far

``score`` lays the K candidates side by side after the cached prefix and runs them once: a tree mask lets each
token see the prefix and its own candidate's earlier tokens only, and position ids continue from the prefix,
so every value equals that of running ``prefix + candidate`` in full. The prefix cache is not copied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from vexport.decoding.cache import TreeCache
from vexport.backends.base import IncrementalRunner
from vexport.decoding.forward import check_length, check_tokens, incremental_runner
from vexport.decoding.inputs import Chunk, batched_rows, candidate_lists, pad_right, prompt_batch, token_list
from vexport.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Tree:
    """K candidate chunks per row laid out side by side: ``ids``, ``owner`` (-1: padding), ``depth`` ``[B, N]``;
    ``last`` ``[B, K]``: where each chunk ends; ``start[b][k]``: where it begins."""

    rows: list[list[Chunk]]
    ids: Tensor
    owner: Tensor
    depth: Tensor
    last: Tensor
    start: list[list[int]]

    @classmethod
    def of(cls, rows: list[list[Chunk]]) -> "Tree":
        width = max(sum(len(c) for c in row) for row in rows)
        ids, owner, depth = (torch.full((len(rows), width), fill, dtype=torch.long) for fill in (0, -1, 0))
        last = torch.zeros(len(rows), len(rows[0]), dtype=torch.long)
        start: list[list[int]] = []
        for b, row in enumerate(rows):
            offset, start_b = 0, []
            for k, chunk in enumerate(row):
                span = slice(offset, offset + len(chunk))
                ids[b, span], owner[b, span] = torch.tensor(chunk), k
                depth[b, span] = torch.arange(len(chunk))
                start_b.append(offset)
                offset += len(chunk)
                last[b, k] = offset - 1
            start.append(start_b)
        return cls(rows, ids, owner, depth, last, start)

    def index_of(self, chosen: list[Chunk]) -> Tensor | None:
        """``[B, W]`` tree positions of the chosen chunk of every row (-1: padding), or None if a row's choice
        is not one of its candidates."""
        spans = []
        for b, chunk in enumerate(chosen):
            k = next((k for k, c in enumerate(self.rows[b]) if c == chunk), None)
            if k is None:
                return None
            spans.append(list(range(self.start[b][k], self.start[b][k] + len(chunk))))
        width = max(len(s) for s in spans)
        return torch.tensor([s + [-1] * (width - len(s)) for s in spans], dtype=torch.long)


class Session:
    """A value model's KV cache over a prompt and the tokens appended since (see the module docstring)."""

    @torch.inference_mode()
    def __init__(self, model, prompt_ids, attention_mask=None):
        self._runner = incremental_runner(model)
        self.config = self._runner.config
        ids, mask, self.batched = prompt_batch(prompt_ids, attention_mask)
        check_tokens(ids, self.config, "prompt_ids")
        check_length(ids.shape[1], self.config)
        self._device, self._dtype = self._runner.device, self._runner.dtype
        self._state = TreeCache(self.config, ids.shape[0], self._device)
        self._ids = torch.zeros(ids.shape[0], 0, dtype=torch.long, device=self._device)
        self._values = torch.zeros(ids.shape[0], 0, dtype=torch.float32, device=self._device)
        self._tree: Tree | None = None
        self._tree_values: Tensor | None = None
        self._append(ids, mask)

    @property
    def values(self) -> Tensor:
        """float32 ``[T]`` (``[B, T]``): the value of every token so far; padding positions are 0."""
        return self._unbatch(self._values)

    @property
    def tokens(self) -> Tensor:
        """``[T]`` (``[B, T]``): the prompt and every token appended (padding positions hold 0)."""
        return self._unbatch(self._ids)

    @property
    def attention_mask(self) -> Tensor:
        """``[T]`` (``[B, T]``): 1 for real tokens, 0 for padding (the layout of ``tokens`` and ``values``)."""
        return self._unbatch(self._state.mask)

    @torch.inference_mode()
    def score(self, candidates) -> Tensor:
        """float32 ``[K]`` (``[B, K]``): the value after each candidate token or at each chunk's last token."""
        rows = batched_rows(candidates, self._state.batch, self.batched, candidate_lists, "candidates")
        if len({len(row) for row in rows}) != 1:
            raise InputError("every prompt of a batched session needs the same number of candidates")
        tree = Tree.of(rows)
        self._check(tree.ids, int(tree.depth.max()) + 1, "candidates")
        self._state.discard()
        mask, positions = self._state.tree_inputs(tree.owner, tree.depth, self._dtype)
        ids = tree.ids.to(self._device)
        self._tree_values = self._runner.cached_values(ids, mask, positions, self._state.cache)
        self._tree = tree
        return self._unbatch(self._tree_values.gather(1, tree.last.to(self._device)))

    @torch.inference_mode()
    def advance(self, tokens) -> Tensor:
        """Append ``tokens`` (``[n]``, or one list per prompt); returns their values (float32 ``[n]``/``[B, n]``).

        When they are one of the candidates just scored, the keys and values computed for it are kept (no
        forward); otherwise they run now."""
        rows = batched_rows(tokens, self._state.batch, self.batched, token_list, "tokens")
        index = self._tree.index_of(rows) if self._tree is not None else None
        ids, mask = pad_right(rows)
        self._check(ids, ids.shape[1], "tokens")
        if index is None:
            values = self._append(ids, mask)
        else:
            values = self._keep(index.to(self._device), ids, mask)
        self._tree = self._tree_values = None
        return self._unbatch(values)

    def _append(self, ids: Tensor, mask: Tensor) -> Tensor:
        ids, mask = ids.to(self._device), mask.to(self._device)
        return self._record(ids, run_block(self._runner, self._state, ids, mask) * mask)

    def _keep(self, index: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        log.debug("advance reuses the scored candidate's keys and values (%d tokens)", index.shape[1])
        mask = mask.to(self._device)
        values = self._tree_values.gather(1, index.clamp_min(0)) * mask
        self._state.commit(index)
        return self._record(ids.to(self._device), values)

    def _record(self, ids: Tensor, values: Tensor) -> Tensor:
        self._ids = torch.cat([self._ids, ids], dim=1)
        self._values = torch.cat([self._values, values], dim=1)
        return values

    def _check(self, ids: Tensor, depth: int, what: str) -> None:
        check_tokens(ids, self.config, what)
        check_length(int(self._state.next_pos.max()) + depth, self.config)

    def _unbatch(self, tensor: Tensor) -> Tensor:
        return tensor if self.batched else tensor[0]

    def __repr__(self) -> str:
        return f"Session(batch={self._state.batch}, tokens={self._state.committed}, batched={self.batched})"


def run_block(runner: IncrementalRunner, state: TreeCache, ids: Tensor, mask: Tensor) -> Tensor:
    """Run and commit ``ids`` ``[B, n]`` (``mask`` 0: padding) after the cached tokens; float32 values ``[B, n]``."""
    attention, positions = state.block_inputs(mask)
    values = runner.cached_values(ids, attention, positions, state.cache)
    state.commit_block(mask)
    return values
