"""Mixed-precision GPTQ checkpoints (GPTQModel's ``dynamic``): vexport's quantizer writes one with a hand-made
allocation (layer 0's q/k/v and layer 0's down_proj at 8-bit g32, layer 1's down_proj left float16, the rest
4-bit g128), and every reader gives the values of the dequantized-float reference: the same model in plain
transformers with each Linear's weight dequantized from the checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, run_cli
from vexport.backends.gptq import QuantLinear, dequantized_linears
from vexport.backends.int4_cpu import unsupported_reason
from vexport.errors import InputError
from vexport.export.gptq import export_gptq
from vexport.model import open_model
from vexport.parity import sqnr_db
from vexport.quant.checkpoint import QUANTIZED_LINEARS, gptq_options, module_plan
from vexport.quant.dynamic import ModuleQuant, allocation_lines, load_dynamic, resolve, vllm_fusion_conflicts
from vexport.quant.pack import dequantize_gptq_v1, pack_gptq_v1, unpack_gptq_v1, v1_zero_offset
from vexport.quant.reference import quantize_rtn
from vexport.quant.stream import GPTQOptions
from vexport.runtime import load

# first match wins: layer 1's down_proj is skipped by the first key though the third matches it too
PLAN = {
    r"-:model\.layers\.1\.mlp\.down_proj": {},
    r"+:model\.layers\.0\.self_attn\.(qkv|q|k|v)_proj": {"bits": 8, "group_size": 32},  # qkv: vLLM's fused name
    r".*\.mlp\.down_proj": {"bits": 8, "group_size": 32},
}
EXPECTED = {"model.layers.0.self_attn.q_proj": "8g32", "model.layers.0.self_attn.v_proj": "8g32",
            "model.layers.0.self_attn.o_proj": "4g128", "model.layers.0.mlp.down_proj": "8g32",
            "model.layers.1.self_attn.q_proj": "4g128", "model.layers.1.mlp.down_proj": "fp16"}
SMALL = {"samples": 4, "seq_len": 32}


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A tiny value model wide enough for 128-column groups (hidden 128, intermediate 256)."""
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(tmp_path_factory.mktemp("models") / "wide", seed=3, hidden_size=128,
                                 intermediate_size=256)


@pytest.fixture(scope="module")
def mixed_dir(wide_model_dir, tmp_path_factory):
    return export_gptq(wide_model_dir, tmp_path_factory.mktemp("mixed") / "gptq",
                       GPTQOptions(group_size=128, desc_act=True, dynamic=PLAN), **SMALL)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return ids, mask


@pytest.fixture(scope="module")
def reference_values(mixed_dir, batch):
    """Values of the dequantized-float reference: transformers' own model, every Linear's weight the one its
    GPTQ tensors stand for (or its float16 weight), float32."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    source = open_model(mixed_dir)
    plan = module_plan(gptq_options(source.config), source.config.num_hidden_layers)
    config = AutoConfig.from_pretrained(mixed_dir)
    del config.quantization_config
    model = AutoModelForTokenClassification.from_config(config, dtype=torch.float32).eval()
    state = {}
    for name in model.state_dict():
        prefix = name.removesuffix(".weight")
        quant = plan.get(prefix)
        if quant is not None:
            parts = {t: source.read_tensor(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")}
            state[name] = dequantize_gptq_v1(parts, torch.float32, quant.bits)
        elif name in source.tensors:
            state[name] = source.read_tensor(name).float()
        else:
            state[name] = model.state_dict()[name]  # rotary buffers and a bias the checkpoint leaves out
    model.load_state_dict(state)
    ids, mask = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[..., 0].float(), mask.bool()


# ------------------------------------------------------------------ the plan and the packing
def test_dynamic_resolves_first_match_on_the_full_name():
    base = ModuleQuant(4, 128, True, True)
    assert resolve(PLAN, "model.layers.1.mlp.down_proj", base) is None  # "-:" first, though ".*down" matches
    assert resolve(PLAN, "model.layers.0.mlp.down_proj", base) == ModuleQuant(8, 32, True, True)
    assert resolve(PLAN, "model.layers.0.self_attn.o_proj", base) == base
    # re.match: anchored at the start only, so "layers.1" also matches layer 10 and a bare "q_proj" nothing
    assert resolve({r"model\.layers\.1": {"bits": 8}}, "model.layers.10.mlp.up_proj", base).bits == 8
    assert resolve({"q_proj": {"bits": 8}}, "model.layers.0.self_attn.q_proj", base) == base


def test_bad_plans_are_refused_by_name(tmp_path):
    with pytest.raises(InputError, match=r"--dynamic: dynamic key '\+:\(' is not a regular expression"):
        load_dynamic({"+:(": {}})
    with pytest.raises(InputError, match=r"bits must be an integer"):
        load_dynamic({".*": {"bits": "8"}})
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match=f"--dynamic {path}: not valid JSON"):
        load_dynamic(path)
    path.write_text(json.dumps({"dynamic": PLAN, "bits": 4}))  # a quantize_config.json is read for its dynamic
    assert load_dynamic(path) == PLAN


def test_vllm_fusion_conflicts_are_named():
    base = ModuleQuant(4, 128)
    plan = {f"model.layers.0.{n}": resolve(PLAN, f"model.layers.0.{n}", base) for n in QUANTIZED_LINEARS}
    assert vllm_fusion_conflicts(plan, PLAN, base) == []
    unfused_only = {r"+:model\.layers\.0\.self_attn\.(q|k|v)_proj": {"bits": 8}}  # misses "qkv_proj"
    assert vllm_fusion_conflicts(plan, unfused_only, base) == ["model.layers.0.self_attn.qkv_proj"]
    plan["model.layers.0.self_attn.k_proj"] = base
    assert vllm_fusion_conflicts(plan) == ["model.layers.0.self_attn.qkv_proj"]


@pytest.mark.parametrize("sym", [True, False])
def test_8bit_gptq_v1_packing(sym):
    """4 codes per int32, the first in the lowest byte; zero points stored minus 0x01010101 (borrows included)."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qw = quantize_rtn(weight, bits=8, group_size=32, sym=sym)
    qw.zeros[0, :4] = torch.tensor([0, 1, 255, 128], dtype=torch.int32)  # 0 borrows from the next field
    packed = pack_gptq_v1(qw)
    assert packed["qweight"].shape == (16, 16) and packed["qzeros"].shape == (2, 4)
    word = int(packed["qweight"][0, 3]) % (1 << 32)
    assert [(word >> (8 * j)) & 0xFF for j in range(4)] == qw.q[3, :4].tolist()
    zero_word = (int(packed["qzeros"][0, 0]) + v1_zero_offset(8)) % (1 << 32)
    assert [(zero_word >> (8 * j)) & 0xFF for j in range(4)] == [0, 1, 255, 128]
    back = unpack_gptq_v1(packed, 8)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    torch.testing.assert_close(dequantize_gptq_v1(packed, torch.float32, 8), qw.dequantize())


def test_cpu_int4_op_names_8_bits_as_its_reason():
    assert "8-bit" in unsupported_reason(64, torch.zeros(64, dtype=torch.int32), 1, "AVX512", bits=8)


# ------------------------------------------------------------------ the checkpoint vexport writes
def test_checkpoint_writes_dynamic_as_given(mixed_dir):
    config = json.loads((mixed_dir / "config.json").read_text())["quantization_config"]
    assert list(config["dynamic"]) == list(PLAN) and config["dynamic"] == PLAN  # order kept: first match wins
    assert json.loads((mixed_dir / "quantize_config.json").read_text())["dynamic"] == PLAN
    assert (config["bits"], config["group_size"]) == (4, 128)
    source = open_model(mixed_dir)
    shapes = {name: tuple(entry[2]) for name, entry in source.tensors.items()}
    assert shapes["model.layers.0.self_attn.q_proj.qweight"] == (128 // 4, 128)  # 8 bits: 4 codes per word
    assert shapes["model.layers.0.self_attn.q_proj.scales"] == (128 // 32, 128)
    assert shapes["model.layers.0.self_attn.o_proj.qweight"] == (128 // 8, 128)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (128, 256)
    assert "model.layers.1.mlp.down_proj.qweight" not in shapes
    assert source.tensors["model.layers.1.mlp.down_proj.weight"][1] == "F16"


def test_manifest_records_the_allocation(mixed_dir):
    alloc = json.loads((mixed_dir / "manifest.json").read_text())["format_options"]["allocation"]
    for name, label in EXPECTED.items():
        layer, kind = int(name.split(".")[2]), name.split(".", 3)[3]
        assert alloc["modules"][kind][layer] == label
    assert 4.16 < alloc["average_bits"] < 16
    lines = allocation_lines(alloc)
    assert lines[0] == "self_attn.q_proj: L0 8g32, L1 4g128"  # forward order, not the manifest's sorted keys
    assert lines[-1] == "mlp.down_proj: L0 8g32, L1 fp16" and "mlp.up_proj: L0-1 4g128" in lines


# ------------------------------------------------------------------ every reader against the reference
def test_torch_backend_reads_each_module_at_its_bits(mixed_dir, reference_values, batch):
    model = load(mixed_dir, device="cpu")
    layers = model.runner.module.model.layers
    assert layers[0].self_attn.q_proj.bits == 8 and layers[0].self_attn.o_proj.bits == 4
    assert not isinstance(layers[1].mlp.down_proj, QuantLinear)
    expected, real = reference_values
    with dequantized_linears(model.runner.module):  # the float path: the format's exact numbers
        values = model.values(*batch)
    torch.testing.assert_close(values[real], expected[real], atol=1e-4, rtol=1e-4)
    packed = model.values(*batch)  # the CPU int4 op (bfloat16) where it runs, 8-bit modules dequantized
    assert sqnr_db(expected[real].numpy(), packed[real].numpy()) > 30


def test_onnx_matmulnbits_per_module(mixed_dir, reference_values, batch, tmp_path):
    import onnx

    from vexport.export.onnx import export_onnx

    out = export_onnx(mixed_dir, tmp_path / "onnx", "float32", int4_accuracy_level=None)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert {(a["bits"], a["block_size"]) for a in attrs} == {(8, 32), (4, 128)}
    float_inputs = {i for n in graph.node if n.op_type == "MatMul" for i in n.input}
    assert "l1_down_weight" in float_inputs  # the float16 Linear is a float MatMul on its own weight
    options = json.loads((out / "manifest.json").read_text())["format_options"]
    assert options["matmul_nbits_bits"] == [4, 8] and options["float_linears"] == 1
    expected, real = reference_values
    values = load(out).values(*batch)
    torch.testing.assert_close(values[real], expected[real], atol=1e-4, rtol=1e-4)


def test_tensorrt_bound_graph_reads_it(mixed_dir, reference_values, batch, tmp_path):
    """TensorRT itself is not installed here: its ONNX (blocked INT4 DequantizeLinear for the 4-bit Linears, a
    float MatMul for the 8-bit and float16 ones) runs on ONNX Runtime."""
    from vexport.export.tensorrt_onnx import export_tensorrt_onnx

    out = export_tensorrt_onnx(mixed_dir, tmp_path / "trt", "float32")
    options = json.loads((out / "manifest.json").read_text())["format_options"]
    assert options["float_linears"] == {"float16": 1, "dequantized_8bit": 4}
    expected, real = reference_values
    values = load(out).values(*batch)
    torch.testing.assert_close(values[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_runs_both_widths(mixed_dir, dtype):
    """The fused kernel (TRITON_INTERPRET=1 on CPU, set by conftest) on the checkpoint's own 8- and 4-bit
    tensors against its torch reference on the same dequantized weights."""
    from vexport.kernels.int4_matmul import int4_matmul
    from vexport.kernels.reference import int4_matmul_reference

    source = open_model(mixed_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    for prefix, bits in (("model.layers.0.self_attn.q_proj", 8), ("model.layers.0.mlp.gate_proj", 4)):
        parts = {t: source.read_tensor(f"{prefix}.{t}").to(device) for t in ("qweight", "qzeros", "scales", "g_idx")}
        got = int4_matmul(x, *parts.values(), bits=bits)
        want = int4_matmul_reference(x, *parts.values(), bits=bits)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ------------------------------------------------------------------ the CLI, info and the report
def test_cli_export_with_a_plan_logs_progress_and_info_lists_it(wide_model_dir, tmp_path):
    """`vexport export --dynamic FILE` as CI runs it (stderr a pipe, not a TTY): one progress line per layer
    on stderr; `vexport info` lists the allocation per module type, layers run-length encoded."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    out = tmp_path / "cli"
    done = run_cli("export", wide_model_dir, "--format", "gptq", "-o", out, "--dynamic", plan, "--samples", "4",
                   "--seq-len", "32", "--group-size", "128")
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if "GPTQ: layer" in line]
    assert len(progress) == 2, done.stderr
    assert "layer 1 of 2" in progress[0] and "remaining" in progress[0] and "elapsed" in progress[0]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"] == PLAN
    info = run_cli("info", out)
    assert info.returncode == 0, info.stderr
    assert "mlp.down_proj: L0 8g32, L1 fp16" in info.stdout and "self_attn.o_proj: L0-1 4g128" in info.stdout


def test_a_plan_no_reader_takes_is_refused_before_any_work(wide_model_dir, tmp_path):
    from vexport.export.options import GPTQOptions as ExportOptions

    plan = {r"+:.*\.mlp\.up_proj": {"bits": 3}}
    with pytest.raises(InputError, match=r"--dynamic: model\.layers\.0\.mlp\.up_proj resolves to 3 bits"):
        export_gptq(wide_model_dir, tmp_path / "out", ExportOptions(dynamic=plan).solver(), **SMALL)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_parity_report_has_a_bits_table(mixed_dir, wide_model_dir, tmp_path):
    from vexport.checker import check

    md, html = tmp_path / "r.md", tmp_path / "r.html"
    check(mixed_dir, wide_model_dir, device="cpu", report=[md, html], record=False)
    text = md.read_text()
    assert "## Bits per module" in text
    assert "| Layer | q | k | v | o | gate | up | down |" in text
    assert "| 1 | 4g128 | 4g128 | 4g128 | 4g128 | 4g128 | 4g128 | fp16 |" in text
    assert "| 0 | 8g32 | 8g32 | 8g32 | 4g128 | 4g128 | 4g128 | 8g32 |" in text
    page = html.read_text()
    assert "Bits per module" in page and "<td>fp16</td>" in page


def _vllm_paths() -> list[str] | None:
    """Where vLLM's own code is: an installed vllm ([]), or VEXPORT_VLLM_PATH (folders, os.pathsep-separated:
    the unpacked wheel and its pure-Python dependencies, as scripts/check_vllm_gptq_dynamic.py says)."""
    if os.environ.get("VEXPORT_VLLM_PATH"):
        return os.environ["VEXPORT_VLLM_PATH"].split(os.pathsep)
    return [] if importlib.util.find_spec("vllm") is not None else None


def test_vllm_gptq_config_resolves_what_vexport_wrote(wide_model_dir, tmp_path):
    """vLLM's own GPTQ config (never vendored) parses the written dynamic; every module, fused names included,
    resolves to the bits and group vexport wrote. vLLM refuses act-order with groups, so desc_act is off here."""
    paths = _vllm_paths()
    if paths is None:
        pytest.skip("needs vLLM's code: pip install vllm, or VEXPORT_VLLM_PATH (scripts/check_vllm_gptq_dynamic.py)")
    out = export_gptq(wide_model_dir, tmp_path / "noact", GPTQOptions(group_size=128, desc_act=False, dynamic=PLAN),
                      **SMALL)
    args = [a for p in paths for a in ("--vllm-path", p)]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_vllm_gptq_dynamic.py"), str(out), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "18 modules" in done.stdout and "all agree" in done.stdout
    assert "model.layers.1.mlp.down_proj" in done.stdout and "fp16           fp16" in done.stdout


# ------------------------------------------------------------------ sensitivity and --bits-budget
def test_value_sensitivity_and_allocation(wide_model_dir):
    """RTN probes on the tiny model: raising a unit to 8-bit g32 changes the value SQNR; the allocation keeps
    within the budget and takes the best gain per bit first."""
    from vexport.quant.sensitivity import PROBE, allocate, dynamic_for, value_sensitivity

    source = open_model(wide_model_dir)
    model = source.load_torch(dtype=torch.float32)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    tokens = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    base = ModuleQuant(4, 128)
    baseline, gains = value_sensitivity(model, tokens, base)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # weights restored
    assert len(gains) == 8 and 0 < baseline < 60 and max(gains.values()) > 0.5
    shapes = {f"model.layers.{i}.{n}": tuple(source.tensors[f"model.layers.{i}.{n}.weight"][2])
              for i in range(2) for n in QUANTIZED_LINEARS}
    weights = sum(o * i for o, i in shapes.values())
    for budget in (4.5, 6.0):
        raised = allocate(gains, shapes, budget, base)
        plan = {name: resolve(dynamic_for(raised), name, base) for name in shapes}
        average = sum(o * i * plan[n].stored_bits(i) for n, (o, i) in shapes.items()) / weights
        assert raised and average <= budget
        assert vllm_fusion_conflicts(plan, dynamic_for(raised), base) == []
    best = max(gains, key=gains.get)
    assert best in allocate(gains, shapes, 16.0, base)  # an unbounded budget raises every unit that gains
    with pytest.raises(InputError, match="below the 4.1"):
        allocate(gains, shapes, 4.0, base)
    assert PROBE.label == "8g32"


def test_export_under_a_bits_budget(wide_model_dir, tmp_path):
    out = export_gptq(wide_model_dir, tmp_path / "budget", GPTQOptions(group_size=128, desc_act=False), **SMALL,
                      bits_budget=5.0)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    alloc = json.loads((out / "manifest.json").read_text())["format_options"]["allocation"]
    assert qconfig["dynamic"] and all(v == {"bits": 8, "group_size": 32} for v in qconfig["dynamic"].values())
    assert alloc["average_bits"] <= 5.0 and alloc["sensitivity"]["bits_budget"] == 5.0
    assert len(alloc["sensitivity"]["raised"]) == len(qconfig["dynamic"])
