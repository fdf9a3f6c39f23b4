"""vexport/scoring/scorer.py plan_batches: token-budget batches of similar lengths, and the fixed baseline."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vexport.errors import VexportError
from vexport.scoring.scorer import MIN_BATCH_FRACTION, MIN_LENGTH_RATIO, plan_batches


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 2000), max_size=300), st.integers(1, 20000))
def test_every_row_once_within_budget_and_similar_lengths(lengths, budget):
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        if len(batch) > 1:
            assert len(batch) * longest <= budget
        for k, i in enumerate(batch):  # a short row joins only a batch still under its minimum size
            assert lengths[i] >= MIN_LENGTH_RATIO * longest or k * longest < MIN_BATCH_FRACTION * budget


def test_similar_lengths_share_a_batch_up_to_the_budget():
    assert plan_batches([10, 10, 10, 10], 40) == [[0, 1, 2, 3]]
    assert plan_batches([10, 10, 10, 10], 39) == [[0, 1, 2], [3]]
    assert plan_batches([100, 10, 99, 11], 10_000) == [[0, 2, 3, 1]]  # small batches do not split
    assert plan_batches([1000, 100, 990, 110], 16_000) == [[0, 2], [3, 1]]  # 2,000 tokens: split at 75%


def test_fixed_batches_keep_input_order():
    assert plan_batches([5, 1, 9, 3, 3], 1, fixed_batch_rows=2) == [[0, 1], [2, 3], [4]]


def test_bad_budget():
    with pytest.raises(VexportError, match="--batch-tokens"):
        plan_batches([1, 2], 0)
