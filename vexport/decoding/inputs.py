"""Turning what users pass (tensors, lists of ints, lists of token lists) into plain per-row token lists.

Every check raises ``InputError`` with one line; the decoding code then sees only ``list[list[int]]`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vexport.errors import InputError

Chunk = list[int]


def prompt_batch(prompt_ids, attention_mask=None) -> tuple[Tensor, Tensor, bool]:
    """``(ids [B, P], mask [B, P], batched)`` from a ``[P]`` or ``[B, P]`` integer tensor."""
    ids = torch.as_tensor(prompt_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2) or ids.shape[-1] == 0:
        raise InputError(f"prompt_ids must be a non-empty integer tensor [P] or [B, P], got {tuple(ids.shape)} "
                         f"{ids.dtype}")
    batched = ids.dim() == 2
    ids = ids.long() if batched else ids.long()[None]
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
    mask = mask if batched or mask.dim() == 2 else mask[None]
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask {tuple(mask.shape)} does not match prompt_ids {tuple(ids.shape)}")
    if bool((mask.sum(-1) == 0).any()):
        raise InputError("every prompt needs at least one real token (an attention_mask row is all zeros)")
    return ids, mask, batched


def token_list(tokens, what: str) -> Chunk:
    """One non-empty list of token ids from an int, a 1-D tensor or a sequence of ints."""
    if isinstance(tokens, Tensor):
        if tokens.dtype.is_floating_point or tokens.dim() > 1:
            raise InputError(f"{what} must be integer token ids [n], got {tuple(tokens.shape)} {tokens.dtype}")
        chunk = [int(t) for t in tokens.reshape(-1)]
    elif isinstance(tokens, int):
        chunk = [tokens]
    elif isinstance(tokens, Sequence) and all(isinstance(t, int) for t in tokens):
        chunk = [int(t) for t in tokens]
    else:
        raise InputError(f"{what} must be token ids (an int, a 1-D tensor or a list of ints)")
    if not chunk:
        raise InputError(f"{what} is empty: every chunk needs at least one token")
    return chunk


def candidate_lists(candidates, what: str = "candidates") -> list[Chunk]:
    """K candidate chunks from ``[K]`` tokens, a ``[K, c]`` tensor of chunks, or a list of K token lists."""
    if isinstance(candidates, Tensor):
        if candidates.dim() == 1:
            return [[t] for t in token_list(candidates, what)]
        if candidates.dim() == 2:
            return [token_list(row, what) for row in candidates]
        raise InputError(f"{what} must be [K] tokens or [K, c] chunks, got {tuple(candidates.shape)}")
    if isinstance(candidates, Sequence) and candidates:
        if all(isinstance(c, int) for c in candidates):
            return [[c] for c in candidates]
        return [token_list(c, what) for c in candidates]
    raise InputError(f"{what} must be a non-empty tensor or list of token ids")


def batched_rows(items, batch: int, batched: bool, one_row, what: str) -> list:
    """Apply ``one_row`` to each of ``batch`` rows (or to the single row of an unbatched session)."""
    if not batched:
        return [one_row(items, what)]
    if isinstance(items, Tensor) and items.dim() == 0 or not isinstance(items, (Tensor, Sequence)):
        raise InputError(f"{what} for a batched session needs a leading batch dimension of {batch}")
    if len(items) != batch:
        raise InputError(f"{what} has {len(items)} rows, the session has {batch} prompts")
    return [one_row(row, f"{what}[{b}]") for b, row in enumerate(items)]


def response_lists(responses) -> list[Chunk]:
    """n responses from a ``[n, R]`` tensor or a list of n token lists (lengths may differ)."""
    if isinstance(responses, Tensor) and responses.dim() != 2:
        raise InputError(f"responses must be [n, R] token ids or a list of token lists, got {tuple(responses.shape)}")
    if not isinstance(responses, (Tensor, Sequence)) or len(responses) == 0:
        raise InputError("responses must be a non-empty list of token lists")
    return [token_list(r, f"responses[{i}]") for i, r in enumerate(responses)]


def pad_right(rows: list[Chunk], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """``(ids [B, W], mask [B, W])``, right-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
    return ids, mask
