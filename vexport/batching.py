"""Batches under a token budget, sorted by length so that little padding is computed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vexport.errors import InputError


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped so that (batch size x longest length) stays within BUDGET tokens, longest first."""
    if budget < 1:
        raise InputError(f"--batch-tokens must be at least 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] (int64), padded on SIDE with PAD_ID."""
    if side not in ("left", "right"):
        raise InputError(f"padding side must be left or right, got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded sequence gets the positions it has alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def unpad(values: torch.Tensor, mask: torch.Tensor) -> list:
    """Per-row numpy float32 arrays of the values at real tokens."""
    values, mask = values.float().cpu(), mask.bool().cpu()
    return [values[row][mask[row]].numpy() for row in range(values.shape[0])]
