"""vexport/backends/cuda_scoring.py: sorted, mask-free, head-at-index scoring gives each sequence its own values.

The logic runs on the CPU here (with the HF head, and with the fused head under the Triton interpreter);
the gpu-marked tests run it on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vexport.backends.cuda_scoring import FastScorer, FastScoringOptions
from vexport.head import ValueHead
from vexport.runtime import load

SEQUENCES = [[1, 7, 8, 9, 10, 11, 12], [1, 20], [1, 30, 31, 32], [5], [1, 7, 8, 9, 10, 11, 13], [2, 3, 4]]


def alone(model, sequence: list[int]) -> np.ndarray:
    """The values of one sequence scored by itself (no padding at all)."""
    return model.values(torch.tensor([sequence]), None)[0].cpu().numpy()


@pytest.mark.parametrize("batch_tokens", [1, 12, 1000])
def test_token_and_sequence_values_match_scoring_alone(tiny_model_dir, batch_tokens):
    model = load(tiny_model_dir)
    scorer = FastScorer(model.runner, FastScoringOptions(batch_tokens=batch_tokens))
    expected = [alone(model, s) for s in SEQUENCES]
    per_token = scorer.token_values(SEQUENCES)
    for got, want in zip(per_token, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scorer.sequence_values(SEQUENCES), [v[-1] for v in expected], atol=1e-5, rtol=1e-5)


def test_fused_head_under_the_interpreter(tiny_model_dir):
    model = load(tiny_model_dir)
    model.runner.head = ValueHead(model.runner.module, fused=True)
    scorer = FastScorer(model.runner, FastScoringOptions(batch_tokens=16))
    expected = [alone(model, s)[-1] for s in SEQUENCES]
    np.testing.assert_allclose(scorer.sequence_values(SEQUENCES), expected, atol=1e-5, rtol=1e-5)


def test_empty_input_and_empty_sequence(tiny_model_dir):
    scorer = FastScorer(load(tiny_model_dir).runner)
    assert scorer.sequence_values([]).shape == (0,) and scorer.token_values([]) == []
    with pytest.raises(Exception, match="at least one token"):
        scorer.sequence_values([[1, 2], []])


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backbone", [False, True], ids=["eager", "compiled"])
def test_cuda_fast_path_matches_padded_reference(tiny_model_dir, compile_backbone):
    gpu = load(tiny_model_dir)
    assert gpu.runner.head.fused
    scorer = FastScorer(gpu.runner, FastScoringOptions(batch_tokens=16, compile=compile_backbone))
    expected = [alone(gpu, s) for s in SEQUENCES]
    for got, want in zip(scorer.token_values(SEQUENCES), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=5e-3, rtol=5e-3)
