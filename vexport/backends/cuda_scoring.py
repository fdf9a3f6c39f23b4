"""Scoring many sequences on a torch backend without wasted work: the fast path for CUDA.

- Batches are planned under a token budget, longest first (``vexport.batching.plan_batches``), so
  the sequences of a batch have similar lengths and little padding is computed.
- Batches are right-padded and run without an attention mask: under causal attention a real token never
  sees the padding after it, so its value is exact, and transformers' SDPA path runs with ``is_causal``
  (the flash / memory-efficient kernels) instead of a materialised [B, 1, T, T] mask. Position ids are
  ``0..T-1``, the ones a right-padded sequence has.
- The head reads only the real tokens (or only each sequence's last token): an ``index`` tensor built on
  the host from the lengths, sent with the batch (pinned memory, ``non_blocking``), so the fused value
  head (``vexport.head``) never touches padding.
- Nothing is read back per batch: results stay on the device (put in input order by the shared loop,
  ``vexport.batching.run_in_order``) and are copied to the host once, at the end.
- ``compile=True`` wraps the backbone in ``torch.compile(dynamic=True)`` (worth it for long runs of
  similar shapes; the first batches pay for compilation).

Works on CPU too (used by the tests), where there is no copy engine to overlap and nothing is faster.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vexport.backends.base import IncrementalRunner
from vexport.batching import DEFAULT_BATCH_TOKENS, plan_batches, run_in_order
from vexport.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastScoringOptions:
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # padded tokens per batch (batch size x longest length)
    compile: bool = False  # torch.compile the backbone (dynamic shapes)


@dataclass(frozen=True)
class HostBatch:
    """One planned batch on the host: right-padded ids, position ids and head positions (pinned on CUDA)."""

    rows: list[int]
    input_ids: Tensor
    position_ids: Tensor
    index: Tensor


class FastScorer:
    """``scorer.sequence_values(seqs)`` -> float32 [N]; ``scorer.token_values(seqs)`` -> per-sequence arrays.

    ``runner`` is an ``IncrementalRunner`` (``TorchRunner`` or ``GPTQRunner``): its ``positional_values``
    runs each batch; inputs are lists of token ids.
    """

    def __init__(self, runner: IncrementalRunner, options: FastScoringOptions = FastScoringOptions(),
                 pad_id: int = 0):
        if not runner.incremental:
            raise InputError(f"the fast scorer runs torch backends (torch, gptq), not {runner.name}")
        self.runner, self.options, self.pad_id = runner, options, pad_id
        self.device = torch.device(runner.device)

    def sequence_values(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [N]: each sequence's value at its last token, in input order."""
        values = self._run(sequences, last_only=True)
        return torch.stack(values).cpu().numpy() if values else np.zeros(0, np.float32)

    def token_values(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token float32 values of each sequence (its real tokens only), in input order."""
        values = self._run(sequences, last_only=False)
        flat = torch.cat(values).cpu().numpy() if values else np.zeros(0, np.float32)
        return np.split(flat, np.cumsum([len(s) for s in sequences])[:-1]) if len(sequences) else []

    @torch.inference_mode()
    def _run(self, sequences: Sequence[Sequence[int]], last_only: bool) -> list[Tensor]:
        """One device tensor per sequence, in input order: its last value (0-d) or its per-token values."""
        lengths = [len(s) for s in sequences]
        if any(n == 0 for n in lengths):
            raise InputError("every sequence needs at least one token")

        def run(_: int, rows: Sequence[int]) -> Sequence[Tensor]:
            values = self._values(self._host_batch(sequences, rows, last_only))
            return values.unbind() if last_only else values.split([lengths[i] for i in rows])

        return run_in_order(plan_batches(lengths, self.options.batch_tokens), len(sequences), run)

    def _host_batch(self, sequences: Sequence[Sequence[int]], rows: list[int], last_only: bool) -> HostBatch:
        lengths = [len(sequences[i]) for i in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : lengths[r]] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
        if last_only:
            index = torch.tensor([r * width + n - 1 for r, n in enumerate(lengths)], dtype=torch.long)
        else:
            index = torch.cat([torch.arange(n) + r * width for r, n in enumerate(lengths)])
        positions = torch.arange(width).expand(len(rows), width)
        return self._pinned(HostBatch(rows, ids, positions, index))

    def _pinned(self, batch: HostBatch) -> HostBatch:
        if self.device.type != "cuda":
            return batch
        return HostBatch(batch.rows, batch.input_ids.pin_memory(), batch.position_ids.contiguous().pin_memory(),
                         batch.index.pin_memory())

    def _values(self, batch: HostBatch) -> Tensor:
        """Copy in without waiting, run the backbone with no mask (causal, right-padded) and the head at index."""
        ids = batch.input_ids.to(self.device, non_blocking=True)
        positions = batch.position_ids.to(self.device, non_blocking=True)
        index = batch.index.to(self.device, non_blocking=True)
        return self.runner.positional_values(ids, None, positions, index, compiled=self.options.compile)
