"""The fused int4 GPTQ matmul (kernels/int4_matmul.py) against its torch reference (kernels/reference.py).

Both sides multiply the same dequantized weights (rounded to x's dtype) and sum in float32, so the
tolerance covers summation order and one rounding of the output only: quantization error never enters.
On the CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it).
"""

from __future__ import annotations

import pytest
import torch

from vexport.errors import InputError
from vexport.kernels.int4_matmul import int4_matmul
from vexport.kernels.reference import int4_matmul_reference
from vexport.quant.pack import pack_gptq_v1
from vexport.quant.types import QuantizedWeight


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # every test sees the same draws: no test may pass by luck


# (atol, rtol): one output rounding in the dtype (rtol ~ 1 ulp) plus float32 summation order
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
GPU_TOLERANCE = {  # inputs of ~1000: summation-order error grows with I
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}
DTYPES = list(TOLERANCE)


def gptq_tensors(out_f: int, in_f: int, group_size: int, act_order: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random codes and zero points over the full 0..15 range (0 and 15 included), positive scales."""
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-in_f // group_size)
    g_idx = (torch.arange(in_f) // group_size).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    zeros = torch.randint(0, 16, (n_groups, out_f), generator=g, dtype=torch.int32)
    zeros[0, :2] = torch.tensor([0, 15])
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n_groups, out_f, generator=g) * 0.05 + 0.005).half().float()
    return pack_gptq_v1(QuantizedWeight(q, scales, zeros, g_idx, 4, group_size, False, act_order))


def assert_matches_reference(x: torch.Tensor, tensors: dict[str, torch.Tensor], bias, tolerance) -> None:
    out = int4_matmul(x, **tensors, bias=bias)
    expected = int4_matmul_reference(x, **tensors, bias=bias)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert bool(expected.abs().amax() > 0.5)  # not a vacuous comparison of near-zeros
    atol, rtol = tolerance[x.dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("in_f", "out_f"), [(64, 24), (136, 72)])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_act_order_with_bias_matches_reference(dtype: torch.dtype, in_f: int, out_f: int, m: int) -> None:
    tensors = gptq_tensors(out_f, in_f, group_size=32, act_order=True, seed=m + in_f)
    x = torch.randn(m, in_f).to(dtype)
    bias = torch.randn(out_f).to(dtype)
    assert_matches_reference(x, tensors, bias, TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [32, -1])
def test_natural_order_without_bias_matches_reference(dtype: torch.dtype, group_size: int) -> None:
    size = 136 if group_size == -1 else group_size
    tensors = gptq_tensors(72, 136, group_size=size, act_order=False, seed=7)
    assert_matches_reference(torch.randn(5, 136).to(dtype), tensors, None, TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_x_matches_reference(dtype: torch.dtype) -> None:
    tensors = gptq_tensors(24, 64, group_size=16, act_order=True, seed=8)
    transposed = torch.randn(64, 17).to(dtype).T  # strides (1, 17)
    sliced = torch.randn(5, 200).to(dtype)[:, 3:67]  # row stride 200, offset 3
    for x in (transposed, sliced):
        assert not x.is_contiguous()
        assert_matches_reference(x, tensors, None, TOLERANCE)


def test_act_order_g_idx_is_honoured() -> None:
    """The permuted g_idx must matter: with the same words read as natural order, results differ."""
    tensors = gptq_tensors(24, 64, group_size=16, act_order=True, seed=9)
    x = torch.randn(5, 64)
    natural = {**tensors, "g_idx": (torch.arange(64) // 16).to(torch.int32)}
    out = int4_matmul(x, **tensors)
    assert not torch.allclose(out, int4_matmul(x, **natural), atol=1e-2)
    atol, rtol = TOLERANCE[torch.float32]
    torch.testing.assert_close(out, int4_matmul_reference(x, **tensors), atol=atol, rtol=rtol)


def test_empty_batch_returns_empty() -> None:
    tensors = gptq_tensors(24, 64, group_size=16, act_order=False, seed=10)
    assert int4_matmul(torch.randn(0, 64), **tensors).shape == (0, 24)


def test_bad_inputs_raise_input_error() -> None:
    tensors = gptq_tensors(24, 64, group_size=16, act_order=False, seed=11)
    with pytest.raises(InputError, match="does not match qweight"):
        int4_matmul(torch.randn(3, 56), **tensors)
    with pytest.raises(InputError, match="x must be 2-D"):
        int4_matmul(torch.randn(3, 64).double(), **tensors)
    with pytest.raises(InputError, match="bias must be"):
        int4_matmul(torch.randn(3, 64), **tensors, bias=torch.randn(23))
    with pytest.raises(InputError, match="qzeros must be int32"):
        int4_matmul(torch.randn(3, 64), **{**tensors, "qzeros": tensors["qzeros"].long()})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 17, 100, 257])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
def test_cuda_matches_reference(dtype: torch.dtype, m: int, act_order: bool) -> None:
    tensors = {k: v.cuda() for k, v in gptq_tensors(2056, 1032, 128, act_order, seed=m).items()}
    x = torch.randn(m, 1032 + 8, device="cuda").to(dtype)[:, 8:]  # strided, offset start
    bias = torch.randn(2056, device="cuda").to(dtype)
    assert_matches_reference(x, tensors, bias, GPU_TOLERANCE)
