"""vexport/tiny.py: tiny random value models that load with transformers and give varied per-token values."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForTokenClassification, AutoTokenizer

from vexport.errors import VexportError
from vexport.evalset import builtin_prompt_groups, encode, render
from vexport.tiny import TULU_CHAT_TEMPLATE, make_tiny_value_model

REPO = Path(__file__).resolve().parents[1]


def _values(model_dir: Path, text: str) -> torch.Tensor:
    """Per-token values of `text` (rendered by the caller), float32 [seq]."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([encode(tokenizer, text)])).logits
    assert logits.shape[-1] == 1
    return logits[0, :, 0]


def test_same_seed_gives_identical_files(tmp_path, tiny_model_dir):
    again = make_tiny_value_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_other_seed_changes_weights_not_tokenizer(tmp_path, tiny_model_dir):
    other = make_tiny_value_model(tmp_path / "other", seed=5)
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_config_is_a_one_label_llama_value_model(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"]
    assert len(config["id2label"]) == 1  # num_labels
    assert config["num_attention_heads"] == config["num_key_value_heads"] == 4
    assert config["pad_token_id"] not in (None, config["eos_token_id"])
    assert config["rope_parameters"]["rope_theta"] != 10000.0


def test_gqa_has_fewer_kv_heads_and_runs(tiny_gqa_model_dir):
    model = AutoModelForTokenClassification.from_pretrained(tiny_gqa_model_dir).eval()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.out_features == 2 * model.config.head_dim
    with torch.no_grad():
        assert model(torch.tensor([[1, 50, 60, 70]])).logits.shape == (1, 4, 1)


def test_loads_with_transformers_and_score_has_bias(tiny_model_dir):
    model = AutoModelForTokenClassification.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.num_labels == 1
    assert model.score.bias is not None and model.score.bias.abs().item() > 1e-3
    assert 900 <= len(tokenizer) <= 1100
    assert model.config.vocab_size == len(tokenizer)
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        assert {"score.weight", "score.bias"} <= set(f.keys())


def test_tokenizer_special_tokens_and_single_bos(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>", "<s>", "</s>", "<pad>",
    )
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("Hello there")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert encode(tokenizer, "<s>Hello there") == ids


def test_byte_level_encodes_any_text_without_unknowns(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Zürich façade — naïve 😀 日本語 \t tabs\nnew lines ~`^"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_is_tulu(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template == TULU_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]
    assert render(tokenizer, messages, "Hello!") == "<|user|>\nHi\n<|assistant|>\nHello!"
    chat = [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "Yo"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nYo</s>\n"
    # the markers are plain text, not special tokens
    assert "<|user|>" not in tokenizer.get_vocab()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gqa_model_dir"])
def test_per_token_values_vary(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    group = builtin_prompt_groups()[0]
    values = _values(model_dir, render(tokenizer, group.messages, group.responses[0]))
    assert values.numel() > 20
    assert 0.1 < values.std().item() < 10.0


def test_dtype_is_written(tmp_path):
    out = make_tiny_value_model(tmp_path / "bf16", seed=0, dtype=torch.bfloat16, num_layers=1)
    model = AutoModelForTokenClassification.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 66}, "hidden_size=66"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads=3"),
        ({"gqa": True, "num_heads": 4, "num_kv_heads": 4}, "gqa"),
        ({"gqa": True, "num_heads": 1, "hidden_size": 16}, "gqa"),
        ({"num_layers": 0}, "positive"),
    ],
)
def test_bad_shapes_raise(tmp_path, kwargs, message):
    with pytest.raises(VexportError, match=message):
        make_tiny_value_model(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_script_writes_a_gqa_model(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_value_model.py"), str(out), "--seed", "3", "--gqa",
         "--hidden-size", "32", "--layers", "1"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (32, 1, 2)


def test_script_reports_bad_flags_in_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_script", REPO / "scripts" / "make_tiny_value_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "x"), "--hidden-size", "30"]) == 2
    assert capsys.readouterr().err == "error: hidden_size=30 is not divisible by num_heads=4\n"
