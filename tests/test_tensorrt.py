"""TensorRT: the TensorRT-bound ONNX on real ONNX Runtime sessions (runs everywhere), the missing-dependency
path (runs everywhere), and engine build / run / refusal (needs TensorRT and a CUDA GPU; skips with the reason)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from tests.helpers import run_cli
from vexport.backends.gptq import dequantized_linears
from vexport.checker import check
from vexport.errors import MissingDependencyError, VexportError
from vexport.export.graph.int4_trt import blocked_int4_tensors, pack_int4, trt_block_plan, unpack_int4
from vexport.export.onnx import export_onnx
from vexport.export.rtn import write_rtn_checkpoint
from vexport.export.tensorrt_onnx import export_tensorrt_onnx
from vexport.manifest import read_manifest
from vexport.model import open_model
from vexport.parity import sqnr_db
from vexport.quant.pack import dequantize_gptq_v1
from vexport.runtime import load

GPTQ_CASES = {"g32-sym": dict(group_size=32), "g32-asym-act": dict(group_size=32, sym=False, desc_act=True)}


def _tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def gptq_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-gptq")
    return {name: write_rtn_checkpoint(tiny_model_dir, root / name, **kw) for name, kw in GPTQ_CASES.items()}


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (3, 19), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    return ids, mask


# ------------------------------------------------------------------ int4 tensors vs the GPTQ reference
@pytest.mark.parametrize("shape", [(5, 7), (64, 24), (1, 1), (3, 33)])
def test_int4_packing_round_trips(shape):
    values = np.random.default_rng(0).integers(-8, 8, size=shape).astype(np.int8)
    packed = pack_int4(values)
    assert packed.data.nbytes == (values.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed), values)


@pytest.mark.parametrize("case", sorted(GPTQ_CASES))
def test_blocked_tensors_dequantize_to_the_gptq_weight(gptq_dirs, case):
    """codes * scales + correction, expanded per block, is exactly dequantize_gptq_v1 (sorted by act-order)."""
    source = open_model(gptq_dirs[case])
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        packed = {t: source.read_tensor(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")}
        plan = trt_block_plan(packed["g_idx"].numpy(), prefix)
        tensors = blocked_int4_tensors(packed, plan, "float32")
        expand = lambda a: np.repeat(a, plan.block_size, axis=0)  # noqa: E731
        weight = unpack_int4(tensors["codes"]) * expand(tensors["scales"]) + expand(tensors["correction"])
        expected = dequantize_gptq_v1(packed, torch.float32).numpy().T
        expected = expected if plan.order is None else expected[plan.order]
        np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=1e-7)
        assert (tensors["scales"] > 0).all()
        assert not tensors["correction"].any() or case.endswith("act")


# ------------------------------------------------------------------ the TensorRT-bound ONNX on ONNX Runtime
@pytest.fixture(scope="module")
def trt_onnx(tiny_model_dir, gptq_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-onnx")
    out = {"float16": export_tensorrt_onnx(tiny_model_dir, root / "fp16", "float16")}
    for name, folder in gptq_dirs.items():
        out[name] = export_tensorrt_onnx(folder, root / name, "float16")
    return out


def test_graph_is_the_tensorrt_form(trt_onnx):
    """opset 21, blocked INT4 DequantizeLinear + MatMul, no MatMulNBits, no Reduce axes attribute, folded head."""
    for name, folder in trt_onnx.items():
        model = onnx.load(folder / "model.onnx", load_external_data=False)
        manifest = read_manifest(folder)
        assert manifest.format == "onnx" and manifest.format_options["target"] == "tensorrt"
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
        ops = {node.op_type for node in model.graph.node}
        assert "MatMulNBits" not in ops
        assert not any(a.name == "axes" for n in model.graph.node if n.op_type.startswith("Reduce")
                       for a in n.attribute)
        names = {init.name for init in model.graph.initializer}
        assert "score_folded" in names and "final_norm_weight" not in names
        if name == "float16":
            assert manifest.precision == "float16" and "DequantizeLinear" not in ops
            continue
        assert manifest.precision == "int4"
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 7 * 2  # seven Linears per layer, two layers
        int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
        assert len(int4) == len(dq)
        assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} == {"axis": 0, "block_size": 32}
                   for n in dq)


@pytest.mark.parametrize("name", ["float16", *sorted(GPTQ_CASES)])
def test_tensorrt_bound_onnx_passes_check(trt_onnx, tiny_model_dir, name):
    """vexport check on ONNX Runtime against the fp32 reference: fp16 thresholds, or int4 ones for int4."""
    outcome = check(trt_onnx[name], tiny_model_dir, device="cpu")
    assert outcome.result.passed, outcome.result.failures
    assert read_manifest(trt_onnx[name]).precision == ("float16" if name == "float16" else "int4")


@pytest.mark.parametrize("case", sorted(GPTQ_CASES))
def test_int4_agrees_with_matmulnbits_and_torch_int4(gptq_dirs, trt_onnx, tmp_path, batch, case):
    """Same GPTQ weights, three runtimes: float32 graphs agree to float32 rounding, float16 to float16 rounding."""
    ids, mask = batch
    torch_model = load(gptq_dirs[case], device="cpu")
    with dequantized_linears(torch_model.runner.module):  # float compute, not the bf16 packed CPU path
        torch_int4 = torch_model.values(ids, mask)
    trt32 = load(export_tensorrt_onnx(gptq_dirs[case], tmp_path / "trt32", "float32")).values(ids, mask)
    nbits32 = load(export_onnx(gptq_dirs[case], tmp_path / "nbits32", "float32", optimize=False)).values(ids, mask)
    torch.testing.assert_close(trt32, nbits32, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(trt32, torch_int4, atol=2e-5, rtol=1e-5)
    trt16 = load(trt_onnx[case]).values(ids, mask)
    real = mask.bool()
    assert sqnr_db(torch_int4[real].numpy(), trt16[real].numpy()) > 40.0


def test_fp32_folded_head_matches_the_reference(tiny_model_dir, tmp_path, batch):
    ids, mask = batch
    expected = load(tiny_model_dir, device="cpu").values(ids, mask)
    got = load(export_tensorrt_onnx(tiny_model_dir, tmp_path / "trt32", "float32")).values(ids, mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ without TensorRT or a GPU
@pytest.mark.skipif(_tensorrt_usable(), reason="TensorRT and a CUDA GPU are present: the missing path is not taken")
def test_cli_says_what_is_missing(tiny_model_dir, tmp_path):
    out = tmp_path / "engine"
    result = run_cli("export", str(tiny_model_dir), "--format", "tensorrt", "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert "pip install 'vexport[tensorrt]'" in result.stderr
    assert ("TensorRT is not installed" in result.stderr) or ("CUDA GPU" in result.stderr)
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.skipif(_tensorrt_usable(), reason="TensorRT and a CUDA GPU are present: the missing path is not taken")
def test_loading_an_engine_without_tensorrt_refuses(trt_onnx, tmp_path):
    from vexport.manifest import file_entry

    folder = tmp_path / "engine"
    shutil.copytree(trt_onnx["float16"], folder, ignore=shutil.ignore_patterns("model.onnx*"))
    (folder / "model.engine").write_bytes(b"not an engine")  # never read: the dependency check comes first
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {k: v for k, v in manifest["files"].items() if "onnx" not in k}
    files["model.engine"] = file_entry(folder / "model.engine", "model")
    manifest.update(format="tensorrt", files=files, format_options={"engine": "model.engine"})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MissingDependencyError, match=r"vexport\[tensorrt\]"):
        load(folder)


def test_engine_mismatch_is_explained():
    from vexport.backends.tensorrt import engine_mismatch

    built = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.9.0"}
    assert engine_mismatch(built, dict(built)) is None
    why = engine_mismatch(built, {**built, "gpu": "NVIDIA A100", "compute_capability": "8.0"})
    assert "NVIDIA H100" in why and "8.0" in why and "rebuild" in why
    assert "TensorRT 10.9.0" in engine_mismatch(built, {**built, "tensorrt_version": "10.10.0"})


def test_shape_flags_are_checked():
    from vexport.export.options import parse_shape
    from vexport.export.tensorrt import ShapeProfile

    assert parse_shape("8,1024", "--opt-shape") == (8, 1024)
    with pytest.raises(VexportError, match="--opt-shape"):
        parse_shape("8x1024", "--opt-shape")
    with pytest.raises(VexportError, match="min 4 <= opt 2"):
        ShapeProfile((4, 1), (2, 8), (8, 16)).check(None)
    with pytest.raises(VexportError, match="max_position_embeddings"):
        ShapeProfile((1, 1), (2, 8), (8, 4096)).check(2048)


# ------------------------------------------------------------------ with TensorRT and a CUDA GPU
@pytest.fixture(scope="module")
def engines(tiny_model_dir, gptq_dirs, tmp_path_factory):
    pytest.importorskip("tensorrt", reason="needs TensorRT 10+ (pip install 'vexport[tensorrt]')")
    from vexport.export.tensorrt import ShapeProfile
    from vexport.export.tensorrt_chain import build_engine

    root, profile = tmp_path_factory.mktemp("engines"), ShapeProfile((1, 1), (4, 64), (8, 128))
    return {"fp16": build_engine(tiny_model_dir, root / "fp16", profile=profile),
            "int4": build_engine(gptq_dirs["g32-sym"], root / "int4", profile=profile, int4=True,
                                 reference=tiny_model_dir)}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp16", "int4"])
def test_engine_builds_and_passes_check(engines, tiny_model_dir, kind):
    folder = engines[kind]
    manifest = read_manifest(folder)
    assert manifest.format == "tensorrt" and (folder / "model.engine").is_file() and (folder / "timing.cache").is_file()
    assert {"gpu", "compute_capability", "tensorrt_version"} <= set(manifest.format_options)
    assert manifest.format_options["onnx_parity"]["passed"]
    assert json.loads((folder / "layers.json").read_text())
    outcome = check(folder, tiny_model_dir, device="cuda")
    assert outcome.result.passed, outcome.result.failures


@pytest.mark.gpu
def test_engine_runs_on_torch_cuda_tensors(engines, tiny_model_dir, batch):
    ids, mask = (t.cuda() for t in batch)
    model = load(engines["fp16"])
    values = model.values(ids, mask)
    assert values.is_cuda and values.dtype == torch.float32 and values.shape == ids.shape
    expected = load(tiny_model_dir, device="cuda").values(ids, mask)
    assert sqnr_db(expected[mask.bool()].cpu().numpy(), values[mask.bool()].cpu().numpy()) > 30.0


@pytest.mark.gpu
def test_mismatched_tensorrt_version_is_refused(engines, tiny_model_dir, tmp_path):
    from vexport.errors import ManifestError

    folder = tmp_path / "engine"
    shutil.copytree(engines["fp16"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_options"]["tensorrt_version"] = "9.0.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="TensorRT 9.0.0"):
        load(folder)
