"""The one scoring engine: batches under a token budget, sorted by length, one pad rule, values in input order.

``vexport check`` (``checker.score``), ``vexport score`` (``scoring/scorer.py``) and the CUDA fast path
(``backends/cuda_scoring.py``) plan with ``plan_batches`` and run with ``run_in_order``; each says only how
one batch runs. The mask decides what is padding, never the pad id (``pad_id_of`` picks one all three use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from vexport.errors import InputError

if TYPE_CHECKING:  # torch is imported where a batch is padded: the CLI reads the defaults here without it
    import torch

DEFAULT_BATCH_TOKENS = 8192  # padded tokens per batch (rows x longest) unless told otherwise
CHECK_BATCH_TOKENS = 4096  # `vexport check`'s: it holds the reference's and the artifact's values of every batch
MIN_LENGTH_RATIO = 0.75  # a batch holds rows at least 3/4 as long as its longest: padding under 25% ...
MIN_BATCH_FRACTION = 1 / 16  # ... once it holds this much of the token budget (512 tokens of the default 8192)
R = TypeVar("R")


def plan_batches(lengths: Sequence[int], batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 fixed_batch_rows: int | None = None) -> list[list[int]]:
    """Batches of similar lengths, longest first, each within BATCH_TOKENS (rows x longest).

    A batch also ends at a row shorter than MIN_LENGTH_RATIO of its longest (so padding stays under 25%), once
    it holds MIN_BATCH_FRACTION of the budget: tiny batches would cost more in calls than padding does.
    With FIXED_BATCH_ROWS: batches of that many rows in input order, unsorted (the baseline benchmarks use).
    """
    if fixed_batch_rows:
        starts = range(0, len(lengths), fixed_batch_rows)
        return [list(range(i, min(i + fixed_batch_rows, len(lengths)))) for i in starts]
    if batch_tokens < 1:
        raise InputError(f"--batch-tokens must be at least 1, got {batch_tokens}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches:
            batch, longest = batches[-1], lengths[batches[-1][0]]
            small = len(batch) * longest < MIN_BATCH_FRACTION * batch_tokens
            if (len(batch) + 1) * longest <= batch_tokens and (small or lengths[i] >= MIN_LENGTH_RATIO * longest):
                batch.append(i)
                continue
        batches.append([i])
    return batches


def run_in_order(batches: Sequence[Sequence[int]], count: int,
                 run: Callable[[int, Sequence[int]], Sequence[R]]) -> list[R]:
    """The scoring loop: ``run(k, rows)`` gives one result per row of batch ``k``; each lands at its input row
    (``count`` rows in all)."""
    out: list = [None] * count
    for k, rows in enumerate(batches):
        for i, result in zip(rows, run(k, rows), strict=True):
            out[i] = result
    return out


def pad_id_of(model) -> int:
    """The id padding positions hold for MODEL (``.config``, ``.tokenizer``): the config's pad token, else the
    tokenizer's pad token, else its eos, else 0. The tokenizer is only read when the config has none."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        tokenizer = model.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] (int64), padded on SIDE with PAD_ID."""
    import torch

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
