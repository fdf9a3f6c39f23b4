"""The GPTQ v1 checkpoint folder: shards, index, configs and manifest, as written by the RTN baseline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vexport.errors import OutputExistsError, VexportError
from vexport.export.rtn import write_rtn_checkpoint
from vexport.manifest import read_manifest
from vexport.model import open_model
from vexport.quant.checkpoint import (
    QUANTIZED_LINEARS,
    ShardWriter,
    gptq_options,
    gptq_quantization_config,
    is_gptq_config,
    quantize_rtn_act_order,
)
from vexport.quant.pack import unpack_gptq_v1
from vexport.quant.reference import quantize_rtn

EXPECTED_QCONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
                    "checkpoint_format": "gptq"}


@pytest.fixture(scope="module")
def gptq_dir(tiny_model_dir, tmp_path_factory):
    return write_rtn_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "gptq", group_size=32)


@pytest.fixture(scope="module")
def act_order_dir(tiny_model_dir, tmp_path_factory):
    return write_rtn_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "act", group_size=16,
                                sym=False, desc_act=True)


def test_shards_and_index(gptq_dir):
    index = json.loads((gptq_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in gptq_dir.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 2 layers, then the rest
    assert not list(gptq_dir.glob("*.partial")) and not list(gptq_dir.glob(".*"))
    found, total = {}, 0
    for shard in shards:
        with safe_open(str(gptq_dir / shard), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for name in fh.keys():
                found[name] = shard
                tensor = fh.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    assert index["weight_map"] == found
    assert index["metadata"]["total_size"] == total
    layer0 = {n for n, s in found.items() if s == shards[0]}
    assert layer0 == {f"model.layers.0.{lin}.{t}" for lin in QUANTIZED_LINEARS
                      for t in ("qweight", "qzeros", "scales", "g_idx")}


def test_configs_follow_formats_md(gptq_dir, tiny_model_dir):
    config = json.loads((gptq_dir / "config.json").read_text())
    assert config["quantization_config"] == EXPECTED_QCONFIG
    assert config["dtype"] == "float16" and config["torch_dtype"] == "float16"
    assert json.loads((gptq_dir / "quantize_config.json").read_text()) == EXPECTED_QCONFIG
    source = json.loads((tiny_model_dir / "config.json").read_text())
    kept = {k: v for k, v in source.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    assert {k: config.get(k) for k in kept} == kept
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (gptq_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    manifest = read_manifest(gptq_dir)
    assert (manifest.format, manifest.precision) == ("gptq", "int4")
    assert {k: manifest.format_options[k] for k in EXPECTED_QCONFIG} == EXPECTED_QCONFIG
    assert set(manifest.files) == {p.name for p in gptq_dir.iterdir() if p.name != "manifest.json"}


def test_open_model_reads_the_folder(gptq_dir):
    source = open_model(gptq_dir)
    assert is_gptq_config(source.config) and gptq_options(source.config)["group_size"] == 32
    hidden, inter = source.config.hidden_size, source.config.intermediate_size
    expected = {"qweight": ("I32", [inter // 8, hidden]), "qzeros": ("I32", [inter // 32, hidden // 8]),
                "scales": ("F16", [inter // 32, hidden]), "g_idx": ("I32", [inter])}
    for suffix, (dtype, shape) in expected.items():
        assert source.tensors[f"model.layers.1.mlp.down_proj.{suffix}"][1:] == (dtype, shape)
    quantized = (".qweight", ".qzeros", ".scales", ".g_idx")
    rest = {n: info[1] for n, info in source.tensors.items() if not n.endswith(quantized)}
    assert set(rest.values()) == {"F16"} and {"score.weight", "score.bias", "model.embed_tokens.weight"} <= set(rest)
    assert not any(n.endswith("_proj.weight") for n in source.tensors)


def test_is_gptq_config(tiny_model_dir, gptq_dir):
    assert is_gptq_config(open_model(gptq_dir).config)
    assert not is_gptq_config(open_model(tiny_model_dir).config)
    assert is_gptq_config({"quantization_config": EXPECTED_QCONFIG})
    assert not is_gptq_config({"quantization_config": {"quant_method": "awq"}}) and not is_gptq_config({})
    with pytest.raises(VexportError, match="checkpoint_format 'gptq_v2'"):
        gptq_options({"quantization_config": {**EXPECTED_QCONFIG, "checkpoint_format": "gptq_v2"}})
    with pytest.raises(VexportError, match="bits 3"):
        gptq_options({"quantization_config": {**EXPECTED_QCONFIG, "bits": 3}})
    assert gptq_options({"quantization_config": {**EXPECTED_QCONFIG, "bits": 8}})["bits"] == 8  # 8 is read too
    with pytest.raises(VexportError, match="--bits 3"):
        gptq_quantization_config(3, 128, False, True)


@pytest.mark.parametrize("layer", ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"])
def test_packed_layer_reads_back(tiny_model_dir, gptq_dir, act_order_dir, layer):
    weight = open_model(tiny_model_dir).read_tensor(f"{layer}.weight").float()
    for folder, expected in ((gptq_dir, quantize_rtn(weight, 4, 32, sym=True)),
                             (act_order_dir, quantize_rtn_act_order(weight, 16, sym=False))):
        source = open_model(folder)
        packed = {t: source.read_tensor(f"{layer}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")}
        got = unpack_gptq_v1(packed)
        for field in ("q", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), (folder.name, field)


def test_act_order_grouping(tiny_model_dir, act_order_dir):
    """desc_act: g_idx is a permuted grouping (16 columns per group), and the codes still fit the weight."""
    layer = "model.layers.0.mlp.gate_proj"
    weight = open_model(tiny_model_dir).read_tensor(f"{layer}.weight").float()
    g_idx = open_model(act_order_dir).read_tensor(f"{layer}.g_idx").long()
    assert bool((g_idx[1:] < g_idx[:-1]).any())
    assert torch.bincount(g_idx).tolist() == [16] * (weight.shape[1] // 16)
    qw = quantize_rtn_act_order(weight, 16, sym=False)
    assert qw.desc_act and float((qw.dequantize() - weight).norm() / weight.norm()) < 0.1


def test_shard_writer_streams(tmp_path):
    writer = ShardWriter(tmp_path)
    first = writer.add({"a": torch.arange(4, dtype=torch.int32), "b": torch.ones(2, 3, dtype=torch.float16).t()})
    assert first.is_file()  # written at once, before the next layer exists
    writer.add({"c": torch.zeros(5)})
    with pytest.raises(VexportError, match="tensor a was already written"):
        writer.add({"a": torch.zeros(1)})
    assert writer.finish() == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 4 * 4 + 6 * 2 + 5 * 4
    with pytest.raises(VexportError, match="after finish"):
        writer.add({"d": torch.zeros(1)})


def test_existing_output_is_refused(tiny_model_dir, gptq_dir):
    before = sorted(p.name for p in gptq_dir.iterdir())
    with pytest.raises(OutputExistsError, match="--output"):
        write_rtn_checkpoint(tiny_model_dir, gptq_dir)
    assert sorted(p.name for p in gptq_dir.iterdir()) == before
