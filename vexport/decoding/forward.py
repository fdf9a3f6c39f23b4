"""One forward of a value model over new tokens with a KV cache, through the runner's declared capability.

``LlamaForTokenClassification.forward`` returns no cache, so incremental scoring needs a runner that runs the
backbone with the cache and then the head: an ``IncrementalRunner`` (``vexport.backends.base``; the fp
reference and GPTQ int4). Other runners declare they are not one, and get a clear error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vexport.backends.base import IncrementalRunner, cache_kwarg, module_dtype
from vexport.errors import InputError

__all__ = ["SESSION_BACKENDS", "cache_kwarg", "check_length", "check_tokens", "incremental_runner", "module_device",
           "module_dtype"]

SESSION_BACKENDS = ("torch", "gptq")  # the IncrementalRunner backends (fp reference, GPTQ int4)


def incremental_runner(model) -> IncrementalRunner:
    """The KV-cache capable runner behind a ``ValueModel``; a clear error on other backends."""
    runner = model.runner
    if not runner.incremental:
        raise InputError(f"KV-cached scoring (sessions, score_group, past_key_values) needs a torch-backed model "
                         f"(backends: {', '.join(SESSION_BACKENDS)}); this model runs on {runner.name}")
    return runner


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def check_tokens(ids: Tensor, config, what: str) -> None:
    """Token ids inside the vocabulary."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise InputError(f"{what} has token ids outside the vocabulary [0, {config.vocab_size})")


def check_length(positions: int, config) -> None:
    """No position past the model's ``max_position_embeddings``."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and positions > limit:
        raise InputError(f"{positions} positions is more than the model's max_position_embeddings ({limit})")
