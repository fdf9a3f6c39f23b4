"""Shared-prompt best-of-n scoring: the prompt runs once, the n responses as one batch over its KV cache.

The prompt's keys and values are broadcast to the n rows (a view; the responses' forward writes them once
next to their own), and the responses are right-padded, so each response token sees the prompt and its own
earlier tokens at the positions it has in ``prompt + response``: the values are those of scoring each
``prompt + response`` in full, for about ``(P + n R) / (n (P + R))`` of the work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vexport.decoding.cache import TreeCache
from vexport.decoding.forward import check_length, check_tokens, incremental_runner
from vexport.decoding.inputs import pad_right, prompt_batch, response_lists
from vexport.decoding.session import run_block
from vexport.errors import InputError


@torch.inference_mode()
def score_group(model, prompt_ids, responses) -> list[Tensor]:
    """Per-token values (float32 ``[len(r)]``) of each response after one shared prompt ``[P]``.

    ``responses``: a ``[n, R]`` tensor or a list of n token lists (lengths may differ)."""
    runner = incremental_runner(model)
    ids, mask, batched = prompt_batch(prompt_ids)
    if batched and ids.shape[0] != 1:
        raise InputError(f"score_group takes one prompt [P], got {ids.shape[0]} prompts")
    rows = response_lists(responses)
    response_ids, response_mask = pad_right(rows)
    check_tokens(torch.cat([ids[0], response_ids.flatten()]), runner.config, "score_group inputs")
    check_length(ids.shape[1] + response_ids.shape[1], runner.config)
    device = runner.device
    state = TreeCache(runner.config, 1, device)
    run_block(runner, state, ids.to(device), mask.to(device))
    state.broadcast(len(rows))
    values = run_block(runner, state, response_ids.to(device), response_mask.to(device))
    return [values[i, :len(row)] for i, row in enumerate(rows)]

