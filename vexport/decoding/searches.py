"""One function per search, each answering one prompt with the same record (``Generation``):

- ``greedy_search``: the policy's top token at every step;
- ``best_of_n_search``: n sampled responses, the one the value model rates highest (``best_of_n``);
- ``guided_search``: value-guided decoding, a one-step lookahead (``value_guided_generate``);
- ``mcts_search``: PPO-MCTS (``ppo_mcts_generate``, exact or fast mode).

``forwards`` counts the policy's forward calls (the value model's are about as many); ``values`` is the
value model's value at every token of the response (the response scored once after the search, not counted).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch

from vexport.decoding.generate import _eos_ids, best_of_n, value_guided_generate
from vexport.decoding.group import score_group
from vexport.decoding.inputs import token_list
from vexport.decoding.mcts import ppo_mcts_generate
from vexport.decoding.policy import PolicyState

SEARCHES = ("greedy", "best-of-n", "guided", "mcts")


@dataclass
class Generation:
    """``response``: its token ids; ``values``: the value at each of them; ``forwards``: policy forward calls;
    ``tokens``: ``len(response)``; ``seconds``: the search's wall time."""

    response: list[int]
    values: list[float]
    forwards: int
    tokens: int
    seconds: float

    def record(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _counted(module):
    """Count ``module``'s forward calls: yields a one-element list holding the count."""
    count = [0]
    handle = module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def _record(value_model, prompt: list[int], response: list[int], forwards: int, start: float) -> Generation:
    seconds = time.perf_counter() - start
    values = score_group(value_model, torch.tensor(prompt), [response])[0].tolist() if response else []
    return Generation(response, values, forwards, len(response), seconds)


@torch.inference_mode()
def greedy_search(policy, value_model, prompt, *, max_new_tokens: int = 64, eos_token_id=None) -> Generation:
    prompt, eos, start = token_list(prompt, "prompt"), _eos_ids(policy, eos_token_id), time.perf_counter()
    with _counted(policy) as calls:
        state = PolicyState(policy, torch.tensor([prompt]), vocab_limit=value_model.config.vocab_size)
        response: list[int] = []
        while len(response) < max_new_tokens and not (response and response[-1] in eos):
            response.append(int(state.logits[0].argmax()))
            if len(response) < max_new_tokens and response[-1] not in eos:
                state.logits = state.run_block(torch.tensor([[response[-1]]]), torch.ones(1, 1, dtype=torch.long))
    return _record(value_model, prompt, response, calls[0], start)


def best_of_n_search(policy, value_model, prompt, *, n: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
                     eos_token_id=None, seed: int | None = None) -> Generation:
    prompt, start = token_list(prompt, "prompt"), time.perf_counter()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with _counted(policy) as calls:
        result = best_of_n(policy, value_model, torch.tensor(prompt), n=n, max_new_tokens=max_new_tokens,
                           temperature=temperature, eos_token_id=eos_token_id, generator=generator)
    return _record(value_model, prompt, result.sequence[len(prompt):].tolist(), calls[0], start)


def guided_search(policy, value_model, prompt, *, top_k: int = 4, beta: float = 1.0, max_new_tokens: int = 64,
                  eos_token_id=None) -> Generation:
    prompt, start = token_list(prompt, "prompt"), time.perf_counter()
    with _counted(policy) as calls:
        out = value_guided_generate(policy, value_model, torch.tensor(prompt), top_k=top_k, beta=beta,
                                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    return _record(value_model, prompt, out[len(prompt):].tolist(), calls[0], start)


def mcts_search(policy, value_model, prompt, *, max_new_tokens: int = 64, eos_token_id=None, **settings) -> Generation:
    """PPO-MCTS on one prompt; ``settings``: those of ``ppo_mcts_generate`` (``sim``, ``k``, ``mode``, ...)."""
    prompt = token_list(prompt, "prompt")
    out = ppo_mcts_generate(policy, value_model, torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id, **settings)
    response = out.responses(len(prompt))[0]
    return Generation(response, out.values[0], out.forwards, len(response), out.seconds)
