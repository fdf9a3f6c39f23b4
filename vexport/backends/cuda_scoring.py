"""Scoring many sequences on a torch backend without wasted work: the fast path for CUDA.

- Batches are planned under a token budget, longest first (``vexport.batching.token_budget_batches``), so
  the sequences of a batch have similar lengths and little padding is computed.
- Batches are right-padded and run without an attention mask: under causal attention a real token never
  sees the padding after it, so its value is exact, and transformers' SDPA path runs with ``is_causal``
  (the flash / memory-efficient kernels) instead of a materialised [B, 1, T, T] mask. Position ids are
  ``0..T-1``, the ones a right-padded sequence has.
- The head reads only the real tokens (or only each sequence's last token): an ``index`` tensor built on
  the host from the lengths, sent with the batch (pinned memory, ``non_blocking``), so the fused value
  head (``vexport.head``) never touches padding.
- Nothing is read back per batch: results stay on the device and are copied to the host once, at the end.
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
from vexport.batching import token_budget_batches
from vexport.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastScoringOptions:
    batch_tokens: int = 16384  # padded tokens per batch (batch size x longest length)
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
        outputs, order = self._run(sequences, last_only=True)
        values = torch.cat(outputs).cpu().numpy() if outputs else np.zeros(0, np.float32)
        result = np.empty(len(sequences), np.float32)
        result[order] = values
        return result

    def token_values(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token float32 values of each sequence (its real tokens only), in input order."""
        outputs, order = self._run(sequences, last_only=False)
        flat = torch.cat(outputs).cpu().numpy() if outputs else np.zeros(0, np.float32)
        ends = np.cumsum([len(sequences[i]) for i in order])
        pieces = np.split(flat, ends[:-1]) if len(order) else []
        result: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        for i, piece in zip(order, pieces):
            result[i] = piece
        return result

    @torch.inference_mode()
    def _run(self, sequences: Sequence[Sequence[int]], last_only: bool) -> tuple[list[Tensor], list[int]]:
        """Device tensors of values, batch by batch, and the input rows in the order they come out."""
        lengths = [len(s) for s in sequences]
        if any(n == 0 for n in lengths):
            raise InputError("every sequence needs at least one token")
        outputs: list[Tensor] = []
        order: list[int] = []
        for rows in token_budget_batches(lengths, self.options.batch_tokens) if sequences else []:
            batch = self._host_batch(sequences, rows, last_only)
            outputs.append(self._values(batch))
            order += rows
        return outputs, order

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
