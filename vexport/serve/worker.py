"""The model side of the server: one loaded ValueModel and the calls the endpoints make on it.

Both engines run this same code: the local engine in its one model thread, Ray Serve in each replica. It
depends only on the public ``ValueModel`` API (``values``, ``score_group``) and on the scoring planner
``plan_batches`` (imported here only, so that it can be re-pointed), so a request's values are those of
``vexport.load(MODEL).values()`` on a right-padded batch of similar lengths, whatever else is in flight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vexport.scoring.scorer import plan_batches

__all__ = ["ModelWorker", "plan_batches"]


class ModelWorker:
    """``values(sequences)``: per-token float32 values of each token-id list; ``group(prompt, responses)``."""

    def __init__(self, model, batch_tokens: int):
        self.model, self.batch_tokens = model, batch_tokens

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices in batches of similar lengths within the token budget, longest first."""
        return plan_batches(lengths, self.batch_tokens)

    @torch.inference_mode()
    def run_batch(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One forward over SEQUENCES right-padded to the longest: each one's values at its real tokens."""
        ids, mask = right_padded(sequences)
        values = self.model.values(ids, mask).float().cpu().numpy()
        return [values[row, :len(seq)].copy() for row, seq in enumerate(sequences)]

    def values(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token values of every sequence, batched by the planner."""
        out: list = [None] * len(sequences)
        for batch in self.plan([len(s) for s in sequences]):
            for i, row in zip(batch, self.run_batch([sequences[i] for i in batch])):
                out[i] = row
        return out

    @torch.inference_mode()
    def group(self, prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token values of each response after the shared prompt (the prompt runs once)."""
        rows = self.model.score_group(torch.tensor(list(prompt), dtype=torch.long), [list(r) for r in responses])
        return [row.float().cpu().numpy() for row in rows]


def right_padded(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T], right-padded with 0 (the mask, not the id, marks padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask
