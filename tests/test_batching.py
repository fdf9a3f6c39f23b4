"""Token-budget batching and padding."""

from __future__ import annotations

import pytest
import torch

from vexport.batching import pad_batch, plan_batches, unpad
from vexport.errors import InputError


@pytest.mark.parametrize("lengths, budget", [([5, 1, 9, 3, 3, 7], 16), ([1], 1), ([4] * 10, 12), ([30, 2], 8)])
def test_batches_cover_everything_within_budget(lengths, budget):
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= budget


def test_bad_budget():
    with pytest.raises(InputError, match="--batch-tokens"):
        plan_batches([1, 2], 0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_and_unpad_round_trip(side):
    seqs = [[1, 2, 3], [4], [5, 6]]
    ids, mask = pad_batch(seqs, pad_id=0, side=side)
    assert ids.shape == (3, 3) and mask.sum().item() == 6
    rows = unpad(ids.float(), mask)
    assert [r.tolist() for r in rows] == [[1.0, 2.0, 3.0], [4.0], [5.0, 6.0]]
    if side == "left":
        assert ids[1].tolist() == [0, 0, 4]
    else:
        assert ids[1].tolist() == [4, 0, 0]


def test_pad_side_checked():
    with pytest.raises(InputError):
        pad_batch([[1]], 0, side="middle")
    assert isinstance(pad_batch([[1]], 0)[0], torch.Tensor)
