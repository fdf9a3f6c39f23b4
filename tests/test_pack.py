"""GPTQ v1 packing (vexport/quant/pack.py), checked against the format's definition in FORMATS.md."""

from __future__ import annotations

import pytest
import torch

from vexport.errors import InputError
from vexport.quant.gptq import quantize_linear
from vexport.quant.pack import dequantize_gptq_v1, pack_gptq_v1, unpack_gptq_v1
from vexport.quant.reference import quantize_rtn
from vexport.quant.types import QuantizedWeight


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # every test sees the same draws: no test may pass by luck


def definition_unpack(tensors: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """Independent reader, straight from the definition, on Python ints: q[o][i] and zero[g][o].
    qweight[r, o] holds inputs 8r..8r+7, nibble j at bits 4j..4j+3; qzeros[g, c] holds outputs 8c..8c+7
    after adding 0x11111111 to the whole unsigned word (carries included)."""
    words = tensors["qweight"].tolist()
    out_f = len(words[0])
    q = [[0] * (8 * len(words)) for _ in range(out_f)]
    for r, row in enumerate(words):
        for o, word in enumerate(row):
            for j in range(8):
                q[o][8 * r + j] = ((word & 0xFFFFFFFF) >> (4 * j)) & 0xF
    zeros = []
    for row in tensors["qzeros"].tolist():
        restored = [((word & 0xFFFFFFFF) + 0x11111111) & 0xFFFFFFFF for word in row]
        zeros.append([(word >> (4 * j)) & 0xF for word in restored for j in range(8)])
    return q, zeros


def definition_dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]), element by element."""
    q, zeros = definition_unpack(tensors)
    scales, g_idx = tensors["scales"].float().tolist(), tensors["g_idx"].tolist()
    return torch.tensor(
        [[scales[g_idx[i]][o] * (q[o][i] - zeros[g_idx[i]][o]) for i in range(len(g_idx))] for o in range(len(q))]
    )


def random_quantized(out_f: int, in_f: int, group_size: int, seed: int, act_order: bool) -> QuantizedWeight:
    """Every code and zero point 0..15 (0 and 15 forced into the first word), a permuted g_idx if asked."""
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-in_f // group_size)
    zeros = torch.randint(0, 16, (n_groups, out_f), generator=g, dtype=torch.int32)
    zeros[0, :2] = torch.tensor([0, 15])
    g_idx = (torch.arange(in_f) // group_size).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n_groups, out_f, generator=g) * 0.1 + 1e-3).half().float()
    return QuantizedWeight(q, scales, zeros, g_idx, 4, group_size, sym=False, desc_act=act_order)


def assert_round_trip(qw: QuantizedWeight) -> None:
    tensors = pack_gptq_v1(qw)
    back = unpack_gptq_v1(tensors, group_size=qw.group_size, sym=qw.sym, desc_act=qw.desc_act)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    assert (back.bits, back.group_size, back.sym, back.desc_act) == (qw.bits, qw.group_size, qw.sym, qw.desc_act)
    q, zeros = definition_unpack(tensors)
    assert q == qw.q.tolist()
    assert zeros == qw.zeros.tolist()
    assert torch.equal(dequantize_gptq_v1(tensors, torch.float32), definition_dequantize(tensors))
    assert torch.equal(dequantize_gptq_v1(tensors, torch.float32), qw.dequantize())


def test_layout_dtypes_and_shapes() -> None:
    tensors = pack_gptq_v1(random_quantized(24, 72, 32, seed=0, act_order=False))
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    assert layout == {
        "qweight": (torch.int32, (9, 24)),
        "qzeros": (torch.int32, (3, 3)),
        "scales": (torch.float16, (3, 24)),
        "g_idx": (torch.int32, (72,)),
    }


def test_symmetric_round_trip_and_every_stored_zero_nibble_is_7() -> None:
    qw = quantize_rtn(torch.randn(16, 64), group_size=32, sym=True)
    assert_round_trip(qw)
    assert bool((pack_gptq_v1(qw)["qzeros"] == 0x77777777).all())
    assert unpack_gptq_v1(pack_gptq_v1(qw)).sym  # inferred from zeros all 8


def test_asymmetric_zero_points_0_and_15_survive_the_borrow() -> None:
    """Row 0 all >= 0 (zero 0), row 1 all <= 0 (zero 15): both in the first qzeros word."""
    weight = torch.randn(8, 32)
    weight[0] = weight[0].abs()
    weight[1] = -weight[1].abs()
    qw = quantize_rtn(weight, group_size=-1, sym=False)
    assert qw.zeros[0, :2].tolist() == [0, 15]
    assert_round_trip(qw)
    expected = (sum(z << (4 * j) for j, z in enumerate(qw.zeros[0].tolist())) - 0x11111111) % 2**32
    stored = pack_gptq_v1(qw)["qzeros"][0, 0].item() & 0xFFFFFFFF
    assert stored == expected


def test_all_zero_points_0_borrow_through_the_whole_word() -> None:
    weight = torch.rand(8, 16)  # every weight >= 0: every zero point is 0
    qw = quantize_rtn(weight, group_size=-1, sym=False)
    assert bool((qw.zeros == 0).all())
    assert pack_gptq_v1(qw)["qzeros"].item() == 0xEEEEEEEF - 2**32  # 0 - 0x11111111 as int32
    assert_round_trip(qw)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
def test_random_codes_round_trip(seed: int, act_order: bool) -> None:
    assert_round_trip(random_quantized(40, 80, 16, seed=seed, act_order=act_order))


def test_gptq_act_order_output_round_trips_and_is_inferred() -> None:
    inputs = torch.randn(512, 64) * torch.linspace(0.1, 3.0, 64).flip(0)[torch.randperm(64)]
    qw = quantize_linear(torch.randn(16, 64), inputs, group_size=16, sym=False, desc_act=True)
    assert_round_trip(qw)
    inferred = unpack_gptq_v1(pack_gptq_v1(qw))
    assert (inferred.group_size, inferred.desc_act) == (16, True)


@pytest.mark.parametrize(("out_f", "in_f"), [(12, 64), (16, 60)])
def test_dimensions_not_divisible_by_8_raise_input_error(out_f: int, in_f: int) -> None:
    with pytest.raises(InputError, match="divisible by 8"):
        pack_gptq_v1(quantize_rtn(torch.randn(out_f, in_f), group_size=-1))


def test_bits_other_than_4_or_8_raise_input_error() -> None:
    with pytest.raises(InputError, match="4 or 8 bits, got 3"):
        pack_gptq_v1(quantize_rtn(torch.randn(8, 16), bits=3, group_size=-1))
    tensors = pack_gptq_v1(quantize_rtn(torch.randn(8, 16), group_size=-1))
    with pytest.raises(InputError, match="shapes disagree at 8 bits"):
        unpack_gptq_v1(tensors, bits=8)


def test_bad_tensors_raise_input_error() -> None:
    tensors = pack_gptq_v1(quantize_rtn(torch.randn(8, 16), group_size=8))
    with pytest.raises(InputError, match="missing: g_idx"):
        unpack_gptq_v1({k: v for k, v in tensors.items() if k != "g_idx"})
    with pytest.raises(InputError, match="qweight must be int32"):
        unpack_gptq_v1({**tensors, "qweight": tensors["qweight"].long()})
    with pytest.raises(InputError, match="shapes disagree"):
        unpack_gptq_v1({**tensors, "g_idx": tensors["g_idx"][:8]})
    with pytest.raises(InputError, match="g_idx must lie"):
        unpack_gptq_v1({**tensors, "g_idx": tensors["g_idx"] + 5})


def test_group_size_that_disagrees_with_the_tensors_raises_input_error() -> None:
    tensors = pack_gptq_v1(quantize_rtn(torch.randn(8, 64), group_size=16))
    with pytest.raises(InputError, match="4 groups; group_size 32"):
        unpack_gptq_v1(tensors, group_size=32)
