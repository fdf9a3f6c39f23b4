"""The packed int4 CPU path (vexport/backends/int4_cpu.py) against the dequantized reference on the same weights."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from vexport.backends import int4_cpu
from vexport.backends.gptq import QuantLinear, dequantized_linears, pack_linears_for_cpu
from vexport.parity import sqnr_db as _sqnr_1d
from vexport.export.rtn import write_rtn_checkpoint
from vexport.quant.checkpoint import quantize_rtn_act_order
from vexport.quant.pack import pack_gptq_v1
from vexport.quant.reference import quantize_rtn
from vexport.runtime import load

pytestmark = pytest.mark.skipif(int4_cpu.unsupported_reason(16, torch.zeros(32, dtype=torch.int32), 1) is not None,
                                reason="the packed int4 CPU op does not run here")

# activation dtype: (atol relative to the reference's max |y|, rtol); the op computes in bfloat16 either way
TOLERANCE = {torch.float32: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
LINEAR_CASES = {  # id: (in, out, group size, sym, act-order, bias)
    "g32-sym": (64, 48, 32, True, False, False),
    "g64-asym-bias": (128, 32, 64, False, False, True),
    "g32-act-asym": (96, 16, 32, False, True, True),
    "g128-act-sym": (256, 64, 128, True, True, False),
    "one-group": (128, 32, -1, False, False, False),
    "g128-short-last-group": (192, 16, 128, False, False, True),  # groups of 128 and 64: run as 64s
    "g512-act-as-256s": (1024, 16, 512, False, True, False),  # two groups, each run as two of 256
}


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return _sqnr_1d(reference.detach().flatten().float(), candidate.detach().flatten().float())


def quant_linear(in_f: int, out_f: int, group_size: int, sym: bool, act_order: bool, bias: bool,
                 seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen)
    qw = quantize_rtn_act_order(weight, group_size, sym) if act_order else quantize_rtn(weight, 4, group_size, sym)
    b = torch.randn(out_f, generator=gen) if bias else None
    return QuantLinear.from_packed(pack_gptq_v1(qw), b)


@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str))
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_packed_linear_matches_dequantized(case, dtype):
    in_f, out_f, group_size, sym, act_order, bias = LINEAR_CASES[case]
    layer = quant_linear(in_f, out_f, group_size, sym, act_order, bias)
    assert layer.pack_for_cpu() is None
    assert (layer.cpu_int4.perm is not None) == act_order  # act-order permutes the input columns at load
    x = torch.randn(3, 7, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = x.float() @ layer.dequantized_weight(torch.float32).T + (layer.bias if bias else 0)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 7, out_f)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), reference, atol=atol * float(reference.abs().max()), rtol=rtol)
    assert sqnr_db(reference, out.float()) > 35


def test_act_order_needs_the_column_permutation():
    """Packing an act-order checkpoint's columns in stored order (as if g_idx were i // group) is wrong:
    the permutation is what makes the path exact."""
    layer = quant_linear(96, 16, 32, False, True, False)
    layer.pack_for_cpu()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    reference = x @ layer.dequantized_weight(torch.float32).T
    unpermuted = int4_cpu.PackedInt4(layer.cpu_int4.weight, layer.cpu_int4.scale_and_zeros, 32, None)
    assert sqnr_db(reference, int4_cpu.int4_linear(x[:, layer.cpu_int4.perm], layer.cpu_int4, None)) < 20
    assert sqnr_db(reference, int4_cpu.int4_linear(x, unpermuted, None)) < 20
    assert sqnr_db(reference, layer(x)) > 35


def test_unsupported_linears_keep_the_dequantized_path(caplog):
    odd_out = quant_linear(64, 24, 32, True, False, False)  # 24 outputs: not a multiple of 16
    small_groups = quant_linear(64, 32, 16, False, False, False)  # groups of 16: the op takes 32..256
    fine = quant_linear(64, 32, 32, False, False, False)
    with caplog.at_level(logging.INFO, logger="vexport.backends.gptq"):
        assert pack_linears_for_cpu(nn.Sequential(odd_out, small_groups, fine)) == 1
    assert "out_features 24 is not a multiple of 16" in caplog.text
    assert "group size 16 is not a multiple of 32" in caplog.text
    assert odd_out.cpu_int4 is None and small_groups.cpu_int4 is None and fine.cpu_int4 is not None
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(odd_out(x), x @ odd_out.dequantized_weight(torch.float32).T)
    assert "AVX2" in int4_cpu.unsupported_reason(32, fine.g_idx, 2, capability="AVX2")


@pytest.fixture(scope="module")
def int4_model(tiny_gqa_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int4cpu") / "g32-act-asym"
    return load(write_rtn_checkpoint(tiny_gqa_model_dir, folder, group_size=32, sym=False, desc_act=True))


def _quant_linears(model) -> list[QuantLinear]:
    return [m for m in model.runner.module.modules() if isinstance(m, QuantLinear)]


def test_loaded_folder_uses_the_packed_path_and_matches_the_reference(int4_model):
    layers = _quant_linears(int4_model)
    assert layers and all(m.cpu_int4 is not None and m.cpu_int4.perm is not None for m in layers)
    ids = torch.randint(4, 1000, (2, 17), generator=torch.Generator().manual_seed(4))
    fast = int4_model.values(ids)
    with dequantized_linears(int4_model.runner.module):
        reference = int4_model.values(ids)
    assert all(m.cpu_int4 is not None for m in layers)  # restored
    assert sqnr_db(reference, fast) > 30
    torch.testing.assert_close(fast, reference, atol=5e-2, rtol=0)


def test_sessions_and_score_group_equal_their_full_recomputation(int4_model):
    """The value-guided session and score_group run the same packed Linears: they equal the full forward
    within test_decoding's float32 tolerance."""
    atol = 1e-4
    prompt = torch.randint(4, 1000, (11,), generator=torch.Generator().manual_seed(5))
    session = int4_model.session(prompt)
    torch.testing.assert_close(session.values, int4_model.values(prompt[None])[0], atol=atol, rtol=0)
    chunks = [[5, 6, 7], [9], [300, 301]]
    values = session.score(chunks)
    expected = torch.tensor([float(int4_model.values(torch.cat([prompt, torch.tensor(c)])[None])[0, -1])
                             for c in chunks])
    torch.testing.assert_close(values, expected, atol=atol, rtol=0)
    responses = [[5, 6, 7], [14, 15]]
    for response, got in zip(responses, int4_model.score_group(prompt, responses)):
        full = int4_model.values(torch.cat([prompt, torch.tensor(response)])[None])[0, len(prompt):]
        torch.testing.assert_close(torch.as_tensor(got), full, atol=atol, rtol=0)


needs_dense = pytest.mark.skipif(int4_cpu.dense_unavailable_reason() is not None,
                                 reason=f"prefill='bfloat16' unavailable: {int4_cpu.dense_unavailable_reason()}")


@needs_dense
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_bfloat16_prefill_copies_match_dequantized_and_only_take_prefills(case):
    in_f, out_f, group_size, sym, act_order, bias = LINEAR_CASES[case]
    layer = quant_linear(in_f, out_f, group_size, sym, act_order, bias)
    assert layer.pack_for_cpu(dense=True) is None and layer.cpu_int4.dense is not None
    packed = layer.cpu_int4
    int4_only = int4_cpu.PackedInt4(packed.weight, packed.scale_and_zeros, packed.group_size, packed.perm)
    gen = torch.Generator().manual_seed(6)
    for rows in (1, int4_cpu.DENSE_MIN_ROWS - 1, int4_cpu.DENSE_MIN_ROWS, 70):
        x = torch.randn(rows, in_f, generator=gen)
        reference = x @ layer.dequantized_weight(torch.float32).T + (layer.bias if bias else 0)
        out = layer(x)
        atol, rtol = TOLERANCE[torch.bfloat16]
        torch.testing.assert_close(out, reference, atol=atol * float(reference.abs().max()), rtol=rtol)
        assert sqnr_db(reference, out) > 35
        if rows < int4_cpu.DENSE_MIN_ROWS:  # few rows: the int4 op, bit for bit
            assert torch.equal(out, int4_cpu.int4_linear(x, int4_only, layer.bias))
        else:  # a prefill: the bfloat16 copy (columns in their own order, act-order or not)
            dense = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed.dense, None, "none", [], "").float()
            assert torch.equal(out, dense + (layer.bias if bias else 0))


@needs_dense
def test_bfloat16_load_matches_the_reference_in_prefill_and_sessions(tiny_gqa_model_dir, tmp_path):
    folder = write_rtn_checkpoint(tiny_gqa_model_dir, tmp_path / "int4", group_size=32, sym=False, desc_act=True)
    reference_model = load(folder)
    fast = load(folder, dtype="bfloat16", cpu_prefill="bfloat16")
    layers = _quant_linears(fast)
    assert layers and all(m.cpu_int4.dense is not None for m in layers)
    assert fast.runner.dtype == torch.bfloat16
    ids = torch.randint(4, 1000, (2, 40), generator=torch.Generator().manual_seed(7))
    with dequantized_linears(reference_model.runner.module):
        reference = reference_model.values(ids)
    got = fast.values(ids)
    assert got.dtype == torch.float32 and sqnr_db(reference, got) > 25
    # a session's steps take the int4 op, its prompt and the full forward the bfloat16 copies: bfloat16 apart
    prompt = ids[0, :30]
    session = fast.session(prompt)
    chunks = [[5, 6, 7], [9]]
    expected = torch.tensor([float(fast.values(torch.cat([prompt, torch.tensor(c)])[None])[0, -1]) for c in chunks])
    scale = float(reference.abs().max())
    torch.testing.assert_close(session.score(chunks), expected, atol=5e-2 * scale, rtol=0)


def test_cpu_prefill_is_checked(tiny_gqa_model_dir):
    from vexport.errors import InputError

    with pytest.raises(InputError, match="cpu_prefill 'fp8' is not one of int4, bfloat16"):
        load(tiny_gqa_model_dir, cpu_prefill="fp8")


@needs_dense
def test_bench_script_runs_every_method_and_reports_their_bytes(tiny_gqa_model_dir):
    """scripts/bench_int4_cpu.py end to end on the tiny model (1 repeat: code paths and fidelity, not speed)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_int4_cpu.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(tiny_gqa_model_dir), "--group-size", "32",
                           "--repeats", "1", "--steps", "2", "--sweep"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout[done.stdout.index("{"):])
    methods = {"int4_packed", "int4_packed_bf16", "int4_bf16_prefill", "int4_dequantized"}
    assert set(results["ratios_vs_float32"]["prefill"]) == methods == set(results["ratios_vs_float32"]["steps"])
    held = results["decoder_linear_weight_mb"]
    assert held["int4_packed"] == held["int4_packed_bf16"] < held["int4_bf16_prefill"] < held["float32"]
    assert min(results["sqnr_db_prefill"][f"{m}_vs_dequantized"] for m in methods - {"int4_dequantized"}) > 20
    assert set(results["row_sweep"]["ms_per_call"]) == {"1", "2", "4", "8", "16", "32", "64", "256"}
