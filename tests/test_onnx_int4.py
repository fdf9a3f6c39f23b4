"""int4 ONNX (MatMulNBits) from GPTQ checkpoints, on real ONNX Runtime sessions, against the int4 torch runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli
from vexport.artifact import staging_dir
from vexport.backends.gptq import GPTQRunner, dequantized_linears
from vexport.errors import VexportError
from vexport.export.common import copy_support_files, value_io_spec, write_manifest
from vexport.export.graph.int4_ort import matmul_nbits_tensors, plan_blocks
from vexport.export.onnx import export_onnx
from vexport.export.rtn import write_rtn_checkpoint
from vexport.manifest import read_manifest
from vexport.model import open_model
from vexport.parity import sqnr_db
from vexport.quant.checkpoint import (
    ShardWriter,
    gptq_quantization_config,
    linear_prefixes,
    write_gptq_config,
)
from vexport.quant.gptq import quantize_linear
from vexport.quant.pack import dequantize_gptq_v1, pack_gptq_v1
from vexport.quant.reference import quantize_rtn
from vexport.runtime import load
from vexport.tiny import make_tiny_value_model

CASES = {  # id: (model, group size, desc_act, sym); "odd" is hidden 96 / intermediate 160
    "g32": ("tiny", 32, False, True),
    "g32-act-asym": ("tiny", 32, True, False),
    "gqa-g64-act": ("gqa", 64, True, True),
    "odd-g64": ("odd", 64, False, False),  # K = 96 and 160: the last block is padded
    "odd-g96-act": ("odd", 96, True, True),  # a group of 96 = 3 blocks of 32; K = 96 in one padded block of 128
    "per-channel": ("tiny", -1, False, True),
    "bias-g16": ("bias", 16, False, False),
    "gptq-act": ("gptq", 32, True, False),  # the GPTQ solver with act-order on correlated inputs
}


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_gqa_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    odd = make_tiny_value_model(root / "odd", seed=2, hidden_size=96, intermediate_size=160)
    return {"tiny": tiny_model_dir, "gqa": tiny_gqa_model_dir, "odd": odd,
            "bias": _with_linear_biases(tiny_model_dir, root / "bias")}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, models, tmp_path_factory):
    kind, group_size, desc_act, sym = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    if kind == "gptq":
        folder = _gptq_solver_checkpoint(models["tiny"], root / "gptq", group_size)
    else:
        folder = write_rtn_checkpoint(models[kind], root / "gptq", group_size=group_size, sym=sym, desc_act=desc_act)
    return request.param, folder, export_onnx(folder, root / "onnx", optimize=False)  # fused: test_onnx_fused.py


def _with_linear_biases(src, dst):
    """The tiny model with attention_bias and mlp_bias: every decoder Linear gets a random bias."""
    dst.mkdir()
    copy_support_files(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "attention_bias": True, "mlp_bias": True}))
    state, gen = load_file(src / "model.safetensors"), torch.Generator().manual_seed(3)
    for name in [n for n in state if n.endswith("_proj.weight")]:
        state[name.replace(".weight", ".bias")] = 0.1 * torch.randn(state[name].shape[0], generator=gen)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _calibration(width: int, gen: torch.Generator) -> torch.Tensor:
    """Correlated inputs with uneven column scales, so act-order really reorders."""
    mix = torch.randn(width, width, generator=gen) / width**0.5
    return (torch.randn(256, width, generator=gen) @ mix) * (0.1 + 3 * torch.rand(width, generator=gen))


def _gptq_solver_checkpoint(model_dir, out, group_size: int):
    """A GPTQ folder written as the streaming quantizer writes one: ShardWriter, write_gptq_config, manifest.
    Linears of the same input width share calibration inputs (so q/k/v share their act-order)."""
    source, gen, inputs = open_model(model_dir), torch.Generator().manual_seed(0), {}
    qconfig = gptq_quantization_config(4, group_size, desc_act=True, sym=False)
    with staging_dir(out) as tmp:
        writer = ShardWriter(tmp)
        for layer in range(source.config.num_hidden_layers):
            tensors = {}
            for prefix in linear_prefixes(layer):
                weight = source.read_tensor(f"{prefix}.weight").float()
                x = inputs.setdefault(weight.shape[1], _calibration(weight.shape[1], gen))
                qw = quantize_linear(weight, x, bits=4, group_size=group_size, sym=False, desc_act=True)
                tensors.update({f"{prefix}.{k}": v for k, v in pack_gptq_v1(qw).items()})
            writer.add(tensors)
        writer.add({n: source.read_tensor(n).half() for n in source.tensors if not n.endswith("_proj.weight")})
        writer.finish()
        copy_support_files(source.path, tmp)
        write_gptq_config(tmp, source.config, qconfig)
        write_manifest(tmp, "gptq", "int4", source, value_io_spec(), {**qconfig, "method": "gptq"})
    return out


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (3, 29), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, :7] = 0
    return ids, mask


def test_int4_onnx_matches_int4_torch(case):
    name, folder, onnx_dir = case
    torch_model, onnx_model = load(folder), load(onnx_dir)
    assert (onnx_model.format, onnx_model.precision) == ("onnx", "int4")
    ids, mask = _batch(torch_model.config.vocab_size)
    real = mask.bool()
    with dequantized_linears(torch_model.runner.module):  # float compute, as the graph (not the bf16 packed path)
        expected = torch_model.values(ids, mask)[real].numpy()
    got = onnx_model.values(ids, mask)[real].numpy()
    assert sqnr_db(expected, got) > 60, name
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_graph_has_matmul_nbits_only(case):
    name, folder, onnx_dir = case
    graph = onnx.load(onnx_dir / "model.onnx", load_external_data=False)
    config, initializers = open_model(folder).config, {t.name for t in graph.graph.initializer}
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * config.num_hidden_layers
    assert {n.domain for n in nbits} == {"com.microsoft"}
    assert {(o.domain, o.version) for o in graph.opset_import} == {("", 17), ("com.microsoft", 1)}
    weight_matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and set(n.input) & initializers]
    assert [n.input[1] for n in weight_matmuls] == ["score_weight"]  # no float MatMul on a decoder Linear
    for node in nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] in (16, 32, 64, 128)
        assert len(node.input) == (6 if name.startswith("bias") else 4)


def test_manifest_records_int4(case):
    name, folder, onnx_dir = case
    options = read_manifest(onnx_dir).format_options
    _, group_size, desc_act, sym = CASES[name]
    assert (options["activation_dtype"], options["bits"], options["group_size"]) == ("float32", 4, group_size)
    assert (options["desc_act"], options["sym"], options["checkpoint_format"]) == (desc_act, sym, "gptq")
    assert options["operator_counts"]["MatMulNBits"] == 14
    gathers = options["act_order_gathers"]
    assert (gathers > 0) == desc_act
    if name == "gptq-act":  # one Gather per input tensor and layer: q/k/v share one, gate/up another
        assert gathers == 4 * 2


def test_block_sizes_follow_groups(case):
    name, _, onnx_dir = case
    expected = {"g32": [32], "g32-act-asym": [32], "gqa-g64-act": [64], "odd-g64": [64], "odd-g96-act": [32, 128],
                "per-channel": [64, 128], "bias-g16": [16], "gptq-act": [32]}
    assert read_manifest(onnx_dir).format_options["matmul_nbits_block_sizes"] == expected[name]


def test_float16_activations(models, tmp_path):
    folder = write_rtn_checkpoint(models["odd"], tmp_path / "gptq", group_size=64, desc_act=True)
    onnx16 = export_onnx(folder, tmp_path / "onnx16", dtype="float16")
    assert read_manifest(onnx16).format_options["activation_dtype"] == "float16"
    ids, mask = _batch(1000)
    real = mask.bool()
    runner = GPTQRunner(folder, device="cpu")
    with dequantized_linears(runner.module):
        expected = runner.logits(ids, mask)[..., 0][real].numpy()
    assert sqnr_db(expected, load(onnx16).values(ids, mask)[real].numpy()) > 50  # 65-70 dB measured


def _single_node(tensors: dict[str, np.ndarray], k: int, n: int, block: int, order, dtype=np.float32):
    onnx_type = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(tensors[p], p) for p in ("B", "scales", "zero_points")]
    nodes, a = [], "A"
    if order is not None:
        inits.append(numpy_helper.from_array(order, "order"))
        nodes.append(helper.make_node("Gather", ["A", "order"], ["A_sorted"], axis=-1))
        a = "A_sorted"
    nodes.append(helper.make_node("MatMulNBits", [a, "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                                  K=k, N=n, bits=4, block_size=block))
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("A", onnx_type, ["M", k])],
                              [helper.make_tensor_value_info("Y", onnx_type, ["M", n])], initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _weights(kind: str, out_f: int, in_f: int, group_size: int):
    gen = torch.Generator().manual_seed(in_f + out_f)
    weight = torch.randn(out_f, in_f, generator=gen)
    if kind == "positive":  # asym groups with zero point 0 (the v1 borrow case of FORMATS.md)
        return quantize_rtn(weight.abs(), 4, group_size, sym=False)
    if kind == "act":
        return quantize_linear(weight, _calibration(in_f, gen), bits=4, group_size=group_size, sym=False, desc_act=True)
    return quantize_rtn(weight, 4, group_size, sym=kind == "sym")


@pytest.mark.parametrize("kind, out_f, in_f, group_size", [
    ("asym", 24, 160, 64), ("sym", 16, 96, -1), ("asym", 16, 160, 96), ("positive", 8, 64, 16),
    ("act", 40, 128, 32), ("act", 16, 160, 64),
])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float16, 2e-2)])
def test_matmul_nbits_node_is_x_times_dequantized(kind, out_f, in_f, group_size, dtype, tol):
    """Kernel regime: one MatMulNBits node against x @ W^T on the dequantized weight, over awkward shapes."""
    qw = _weights(kind, out_f, in_f, group_size)
    packed = pack_gptq_v1(qw)
    if kind == "positive":
        assert int(qw.zeros.min()) == 0
    plan = plan_blocks(packed["g_idx"].numpy())
    assert (plan.order is not None) == (kind == "act")
    tensors = matmul_nbits_tensors(packed, plan, "float32" if dtype == np.float32 else "float16")
    session = _single_node(tensors, in_f, out_f, plan.block_size, plan.order, dtype)
    x = np.random.default_rng(0).standard_normal((5, in_f)).astype(dtype)
    (got,) = session.run(None, {"A": x})
    expected = x.astype(np.float32) @ dequantize_gptq_v1(packed, torch.float32).numpy().T
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=tol * np.abs(expected).max(), rtol=tol)


def test_plan_blocks():
    plan = plan_blocks(np.arange(160) // 64)
    assert (plan.order, plan.block_size, plan.block_group.tolist()) == (None, 64, [0, 1, 2])
    plan = plan_blocks(np.arange(160) // 96)  # groups of 96 and 64: blocks of 32
    assert (plan.block_size, plan.block_group.tolist()) == (32, [0, 0, 0, 1, 1])
    plan = plan_blocks(np.zeros(96, dtype=np.int32))  # one group: one padded block
    assert (plan.block_size, plan.n_blocks) == (128, 1)
    shuffled = np.random.default_rng(0).permutation(np.arange(128) // 32)
    plan = plan_blocks(shuffled)
    assert plan.block_size == 32 and (shuffled[plan.order] == np.arange(128) // 32).all()
    with pytest.raises(VexportError, match="power of two >= 16"):
        plan_blocks(np.arange(96) // 24)


def test_padded_block_codes_are_zero_points():
    """K = 96 with blocks of 64: the 32 padded codes of the last block equal its zero point (dequantize to 0)."""
    packed = pack_gptq_v1(_weights("asym", 16, 96, 64))
    tensors = matmul_nbits_tensors(packed, plan_blocks(packed["g_idx"].numpy()), "float32")
    last = tensors["B"][:, 1, 16:]  # bytes 16..31 of block 1 hold columns 96..127
    zeros = tensors["zero_points"][:, 0] >> 4  # block 1 is the high nibble of byte 0
    assert (last == (zeros[:, None] | (zeros[:, None] << 4))).all()


def test_cli_exports_gptq_folder(tiny_model_dir, tmp_path):
    folder = write_rtn_checkpoint(tiny_model_dir, tmp_path / "gptq", group_size=32, desc_act=True)
    result = run_cli("export", folder, "--format", "onnx", "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out")
    assert (manifest.format, manifest.precision) == ("onnx", "int4")
