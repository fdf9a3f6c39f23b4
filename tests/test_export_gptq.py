"""Streaming GPTQ export of tiny value models: the stream, the checkpoint, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import leftovers, run_cli
from vexport.errors import VexportError
from vexport.export.gptq import export_gptq
from vexport.model import open_model
from vexport.quant.stream import GPTQOptions, quantize_stream
from vexport.quant.value_aware import Head, choose_and_fit, fit_head, rms_norm

SMALL = {"samples": 8, "seq_len": 64}


def test_reference_stream_is_the_float_model(tiny_gqa_model_dir):
    """The unquantized stream, layer by layer from the shards, gives transformers' own hidden states."""
    source = open_model(tiny_gqa_model_dir)
    tokens = torch.randint(3, 1000, (4, 48), generator=torch.Generator().manual_seed(0))
    written = []
    result = quantize_stream(source, tokens, GPTQOptions(group_size=32), written.append)
    with torch.no_grad():
        expected = source.load_torch().model(input_ids=tokens).last_hidden_state
    norm = source.read_tensor("model.norm.weight")
    torch.testing.assert_close(rms_norm(result.hidden_reference, norm, source.config.rms_norm_eps), expected,
                               atol=1e-5, rtol=1e-5)
    quantized = rms_norm(result.hidden_quantized, norm, source.config.rms_norm_eps)
    assert 0 < float((quantized - expected).norm() / expected.norm()) < 0.5
    names = set().union(*written)
    assert "model.layers.1.mlp.down_proj.qweight" in names and "model.layers.0.self_attn.q_proj.g_idx" in names
    assert not any(n.endswith("q_proj.weight") for n in names)  # no float copy of a quantized Linear


@pytest.mark.parametrize("mode", ["bias", "affine", "full"])
def test_head_fits_recover_a_distorted_head(mode):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(4000, 16, generator=gen)
    head = Head(torch.randn(1, 16, generator=gen), torch.tensor([0.3]))
    target = 1.5 * head.values(features) - 0.7
    fitted = fit_head(features, target, head, mode)
    before = (head.values(features) - target).norm()
    after = (fitted.values(features) - target).norm()
    assert after < before
    if mode in ("affine", "full"):
        assert after / target.norm() < 1e-3


def test_choose_and_fit_picks_on_held_apart_windows():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(8 * 50, 8, generator=gen)
    head = Head(torch.randn(1, 8, generator=gen), torch.zeros(1))
    target = head.values(features) + 2.0  # a pure shift: every fit but "none" recovers it
    fitted, mode, scores = choose_and_fit(features, target, head, windows=8)
    assert mode != "none" and scores[mode] > scores["none"]
    torch.testing.assert_close(fitted.values(features), target, atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def gptq_dir(tiny_model_dir, tmp_path_factory):
    return export_gptq(tiny_model_dir, tmp_path_factory.mktemp("gptq") / "int4", GPTQOptions(group_size=32,
                       desc_act=True), **SMALL)


def test_checkpoint_is_standard_gptq(gptq_dir):
    config = json.loads((gptq_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["desc_act"] is True and qc["sym"] is True and qc["checkpoint_format"] == "gptq"
    assert json.loads((gptq_dir / "quantize_config.json").read_text())["group_size"] == 32
    manifest = json.loads((gptq_dir / "manifest.json").read_text())
    assert manifest["format"] == "gptq" and manifest["precision"] == "int4"
    fit = manifest["format_options"]["value_calibration"]
    assert fit["enabled"] is True and fit["head_fit"] in ("none", "bias", "affine", "full")
    assert len(manifest["format_options"]["seconds_per_layer"]) == 2
    assert leftovers(gptq_dir.parent) == []


def test_gptq_artifact_loads_and_is_close(gptq_dir, tiny_model_dir):
    from vexport.runtime import load

    ref, model = load(tiny_model_dir), load(gptq_dir)
    assert model.format == "gptq"
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    r, q = ref.values(ids)[0], model.values(ids)[0]
    assert float(20 * torch.log10(r.norm() / (r - q).norm())) > 5


def test_bad_options_refused_before_work(tiny_model_dir, tmp_path):
    with pytest.raises(VexportError, match="--bits"):
        export_gptq(tiny_model_dir, tmp_path / "x", GPTQOptions(bits=3), **SMALL)
    with pytest.raises(VexportError, match="--group-size"):
        export_gptq(tiny_model_dir, tmp_path / "x", GPTQOptions(group_size=12), **SMALL)
    with pytest.raises(VexportError, match="--seq-len"):
        export_gptq(tiny_model_dir, tmp_path / "x", samples=2, seq_len=100000)
    assert list(tmp_path.iterdir()) == []


def test_cli_gptq_then_check(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    result = run_cli("export", tiny_model_dir, "--format", "gptq", "--output", out, "--group-size", "32",
                     "--samples", "4", "--seq-len", "32", "--no-value-calibration")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_options"]["value_calibration"] == {"enabled": False, "float_targets": False}
    checked = run_cli("check", out, "--reference", tiny_model_dir, "--report", tmp_path / "r.json")
    assert checked.returncode in (0, 1), checked.stderr
    assert json.loads((tmp_path / "r.json").read_text())["artifact"]["format"] == "gptq"
