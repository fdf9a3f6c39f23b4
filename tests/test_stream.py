"""vexport/quant/stream.py on tiny value models: the solver options, the compute dtype, the finite-weight reader,
one decoder layer built from the checkpoint, its rotary inputs, and `quantize_stream`'s writes, hidden states and
memory (one decoder layer alive at a time). The exported GPTQ checkpoint itself is tested in test_export_gptq.py.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import make_mistral
from vexport.errors import InputError
from vexport.model import open_model
from vexport.quant.gptq import TARGET_DAMP_PERCENT, GPTQQuantizer
from vexport.quant.pack import TENSOR_NAMES, dequantize_gptq_v1
from vexport.quant.stream import (QUANTIZED, GPTQOptions, compute_dtype, finite_tensor, layer_kwargs, load_layer,
                                  quantize_stream)

GROUP = 32
N, L = 4, 24  # calibration windows and their length
NORMS = ("input_layernorm", "post_attention_layernorm")
WEIGHTS = "model.safetensors"


def rewrite(folder: Path, change) -> None:
    """Apply CHANGE (a function of the tensor dict) to FOLDER's model.safetensors."""
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def poisoned(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of SRC whose tensor NAME holds VALUE at one element."""
    shutil.copytree(src, dst)
    rewrite(dst, lambda t: t[name].view(-1).__setitem__(3, value))
    return dst


def decoder_layers() -> list:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return [o for o in gc.get_objects() if type(o) is LlamaDecoderLayer]  # type(): no __getattr__ runs


def calibration(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (N, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def source(tiny_model_dir):
    return open_model(tiny_model_dir)


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir):
    return open_model(tiny_model_dir).load_torch()


@pytest.fixture(scope="module")
def streams(tiny_model_dir) -> SimpleNamespace:
    """quantize_stream two ways on the same windows, neither with keep_reference: plain GPTQ, and GPTQ fitted to
    float targets. Every `write` call is kept, and at each call the indices of the decoder layers alive that did
    not exist before the run. The garbage collector is off during the run: a layer is alive until nothing holds
    it (a layer kept in a reference cycle would be counted, not collected by chance)."""
    runs = {}
    for key, options in (("plain", GPTQOptions(group_size=GROUP)),
                         ("targets", GPTQOptions(group_size=GROUP, float_targets=True))):
        source = open_model(tiny_model_dir)
        before = decoder_layers()
        writes, alive = [], []

        def write(tensors: dict, writes=writes, alive=alive, before=before) -> None:
            alive.append([layer.self_attn.layer_idx for layer in decoder_layers()
                          if not any(layer is old for old in before)])
            writes.append(tensors)

        enabled = gc.isenabled()
        gc.disable()
        try:
            result = quantize_stream(source, calibration(source.config.vocab_size), options, write,
                                     keep_reference=False, batch=3)  # 3 does not divide the 4 windows
            after = [layer for layer in decoder_layers() if not any(layer is old for old in before)]
        finally:
            if enabled:
                gc.enable()
        runs[key] = SimpleNamespace(result=result, writes=writes, alive=alive, after=after, source=source)
    return SimpleNamespace(**runs)


# ------------------------------------------------------------------------------------------ GPTQOptions
def test_solver_kwargs_are_the_quantizers_options():
    """Every option GPTQQuantizer.quantize takes, by its name, and nothing else (float_targets is the stream's)."""
    kwargs = GPTQOptions().solver_kwargs()
    assert kwargs == {"bits": 4, "group_size": 128, "sym": True, "desc_act": True, "damp_percent": 0.01,
                      "block_size": 128, "target_damp_percent": TARGET_DAMP_PERCENT}
    params = inspect.signature(GPTQQuantizer.quantize).parameters
    assert set(kwargs) == set(params) - {"self"}
    custom = GPTQOptions(bits=8, group_size=-1, sym=False, desc_act=False, damp_percent=0.1, block_size=16,
                         float_targets=True, target_damp_percent=0.5).solver_kwargs()
    assert custom == {"bits": 8, "group_size": -1, "sym": False, "desc_act": False, "damp_percent": 0.1,
                      "block_size": 16, "target_damp_percent": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPTQOptions().bits = 3  # type: ignore[misc]


@pytest.mark.parametrize(("device", "dtype"), [("cpu", torch.float32), ("cuda", torch.float16),
                                               ("cuda:1", torch.float16), ("meta", torch.float32)])
def test_compute_dtype(device, dtype):
    assert compute_dtype(torch.device(device)) is dtype


# ------------------------------------------------------------------------------------------ finite_tensor
def test_finite_tensor_reads_the_checkpoint_tensor(source):
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "score.weight"):
        tensor = finite_tensor(source, name)
        assert torch.equal(tensor, source.read_tensor(name)) and tensor.dtype == torch.float32


@pytest.mark.parametrize(("name", "value"), [("model.layers.0.self_attn.k_proj.weight", math.nan),
                                             ("model.layers.1.post_attention_layernorm.weight", -math.inf),
                                             ("model.embed_tokens.weight", math.inf)])
def test_finite_tensor_refuses_nan_and_inf_by_name(tiny_model_dir, tmp_path, name, value):
    folder = poisoned(tiny_model_dir, tmp_path / "model", name, value)
    source = open_model(folder)  # the headers are fine: only reading the values finds it
    message = f"{folder}: tensor {name} holds NaN or infinite values: GPTQ cannot quantize"
    with pytest.raises(InputError, match=re.escape(message)):
        finite_tensor(source, name)
    assert torch.equal(finite_tensor(source, "score.weight"), source.read_tensor("score.weight"))


def test_quantize_stream_refuses_a_non_finite_embedding_before_writing(tiny_model_dir, tmp_path):
    folder = poisoned(tiny_model_dir, tmp_path / "model", "model.embed_tokens.weight", math.nan)
    written = []
    with pytest.raises(InputError, match=re.escape("tensor model.embed_tokens.weight holds NaN")):
        quantize_stream(open_model(folder), calibration(1000), GPTQOptions(group_size=GROUP), written.append)
    assert written == []


def test_quantize_stream_reads_a_layer_only_after_writing_the_one_before(tiny_model_dir, tmp_path):
    """A NaN in layer 1 is found when layer 1 is read: the embedding and all of layer 0 were already written."""
    name = "model.layers.1.mlp.up_proj.weight"
    folder = poisoned(tiny_model_dir, tmp_path / "model", name, math.nan)
    written = []
    with pytest.raises(InputError, match=re.escape(f"{folder}: tensor {name} holds NaN")):
        quantize_stream(open_model(folder), calibration(1000), GPTQOptions(group_size=GROUP), written.append)
    assert len(written) == 2 and list(written[0]) == ["model.embed_tokens.weight"]
    assert {key.split(".")[2] for key in written[1]} == {"0"}


# --------------------------------------------------------------------------------------------- load_layer
@pytest.mark.parametrize("index", [0, 1])
def test_load_layer_is_the_transformers_layer(source, torch_model, index):
    """The same parameters as transformers' model, on the CPU in eval mode, with no meta tensor left."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer = load_layer(source, index, torch.device("cpu"), torch.float32)
    expected = torch_model.model.layers[index].state_dict()
    assert type(layer) is LlamaDecoderLayer and layer.self_attn.layer_idx == index and not layer.training
    state = layer.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in state.items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, expected[key]), key
    half = load_layer(source, index, torch.device("cpu"), torch.float16)
    assert all(t.dtype == torch.float16 and torch.equal(t, expected[k].half()) for k, t in half.state_dict().items())


def test_load_layer_with_layer_kwargs_runs_as_the_model_does(tiny_model_dir, torch_model):
    """Layer 0 then layer 1, read from the shards, on the embeddings with `layer_kwargs`: transformers' hidden
    states after layer 0 and (after the final norm) its last hidden state: causal attention, rotary positions
    0..L-1. As quantize_stream does, attention is set to SDPA first (with no mask it is causal only there)."""
    source = open_model(tiny_model_dir)
    source.config._attn_implementation = "sdpa"
    ids = calibration(source.config.vocab_size, seed=1)
    with torch.no_grad():
        out = torch_model.model(input_ids=ids, output_hidden_states=True)
    embeddings, after_first = out.hidden_states[:2]
    kwargs = layer_kwargs(source.config, L, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        first = load_layer(source, 0, torch.device("cpu"), torch.float32)(embeddings, **kwargs)
        second = load_layer(source, 1, torch.device("cpu"), torch.float32)(first, **kwargs)
        final = torch_model.model.norm(second)
    torch.testing.assert_close(first, after_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, out.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_load_layer_builds_a_mistral_layer(tiny_model_dir, tmp_path):
    from transformers import MistralForTokenClassification
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    model = MistralForTokenClassification.from_pretrained(make_mistral(tiny_model_dir, tmp_path, window=None))
    layer = load_layer(open_model(tmp_path / "mistral"), 1, torch.device("cpu"), torch.float32)
    assert type(layer) is MistralDecoderLayer
    expected = model.model.layers[1].state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in layer.state_dict().items())


# -------------------------------------------------------------------------------------------- layer_kwargs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_kwargs_are_positions_and_rotary_tables(source, torch_model, dtype):
    kwargs = layer_kwargs(source.config, 10, torch.device("cpu"), dtype)
    assert set(kwargs) == {"attention_mask", "position_ids", "position_embeddings"}
    assert kwargs["attention_mask"] is None
    assert torch.equal(kwargs["position_ids"], torch.arange(10)[None])
    cos, sin = kwargs["position_embeddings"]
    head_dim = source.config.hidden_size // source.config.num_attention_heads
    assert cos.shape == sin.shape == (1, 10, head_dim) and cos.dtype == sin.dtype == dtype
    assert bool((cos[0, 0] == 1).all()) and bool((sin[0, 0] == 0).all())  # position 0: no rotation
    probe = torch.zeros(1, 10, 1, dtype=dtype)
    expected_cos, expected_sin = torch_model.model.rotary_emb(probe, torch.arange(10)[None])
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


# ----------------------------------------------------------------------------------------- quantize_stream
def test_quantize_stream_writes_the_embedding_then_one_call_per_layer(streams, source):
    writes = streams.plain.writes
    layers = source.config.num_hidden_layers
    assert len(writes) == 1 + layers
    (embed,) = writes[0].items()
    assert embed[0] == "model.embed_tokens.weight" and embed[1].dtype == torch.float16
    assert torch.equal(embed[1], source.read_tensor("model.embed_tokens.weight").half())
    for index, tensors in enumerate(writes[1:]):
        prefix = f"model.layers.{index}."
        expected = {f"{prefix}{linear}.{part}" for linear in QUANTIZED for part in TENSOR_NAMES}
        assert set(tensors) == expected | {f"{prefix}{norm}.weight" for norm in NORMS}
        for norm in NORMS:
            weight = tensors[f"{prefix}{norm}.weight"]
            assert torch.equal(weight, source.read_tensor(f"{prefix}{norm}.weight").half())
    assert "model.norm.weight" not in set().union(*writes) and "score.weight" not in set().union(*writes)


def test_quantize_stream_packs_each_linear_as_gptq_v1(streams, source):
    """Each Linear's four tensors have the GPTQ v1 shapes and dtypes, act-order groups of GROUP columns, and stand
    for that Linear's own float weight (a swapped or misnamed Linear would be far from it)."""
    for index, tensors in enumerate(streams.plain.writes[1:]):
        for linear in QUANTIZED:
            name = f"model.layers.{index}.{linear}"
            out_f, in_f = source.tensors[f"{name}.weight"][2]
            parts = {part: tensors[f"{name}.{part}"] for part in TENSOR_NAMES}
            assert parts["qweight"].shape == (in_f // 8, out_f) and parts["qweight"].dtype == torch.int32
            assert parts["qzeros"].shape == (in_f // GROUP, out_f // 8) and parts["qzeros"].dtype == torch.int32
            assert parts["scales"].shape == (in_f // GROUP, out_f) and parts["scales"].dtype == torch.float16
            assert parts["g_idx"].shape == (in_f,) and parts["g_idx"].dtype == torch.int32
            assert all(t.device.type == "cpu" and t.is_contiguous() for t in parts.values())
            assert torch.bincount(parts["g_idx"].long()).tolist() == [GROUP] * (in_f // GROUP)
            assert not bool((parts["g_idx"][1:] >= parts["g_idx"][:-1]).all())  # desc_act: not in column order
            weight = source.read_tensor(f"{name}.weight")
            error = float((dequantize_gptq_v1(parts, torch.float32) - weight).norm() / weight.norm())
            assert 0 < error < 0.2, (name, error)


def test_quantize_stream_hidden_states(streams, source):
    """[N, L, H] quantized states, near the float ones but not equal; without keep_reference the float stream
    is dropped, unless float_targets needs it (then it is returned too); float targets fit other weights."""
    hidden = source.config.hidden_size
    plain, targets = streams.plain.result, streams.targets.result
    for result in (plain, targets):
        assert result.hidden_quantized.shape == (N, L, hidden) and result.hidden_quantized.dtype == torch.float32
        assert len(result.seconds_per_layer) == source.config.num_hidden_layers
        assert all(seconds > 0 for seconds in result.seconds_per_layer)
    assert plain.hidden_reference is None
    reference = targets.hidden_reference
    assert reference.shape == (N, L, hidden) and reference.dtype == torch.float32
    for result in (plain, targets):
        error = float((result.hidden_quantized - reference).norm() / reference.norm())
        assert 0 < error < 0.5
    assert not torch.equal(targets.hidden_quantized, plain.hidden_quantized)
    layer_one = streams.plain.writes[2], streams.targets.writes[2]
    changed = [key for key in layer_one[0] if key.endswith("qweight") and not torch.equal(*(w[key] for w in layer_one))]
    assert changed  # layer 1's inputs drifted: fitting to float targets moves its weights


def test_quantize_stream_reference_is_the_float_model(streams, torch_model, source):
    """The float stream kept for float_targets (keep_reference=False) is the float model's last hidden state."""
    from vexport.quant.value_aware import rms_norm

    with torch.no_grad():
        expected = torch_model.model(input_ids=calibration(source.config.vocab_size)).last_hidden_state
    reference = streams.targets.result.hidden_reference
    norm = source.read_tensor("model.norm.weight")
    torch.testing.assert_close(rms_norm(reference, norm, source.config.rms_norm_eps), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("run", ["plain", "targets"])
def test_quantize_stream_holds_one_decoder_layer_at_a_time(streams, run):
    """At each `write` exactly one decoder layer built by the stream is alive, the one written (and, with float
    targets, not its float copy); none before the first layer, none once the stream returns."""
    stream = getattr(streams, run)
    layers = stream.source.config.num_hidden_layers
    assert stream.alive == [[], *([index] for index in range(layers))]
    assert stream.after == []
