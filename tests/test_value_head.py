"""The fused value head (kernels/value_head.py) against Hugging Face's norm + score (kernels/reference.py).

Two comparisons, both on the same weights:
- against the Hugging Face path itself (``value_head_reference``: LlamaRMSNorm, then the score Linear in the
  model dtype). HF rounds the value to fp16/bf16 and the kernel does not, so the tolerance is one output
  rounding (rtol ~ an ulp of the dtype) plus float32 summation order: TOLERANCE below.
- against the kernel's definition (the same reference with the score Linear in float32): only summation
  order, plus rare one-ulp flips of the normed state where the inverse RMS differs in its last bit. Most
  rows must agree to 1e-5, which fails if any of HF's intermediate roundings were skipped.
On the CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it).
"""

from __future__ import annotations

import pytest
import torch

from vexport.errors import InputError
from vexport.kernels.reference import value_head_reference
from vexport.kernels.value_head import value_head


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# (atol, rtol) against Hugging Face: one rounding of the value to the dtype (HF) + float32 summation order
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}
# (atol, rtol) against the kernel's definition (float32 score Linear): a flipped normed element costs
# about ulp(n) * |w_norm * w_score|; the rows without a flip agree to 1e-5 (DEFINITION_CLEAN_ROWS)
DEFINITION_TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-4, 1e-5),
    torch.bfloat16: (2e-3, 1e-5),
}
DEFINITION_CLEAN_ROWS = 0.9
GPU_TOLERANCE = {  # cuBLAS may reduce fp16/bf16 partial sums in reduced precision; TF32 is off for float32
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
DTYPES = list(TOLERANCE)
SHAPES = [(1, 123), (615, 123), (1, 5120), (615, 5120)]  # (tokens, hidden); 615 = 5 x 123


def head_weights(hidden: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Norm weights around 1, score weights ~ 1/sqrt(hidden) so that values are O(1), a bias of O(1)."""
    return {
        "norm_weight": (1 + 0.3 * torch.randn(hidden)).to(dtype).to(device),
        "score_weight": (torch.randn(1, hidden) / hidden**0.5).to(dtype).to(device),
        "score_bias": torch.randn(1).to(dtype).to(device),
    }


def hidden_states(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Pre-norm states with an offset and a spread, as residual streams have (not unit variance)."""
    return (torch.randn(shape) * 3 + 0.5).to(dtype).to(device)


def assert_matches(x: torch.Tensor, weights: dict, index: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    tolerance = GPU_TOLERANCE if x.is_cuda else TOLERANCE
    out = value_head(x, **weights, eps=1e-5, index=index, **kwargs)
    expected = value_head_reference(x, **weights, eps=1e-5, index=index)
    assert out.dtype == torch.float32 and out.shape == expected.shape and out.device == x.device
    assert bool(expected.abs().amax() > 0.1)  # not a vacuous comparison of near-zeros
    atol, rtol = tolerance[x.dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), SHAPES)
def test_matches_hugging_face(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    assert_matches(hidden_states((tokens, hidden), dtype), head_weights(hidden, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [123, 5120])
def test_matches_kernel_definition(dtype: torch.dtype, hidden: int) -> None:
    """Tight: HF's roundings (normed state, weight product) must all be there, only the last one is not."""
    x, weights = hidden_states((615, hidden), dtype), head_weights(hidden, dtype)
    out = value_head(x, **weights)
    expected = value_head_reference(x, **weights, linear_dtype=torch.float32)
    atol, rtol = DEFINITION_TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    clean = ((out - expected).abs() <= 1e-5 + 1e-5 * expected.abs()).float().mean().item()
    assert clean >= DEFINITION_CLEAN_ROWS, f"only {clean:.1%} of rows match the definition to 1e-5"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_rows_match(dtype: torch.dtype) -> None:
    """Rows wider than the chunk are read twice (sum of squares, then the dot): same values."""
    x, weights = hidden_states((37, 123), dtype), head_weights(123, dtype)
    assert_matches(x, weights, block_hidden=32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_batched_inputs(dtype: torch.dtype) -> None:
    weights = head_weights(123, dtype)
    sliced = hidden_states((5, 200), dtype)[:, 3:126]  # row stride 200, offset 3
    transposed = hidden_states((123, 17), dtype).T  # strides (1, 17)
    batched = hidden_states((3, 41, 130), dtype)[:, ::2, 7:]  # [B, T, H] that no view can flatten
    for x in (sliced, transposed, batched):
        assert not x.is_contiguous()
        assert_matches(x, weights)
    assert value_head(batched, **weights).shape == (3, 21)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_index_scores_only_chosen_positions(dtype: torch.dtype) -> None:
    """The last real token of each right-padded sequence, as best-of-n reranking reads it."""
    x, weights = hidden_states((4, 9, 123), dtype), head_weights(123, dtype)
    lengths = torch.tensor([9, 1, 5, 7])
    index = torch.arange(4) * 9 + lengths - 1
    for idx in (index, index.int()):
        out = assert_matches(x, weights, index=idx)
        torch.testing.assert_close(out, value_head(x, **weights, eps=1e-5).reshape(-1)[index])


def test_no_bias_and_fp32_norm_weight() -> None:
    """Without a bias; an fp32 norm weight with fp16 states gives a float32 weight product, as torch does."""
    x = hidden_states((7, 123), torch.float16)
    weights = {**head_weights(123, torch.float16), "score_bias": None}
    assert_matches(x, weights)
    mixed = {**weights, "norm_weight": weights["norm_weight"].float()}
    out = value_head(x, **mixed, eps=1e-5)
    torch.testing.assert_close(out, value_head_reference(x, **mixed, eps=1e-5), atol=1e-5, rtol=1e-5)


def test_empty_inputs() -> None:
    weights = head_weights(123, torch.float32)
    assert value_head(torch.randn(0, 123), **weights).shape == (0,)
    assert value_head(torch.randn(2, 0, 123), **weights).shape == (2, 0)
    empty_index = torch.zeros(0, dtype=torch.long)
    assert value_head(torch.randn(3, 123), **weights, index=empty_index).shape == (0,)


def test_bad_inputs_raise_input_error() -> None:
    weights = head_weights(64, torch.float32)
    with pytest.raises(InputError, match="hidden must be"):
        value_head(torch.randn(3, 64).double(), **weights)
    with pytest.raises(InputError, match="norm_weight must be"):
        value_head(torch.randn(3, 56), **weights)
    with pytest.raises(InputError, match="score_weight must be"):
        value_head(torch.randn(3, 64), **{**weights, "score_weight": torch.randn(2, 64)})
    with pytest.raises(InputError, match="score_bias must be"):
        value_head(torch.randn(3, 64), **{**weights, "score_bias": torch.randn(2)})
    with pytest.raises(InputError, match="at least 1"):
        value_head(torch.randn(3, 0), torch.randn(0), torch.randn(1, 0))
    with pytest.raises(InputError, match="index must be"):
        value_head(torch.randn(3, 64), **weights, index=torch.tensor([0.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), [*SHAPES, (16384, 5120), (3, 20000)])
def test_cuda_matches_hugging_face(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    x = hidden_states((tokens, hidden + 8), dtype, "cuda")[:, 8:]  # strided, offset start
    assert_matches(x, head_weights(hidden, dtype, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_index_and_batched(dtype: torch.dtype) -> None:
    x, weights = hidden_states((8, 1024, 5120), dtype, "cuda"), head_weights(5120, dtype, "cuda")
    assert_matches(x, weights)
    assert_matches(x, weights, index=torch.arange(8, device="cuda") * 1024 + 1023)
