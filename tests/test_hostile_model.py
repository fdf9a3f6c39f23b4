"""Hostile model folders at intake (vexport/model.py, vexport/tensors.py): weights that disagree with config.json,
config features the ONNX graph cannot run, non-finite weights, mistyped paths. Each is one line naming the tensor,
file or feature (exit code 2 through the CLI), with no traceback and no output folder left behind; what is
supported is exported and matches transformers.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import copy_model, edit_config, leftovers, make_mistral, make_pickle_only, run_cli
from vexport.errors import VexportError

WEIGHTS = "model.safetensors"


def rewrite(folder: Path, change) -> None:
    """Apply CHANGE (a function of the tensor dict) to FOLDER's model.safetensors."""
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def refused(*args, needle: str) -> str:
    """The CLI exits 2 with one line naming NEEDLE and no traceback; returns that line."""
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def open_refused(folder: Path, *needles: str) -> str:
    from vexport.model import open_model

    with pytest.raises(VexportError) as info:
        open_model(folder)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def onnx_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    from vexport.export.onnx import export_onnx

    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("hostile-model") / "onnx")


# ------------------------------------------------------------------------- weights against config.json
def test_q_proj_of_the_wrong_shape_is_refused_by_the_cli(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    name = "model.layers.1.self_attn.q_proj.weight"
    rewrite(folder, lambda t: t.update({name: t[name][:48].clone()}))
    out = tmp_path / "out"
    line = refused("export", folder, "--output", out, needle=name)
    assert str(folder / WEIGHTS) in line and "[48, 64]" in line and "[64, 64]" in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["embedding", "score_two_rows", "gqa_k_proj", "norm"])
def test_tensors_of_the_wrong_shape_are_refused(tiny_model_dir, tmp_path, case):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    name, shape, found = {
        "embedding": ("model.embed_tokens.weight", None, None),
        "score_two_rows": ("score.weight", "[1, 64]", "[2, 64]"),
        "gqa_k_proj": ("model.layers.0.self_attn.k_proj.weight", "[64, 64]", "[32, 64]"),
        "norm": ("model.norm.weight", "[64]", "[63]"),
    }[case]
    if case == "embedding":  # one column short: hidden_size disagrees
        rewrite(folder, lambda t: t.update({name: t[name][:, :-1].clone()}))
        shape, found = None, "[" + str(load_file(folder / WEIGHTS)[name].shape[0]) + ", 63]"
    elif case == "score_two_rows":  # a two-label head while num_labels is 1
        rewrite(folder, lambda t: t.update({name: torch.cat([t[name], t[name]])}))
    elif case == "gqa_k_proj":  # a GQA-sized k_proj in a model whose config has no GQA
        rewrite(folder, lambda t: t.update({name: t[name][:32].clone()}))
    else:
        rewrite(folder, lambda t: t.update({name: t[name][:-1].clone()}))
    message = open_refused(folder, name, str(folder / WEIGHTS), found, *([shape] if shape else []))
    assert "config.json implies" in message


@pytest.mark.parametrize("case", ["norm_missing", "more_layers"])
def test_missing_tensors_are_refused_at_export(tiny_model_dir, tmp_path, case):
    from vexport.export.onnx import export_onnx

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    if case == "norm_missing":
        rewrite(folder, lambda t: t.pop("model.norm.weight"))
        first = "model.norm.weight"
    else:
        edit_config(folder, num_hidden_layers=3)  # the weights hold 2
        first = "model.layers.2.input_layernorm.weight"
    with pytest.raises(VexportError, match=first.replace(".", r"\.")) as info:
        export_onnx(folder, tmp_path / "out")
    assert str(folder) in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_tensor_is_refused_by_load_and_check(tiny_model_dir, onnx_artifact, tmp_path):
    """transformers would fill the missing tensor with random values and score with them."""
    import vexport

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(VexportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        vexport.load(folder, device="cpu")
    report = tmp_path / "report.json"
    with pytest.raises(VexportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        vexport.check(onnx_artifact, folder, device="cpu", report=report)
    assert not report.exists()


def test_missing_tensor_in_pickle_weights_is_refused_at_load(tiny_model_dir, tmp_path):
    """Pickle weights have no header to check: transformers' loading report is checked instead."""
    import vexport

    folder = make_pickle_only(tiny_model_dir, tmp_path / "model")
    state = torch.load(folder / "pytorch_model.bin")
    del state["model.norm.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(VexportError, match=r"model\.norm\.weight"):
        vexport.load(folder, device="cpu", allow_pickle=True)


def test_tensor_in_two_shards_is_refused(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    tensors = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    first = {k: v for k, v in tensors.items() if k != "score.weight"}
    save_file(first, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"score.weight": tensors["score.weight"], "model.norm.weight": tensors["model.norm.weight"]},
              folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    open_refused(folder, "model.norm.weight", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def test_unused_tensors_are_named_in_a_warning(tiny_model_dir, tmp_path, caplog):
    from vexport.model import open_model

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    extra = {f"extra.{i}.weight": torch.zeros(2) for i in range(5)}
    rewrite(folder, lambda t: t.update(extra))
    with caplog.at_level(logging.WARNING, logger="vexport.tensors"):
        open_model(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "5 tensor(s)" in warnings[0]
    assert "extra.0.weight, extra.1.weight, extra.2.weight, ..." in warnings[0]


def test_gptq_tensor_of_the_wrong_shape_is_named(tiny_model_dir, tmp_path):
    from vexport.export.rtn import write_rtn_checkpoint

    gptq = write_rtn_checkpoint(tiny_model_dir, tmp_path / "gptq", group_size=32)
    name = "model.layers.0.self_attn.v_proj.scales"
    shard = next(p for p in gptq.glob("*.safetensors") if name in load_file(p))
    tensors = load_file(shard)
    tensors[name] = tensors[name][:1].clone()  # 1 group where in_features 64 / group_size 32 gives 2
    save_file(tensors, shard, metadata={"format": "pt"})
    open_refused(gptq, name, shard.name, "[2, 64]", "[1, 64]")


# ----------------------------------------------------------------------------------- config features
@pytest.mark.parametrize("rope, needle", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic'"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 64}, "rope_type 'longrope'"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
])
def test_rope_the_graph_cannot_express_is_refused_by_name(tiny_model_dir, tmp_path, rope, needle):
    from vexport.export.onnx import export_onnx

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    theta = json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_theta"]
    edit_config(folder, rope_parameters={**rope, "rope_theta": theta})
    for optimize in (True, False):
        with pytest.raises(VexportError, match=needle):
            export_onnx(folder, tmp_path / "out", optimize=optimize)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unknown_rope_type_is_one_line_naming_it(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    edit_config(folder, rope_parameters={"rope_type": "spiral", "rope_theta": 10000.0})
    open_refused(folder, "rope_type 'spiral'", "config.json")


@pytest.fixture(scope="module")
def mistral_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny Mistral value model with a sliding window of 200 (longer than every built-in sample)."""
    return make_mistral(tiny_model_dir, tmp_path_factory.mktemp("mistral"), window=200)


def _values_match_transformers(model_dir: Path, artifact: Path, length: int) -> None:
    from transformers import AutoModelForTokenClassification

    import vexport

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, length))
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0  # left padding
    reference = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[..., 0]
    got = vexport.load(artifact).values(ids, mask)
    np.testing.assert_allclose(got.numpy(), (want * mask).numpy(), atol=2e-4, rtol=1e-4)


def test_sliding_window_is_exported_and_matches_transformers(mistral_dir, tmp_path):
    from vexport.export.onnx import export_onnx

    model_dir = copy_model(mistral_dir, tmp_path / "mistral")
    edit_config(model_dir, sliding_window=16)
    for optimize in (True, False):
        artifact = export_onnx(model_dir, tmp_path / f"onnx-{optimize}", optimize=optimize)
        _values_match_transformers(model_dir, artifact, length=60)  # well past the window


def test_huge_max_position_embeddings_exports_and_loads_fast(tiny_model_dir, tmp_path):
    """No rotary table scales with max_position_embeddings: the tables are computed for the call's positions."""
    from vexport.export.onnx import export_onnx

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    edit_config(folder, max_position_embeddings=2**31)
    weights = (folder / WEIGHTS).stat().st_size
    start = time.perf_counter()
    for optimize in (True, False):
        artifact = export_onnx(folder, tmp_path / f"onnx-{optimize}", optimize=optimize)
        assert (artifact / "model.onnx.data").stat().st_size < 2 * weights  # no 2**31-row table in it
        _values_match_transformers(folder, artifact, length=24)
    assert time.perf_counter() - start < 60


# --------------------------------------------------------------------------- long-context evaluation
def builtin_samples(model_dir: Path):
    from transformers import AutoTokenizer

    from vexport.evalset import builtin_prompt_groups, encode_groups

    return encode_groups(AutoTokenizer.from_pretrained(model_dir), builtin_prompt_groups())


@pytest.mark.parametrize("extra, threshold", [
    ({"model_type": "mistral", "sliding_window": 300}, 300),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 256, "rope_theta": 10000.0}}, 256),
    ({"model_type": "mistral", "sliding_window": 500}, 500),  # bounded by max_position_embeddings 512
])
def test_long_context_samples_cross_every_threshold(tiny_model_dir, extra, threshold):
    from transformers import LlamaConfig, MistralConfig

    from vexport.evalset import long_context_samples
    from vexport.model import position_thresholds

    base = json.loads((tiny_model_dir / "config.json").read_text())
    base.pop("model_type")
    kind = MistralConfig if extra.get("model_type") == "mistral" else LlamaConfig
    config = kind(**{**base, **{k: v for k, v in extra.items() if k != "model_type"}})
    assert position_thresholds(config) == [threshold]
    samples = builtin_samples(tiny_model_dir)
    assert max(len(s.input_ids) for s in samples) < threshold  # the built-in set alone never crosses it
    (long,) = long_context_samples(samples, config)
    assert threshold < len(long.input_ids) <= 512
    assert long.group > max(s.group for s in samples)  # a group of its own: no ranking against the others


def test_check_crosses_the_sliding_window(mistral_dir, tmp_path):
    """An export that ignores a window longer than every built-in sample passes on them; check adds a
    sample past the window, and there it fails."""
    import vexport
    from vexport.export.onnx import export_onnx

    model_dir = mistral_dir
    wrong = copy_model(model_dir, tmp_path / "no-window")
    edit_config(wrong, sliding_window=None)
    artifact = export_onnx(wrong, tmp_path / "onnx", optimize=False)
    outcome = vexport.check_many([artifact], model_dir, device="cpu", record=False)
    assert outcome.report["evalset"]["sequences"] == len(builtin_samples(model_dir)) + 1
    assert not outcome.passed
    worst = outcome.report["artifacts"][0]["worst"][0]
    assert worst["tokens"] == 200 + 32 and worst["position"] >= 200  # wrong only past the window


# ------------------------------------------------------------------------------------ non-finite weights
def test_non_finite_weights_warn_and_strict_refuses(tiny_model_dir, tmp_path, caplog):
    from vexport.export.onnx import export_onnx

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    name = "model.layers.0.mlp.gate_proj.weight"
    rewrite(folder, lambda t: t[name].__setitem__((0, 0), float("nan")))
    out = tmp_path / "strict"
    refused("export", folder, "--output", out, "--strict", needle=name)
    assert not out.exists() and leftovers(tmp_path) == []
    with caplog.at_level(logging.WARNING):  # without --strict: written, with one warning naming the tensor
        artifact = export_onnx(folder, tmp_path / "onnx", optimize=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "NaN" in warnings[0], warnings
    assert (artifact / "manifest.json").is_file()


def test_float16_overflow_is_named_under_strict(tiny_model_dir, tmp_path):
    from vexport.export.onnx import export_onnx

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    name = "model.layers.1.self_attn.v_proj.weight"
    rewrite(folder, lambda t: t[name].__setitem__((3, 3), 1e6))  # finite in float32, inf in float16
    with pytest.raises(VexportError, match=name.replace(".", r"\.") + ".*float16"):
        export_onnx(folder, tmp_path / "onnx", dtype="float16", strict=True)
    assert not (tmp_path / "onnx").exists()


def test_gptq_names_the_non_finite_tensor(tiny_model_dir, tmp_path):
    from vexport.model import open_model
    from vexport.export.rtn import write_rtn_checkpoint
    from vexport.quant.gptq import GPTQQuantizer
    from vexport.quant.stream import load_layer

    folder = copy_model(tiny_model_dir, tmp_path / "model")
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite(folder, lambda t: t[name].__setitem__((1, 2), float("inf")))
    with pytest.raises(VexportError, match=name.replace(".", r"\.")):
        write_rtn_checkpoint(folder, tmp_path / "rtn")
    with pytest.raises(VexportError, match=name.replace(".", r"\.")):  # the streaming GPTQ export's reader
        load_layer(open_model(folder), 1, torch.device("cpu"), torch.float32)
    with pytest.raises(VexportError, match=name.replace(".", r"\.")):  # the solver itself
        GPTQQuantizer(load_file(folder / WEIGHTS)[name], name)
    assert leftovers(tmp_path) == [] and not (tmp_path / "rtn").exists()


# ---------------------------------------------------------------------------------------- mistyped paths
def test_mistyped_path_is_no_such_folder_at_once(tmp_path, monkeypatch):
    """No hub lookup: the hub endpoint is a listening socket here, and nothing connects to it."""
    with socket.socket() as hub:
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        cpu = _children_cpu()
        start = time.perf_counter()  # the interpreter's start included
        refused("export", "./modle", "--output", tmp_path / "out", needle="no such folder: ./modle")
        wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
        hub.setblocking(False)
        with pytest.raises(BlockingIOError):
            hub.accept()
    # under 10 s of CPU (about 1 s on an idle core: torch and transformers are never imported); the wall-clock
    # bound is loose because CI shares 2 cores with other work
    assert cpu < 10 and wall < 60, (cpu, wall)
    assert not (tmp_path / "out").exists()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("name", ["/nope/model", "~/nope-model", "a/b/c", "../x/y", "org\\name", "model", "./org/x"])
def test_path_like_names_never_reach_the_hub(name):
    from vexport.model import resolve

    with pytest.raises(VexportError, match="no such folder"):
        resolve(name)


def test_offline_hub_id_is_no_such_folder(monkeypatch):
    from vexport.model import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VexportError, match="no such folder: org/name .*HF_HUB_OFFLINE"):
        resolve("org/name")
