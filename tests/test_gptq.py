"""GPTQ (vexport/quant/gptq.py) and its reference rules (vexport/quant/reference.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from vexport.errors import InputError
from vexport.quant.gptq import GPTQQuantizer, inverse_hessian_cholesky, quantize_linear
from vexport.quant.reference import grid_params, quantize_codes, quantize_rtn, quantize_tensor
from vexport.quant.types import QuantizedWeight


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # every test sees the same draws: no test may pass by luck


OUT_FEATURES = 64
MAX_RATIO = 0.8  # GPTQ's held-out output error must be at most this fraction of RTN's


def correlated_inputs(in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and held-out inputs of one distribution: Gaussian rows mixed by a fixed random matrix
    with singular values from 1 down to 1e-2, then per-channel scales (so diag(H) varies and act-order
    has something to sort). Calibration has 16 I rows, as real calibration sets have many more tokens than I."""
    g = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))[0]
    right = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))[0]
    mixing = (left * torch.logspace(0, -2, in_f)[None, :]) @ right
    channel_scale = torch.exp(0.5 * torch.randn(in_f, generator=g))
    calib = (torch.randn(16 * in_f, in_f, generator=g) @ mixing) * channel_scale
    held_out = (torch.randn(2048, in_f, generator=g) @ mixing) * channel_scale
    return calib, held_out


def output_error(x: torch.Tensor, weight: torch.Tensor, qw: QuantizedWeight) -> float:
    return float(torch.linalg.norm(x @ weight.T - x @ qw.dequantize().T))


@pytest.fixture(scope="module", params=[256, 576], ids=["I256", "I576"])
def layer(request) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    in_f = request.param
    weight = torch.randn(OUT_FEATURES, in_f, generator=torch.Generator().manual_seed(in_f))
    calib, held_out = correlated_inputs(in_f, seed=in_f + 1)
    return weight, calib, held_out


@pytest.mark.parametrize("desc_act", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [128, -1])
def test_gptq_beats_rtn_on_correlated_inputs(layer, group_size: int, sym: bool, desc_act: bool) -> None:
    weight, calib, held_out = layer
    qw = quantize_linear(weight, calib, group_size=group_size, sym=sym, desc_act=desc_act)
    rtn = quantize_rtn(weight, group_size=group_size, sym=sym)
    assert qw.num_groups == rtn.num_groups == (1 if group_size == -1 else -(-weight.shape[1] // 128))
    ratio = output_error(held_out, weight, qw) / output_error(held_out, weight, rtn)
    logging.getLogger(__name__).info("GPTQ/RTN held-out error ratio %.3f", ratio)
    assert ratio <= MAX_RATIO, f"GPTQ/RTN output error ratio {ratio:.3f}"


def test_shorter_last_group_when_group_size_does_not_divide_inputs() -> None:
    calib, _ = correlated_inputs(576, seed=3)
    qw = quantize_linear(torch.randn(16, 576), calib[:4096], group_size=128, desc_act=True)
    assert qw.num_groups == 5
    counts = torch.bincount(qw.g_idx.long(), minlength=5)
    assert counts.tolist() == [128, 128, 128, 128, 64]


def naive_gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, sym: bool) -> torch.Tensor:
    """The paper's algorithm with no blocks and no laziness: after each column, update every later one."""
    w = weight.clone()
    upper, _ = inverse_hessian_cholesky(hessian, 0.01)
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            scale, zero = grid_params(w[:, j : j + group_size], 4, sym)
        out[:, j] = quantize_tensor(w[:, j], scale, zero, 15)
        err = (w[:, j] - out[:, j]) / upper[j, j]
        w[:, j:] -= err[:, None] * upper[j, j:][None, :]
    return out


@pytest.mark.parametrize("block_size", [48, 128], ids=["blocks_cut_groups", "blocks_hold_groups"])
def test_lazy_block_updates_match_the_unblocked_algorithm(block_size: int) -> None:
    """Blocks of 48 columns cut groups of 32 mid-block; group parameters must still see every update."""
    calib, _ = correlated_inputs(160, seed=5)
    weight = torch.randn(24, 160, generator=torch.Generator().manual_seed(6))
    quantizer = GPTQQuantizer(weight)
    quantizer.add_batch(calib)
    qw = quantizer.quantize(group_size=32, sym=False, block_size=block_size)
    expected = naive_gptq(weight, quantizer.hessian, 32, sym=False)
    mismatched = (qw.dequantize() - expected).abs() > 1e-4
    assert mismatched.float().mean() < 2e-3  # a rare rounding tie may flip from float summation order


def test_act_order_groups_follow_descending_hessian_diagonal() -> None:
    calib, _ = correlated_inputs(192, seed=7)
    quantizer = GPTQQuantizer(torch.randn(16, 192))
    quantizer.add_batch(calib)
    qw = quantizer.quantize(group_size=64, desc_act=True)
    order = torch.argsort(torch.diagonal(quantizer.hessian), descending=True)
    assert torch.equal(qw.g_idx[order], torch.arange(192, dtype=torch.int32) // 64)
    assert not torch.equal(qw.g_idx, torch.arange(192, dtype=torch.int32) // 64)
    assert qw.desc_act


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_dequantized_values_lie_on_the_grid(sym: bool, desc_act: bool) -> None:
    calib, _ = correlated_inputs(96, seed=8)
    qw = quantize_linear(torch.randn(16, 96), calib, group_size=32, sym=sym, desc_act=desc_act)
    assert (qw.q.dtype, qw.scales.dtype, qw.zeros.dtype, qw.g_idx.dtype) == (
        torch.uint8, torch.float32, torch.int32, torch.int32,
    )  # fmt: skip
    assert int(qw.q.max()) <= 15 and int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= 15
    if sym:
        assert bool((qw.zeros == 8).all())
    scale = qw.scales[qw.g_idx.long()].T
    codes = qw.dequantize() / scale + qw.zeros[qw.g_idx.long()].T
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert torch.equal(qw.scales, qw.scales.half().float())  # float16-exact: packing loses nothing


def test_dead_inputs_quantize_to_zero_without_nans() -> None:
    calib, _ = correlated_inputs(64, seed=9)
    calib[:, [3, 40]] = 0.0
    qw = quantize_linear(torch.randn(8, 64), calib, group_size=32)
    dequantized = qw.dequantize()
    assert bool(torch.isfinite(dequantized).all())
    assert bool((dequantized[:, [3, 40]] == 0).all())


def test_dampening_is_raised_when_cholesky_fails(caplog: pytest.LogCaptureFixture) -> None:
    """Rank-3 inputs give a singular H; with a tiny dampening the float32 Cholesky fails."""
    g = torch.Generator().manual_seed(10)
    inputs = torch.randn(512, 3, generator=g) @ torch.randn(3, 64, generator=g)
    quantizer = GPTQQuantizer(torch.randn(16, 64, generator=g))
    quantizer.add_batch(inputs)
    with caplog.at_level(logging.WARNING, logger="vexport.quant.gptq"):
        qw = quantizer.quantize(group_size=32, damp_percent=1e-10)
    assert quantizer.damp_percent_used is not None and quantizer.damp_percent_used > 1e-10
    assert "Cholesky failed" in caplog.text
    assert bool(torch.isfinite(qw.dequantize()).all())


def test_dampening_gives_up_with_input_error_on_an_indefinite_matrix() -> None:
    with pytest.raises(InputError, match="not positive definite"):
        inverse_hessian_cholesky(-torch.eye(8), 0.01)


def test_hessian_is_the_running_average_of_2_x_xt() -> None:
    x = torch.randn(3, 7, 24)
    quantizer = GPTQQuantizer(torch.randn(8, 24))
    quantizer.add_batch(x[:1])
    quantizer.add_batch(x[1:])
    rows = x.reshape(-1, 24)
    assert quantizer.nsamples == 21
    assert torch.allclose(quantizer.hessian, 2 / 21 * rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_reference_rule_rounds_clamps_and_maps_back() -> None:
    x = torch.tensor([-3.0, -2.1, 0.1, 0.13, 1.8, 5.0])
    scale, zero = torch.tensor(0.25), torch.tensor(8.0)
    assert quantize_codes(x, scale, zero, 15).tolist() == [0, 0, 8, 9, 15, 15]
    assert quantize_tensor(x, scale, zero, 15).tolist() == [-2.0, -2.0, 0.0, 0.25, 1.75, 1.75]


def test_grid_params_rules() -> None:
    w = torch.tensor([[-1.5, 0.0, 3.0], [0.5, 1.0, 2.0], [-4.0, -1.0, -0.5], [0.0, 0.0, 0.0]])
    scale, zero = grid_params(w, 4, sym=False)
    assert torch.allclose(scale, torch.tensor([4.5, 2.0, 4.0, 2.0]) / 15, rtol=1e-3)
    assert zero.tolist() == [5.0, 0.0, 15.0, 8.0]  # min<=0<=max: all >= 0 gives zero 0, all <= 0 gives 15
    scale, zero = grid_params(w, 4, sym=True)
    assert torch.allclose(scale, torch.tensor([6.0, 4.0, 8.0, 2.0]) / 15, rtol=1e-3)
    assert zero.tolist() == [8.0] * 4


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_about_half_a_step(sym: bool) -> None:
    """Half a step, plus a sliver: the float16-rounded scale can fall short of the range by maxq * 2^-12."""
    weight = torch.randn(16, 100)
    qw = quantize_rtn(weight, group_size=32, sym=sym)
    assert qw.num_groups == 4
    step = qw.scales[qw.g_idx.long()].T
    ratio = (weight - qw.dequantize()).abs() / step
    assert float(ratio.max()) <= 0.5 + 15 * 2**-11
    assert float(ratio.max()) > 0.45  # the bound is reached, not vacuous


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"damp_percent": 0.0}, "damp_percent"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_options_raise_input_error(kwargs: dict, message: str) -> None:
    quantizer = GPTQQuantizer(torch.randn(8, 16))
    quantizer.add_batch(torch.randn(32, 16))
    with pytest.raises(InputError, match=message):
        quantizer.quantize(**kwargs)


def test_bad_inputs_raise_input_error() -> None:
    quantizer = GPTQQuantizer(torch.randn(8, 16))
    with pytest.raises(InputError, match="add_batch"):
        quantizer.quantize()
    with pytest.raises(InputError, match="last dimension 16"):
        quantizer.add_batch(torch.randn(4, 15))
    with pytest.raises(InputError, match="NaN"):
        GPTQQuantizer(torch.full((8, 16), float("nan")))
    with pytest.raises(InputError, match="floating-point"):
        GPTQQuantizer(torch.ones(8, 16, dtype=torch.int64))


def drifted(x: torch.Tensor, seed: int) -> torch.Tensor:
    """What a quantized model feeds a Linear instead of X: a fixed linear distortion plus noise."""
    g = torch.Generator().manual_seed(seed)
    distortion = torch.eye(x.shape[1]) + 0.05 * torch.randn(x.shape[1], x.shape[1], generator=g)
    return x @ distortion + 0.02 * x.std() * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("desc_act", [False, True], ids=["natural", "act_order"])
def test_float_targets_undo_the_drift_of_earlier_layers(layer, desc_act: bool) -> None:
    """With the float model's inputs as targets, W_q x_drifted lands nearer W x_float on held-out rows than
    GPTQ on the drifted inputs alone, which can only reproduce W x_drifted."""
    weight, calib, held_out = layer
    plain, targeted = GPTQQuantizer(weight), GPTQQuantizer(weight)
    for chunk in calib.split(512):
        plain.add_batch(drifted(chunk, 1))
        targeted.add_batch(drifted(chunk, 1), target=chunk)
    options = {"group_size": 128, "desc_act": desc_act}
    x_q = drifted(held_out, 1)

    def error(qw: QuantizedWeight) -> float:
        return float(torch.linalg.norm(x_q @ qw.dequantize().T - held_out @ weight.T))

    assert error(targeted.quantize(**options)) < 0.7 * error(plain.quantize(**options))


def test_float_targets_on_undrifted_inputs_are_plain_gptq(layer) -> None:
    """When the quantized path's inputs equal the float ones, W' = W (H + lambda I)^-1 H is W up to the
    dampening: the result stays within a hair of plain GPTQ's."""
    weight, calib, held_out = layer
    plain, targeted = GPTQQuantizer(weight), GPTQQuantizer(weight)
    plain.add_batch(calib)
    targeted.add_batch(calib, target=calib)
    a, b = plain.quantize(group_size=128), targeted.quantize(group_size=128)
    assert output_error(held_out, weight, b) < 1.1 * output_error(held_out, weight, a)


def test_float_targets_must_be_given_for_every_batch_or_none(layer) -> None:
    weight, calib, _ = layer
    quantizer = GPTQQuantizer(weight)
    quantizer.add_batch(calib[:64], target=calib[:64])
    with pytest.raises(InputError, match="every calibration batch or for none"):
        quantizer.add_batch(calib[64:128])
    with pytest.raises(InputError, match="must match the inputs"):
        GPTQQuantizer(weight).add_batch(calib[:64], target=calib[:32])


def test_float_target_dampening_must_be_positive(layer) -> None:
    weight, calib, _ = layer
    quantizer = GPTQQuantizer(weight)
    quantizer.add_batch(calib[:64], target=calib[:64])
    with pytest.raises(InputError, match="target_damp_percent must be positive"):
        quantizer.quantize(target_damp_percent=0.0)
