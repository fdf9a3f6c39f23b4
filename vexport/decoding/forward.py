"""One forward of a value model over new tokens with a KV cache: the backbone and the score head apart.

``LlamaForTokenClassification.forward`` returns no cache, so incremental scoring calls the backbone
(``module.model``) with the cache and then the head (``module.score``), exactly as the full forward does
(its dropout is the identity in eval mode).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor
from transformers import Cache

from vexport.errors import InputError

SESSION_BACKENDS = ("torch", "gptq")  # runners with a transformers ``.module`` (fp reference, GPTQ int4)


def value_module(model) -> torch.nn.Module:
    """The transformers module behind a torch-backed ``ValueModel``; a clear error on other backends."""
    runner = getattr(model, "runner", model)
    module = getattr(runner, "module", None)
    if module is None or not hasattr(module, "score"):
        name = getattr(runner, "name", type(runner).__name__)
        raise InputError(f"KV-cached scoring (sessions, score_group, past_key_values) needs a torch-backed model "
                         f"(backends: {', '.join(SESSION_BACKENDS)}); this model runs on {name}")
    return module


@functools.cache
def cache_kwarg(module_type: type) -> str:
    """The name the module's forward gives its cache argument: ``cache`` (transformers >= 5.x) or the older
    ``past_key_values``."""
    parameters = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def backbone(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, module.base_model_prefix)


def value_forward(module: torch.nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache: Cache) -> Tensor:
    """float32 ``[B, n]``: values of ``n`` new tokens; their keys and values are appended to ``cache``."""
    body = backbone(module)
    kwargs = {cache_kwarg(type(body)): cache}
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return module.score(hidden.last_hidden_state)[..., 0].float()


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The activation dtype (the first floating-point parameter's; int4 buffers are not parameters)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def check_tokens(ids: Tensor, config, what: str) -> None:
    """Token ids inside the vocabulary."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise InputError(f"{what} has token ids outside the vocabulary [0, {config.vocab_size})")


def check_length(positions: int, config) -> None:
    """No position past the model's ``max_position_embeddings``."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and positions > limit:
        raise InputError(f"{positions} positions is more than the model's max_position_embeddings ({limit})")
