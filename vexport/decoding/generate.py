"""Value-guided decoding and best-of-n for a Hugging Face causal-LM policy and a vexport value model.

The policy must share the value model's tokenizer (the same token ids). Both keep their own KV cache over
the prompt and the accepted tokens; the prompt runs once in each.

**Value-guided decoding** (``value_guided_generate``): at each step the policy proposes K candidates, the
value model scores all K in one forward (``Session.score``), and the candidate ``a`` with the highest

    score(a) = log p_policy(a | s) + beta * V(s, a)

is taken (``do_sample=True`` draws it from ``softmax(score)`` instead). ``log p_policy`` is the policy's own
log-probability at temperature 1 (the sum over a chunk's tokens) and ``V(s, a)`` the value model's value at
the candidate's last token. Sampling from ``p_policy * exp(beta * V)`` is the optimum of the KL-regularised
objective ``E[V] - (1 / beta) KL(p || p_policy)`` that PPO trains for, restricted to the candidates; this is
the token- and block-wise "controlled decoding" of Mudgal et al. 2024 (arXiv 2310.17022), and the greedy,
one-step-lookahead form of the value guidance that PPO-MCTS (Liu et al. 2023, arXiv 2309.15028) spreads
over a search tree with the policy as its prior. ``beta = 0`` is the policy's greedy top-1; a large ``beta``
follows the value alone. With ``chunk=1`` the candidates are the policy's top-K next tokens; with
``chunk=c > 1`` they are K chunks of up to ``c`` tokens sampled from the policy (at ``temperature``), all
K continuations run side by side over the policy's cache with tree attention.

**Best-of-n** (``best_of_n``): n responses sampled from the policy (prompt run once, the n rows decoding as
one batch over it), reranked by the value at each response's last token with ``score_group``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from vexport.decoding.group import score_group
from vexport.decoding.inputs import Chunk, prompt_batch
from vexport.decoding.policy import PolicyState
from vexport.decoding.session import Session
from vexport.errors import InputError

log = logging.getLogger(__name__)


@torch.inference_mode()
def value_guided_generate(policy, value_model, input_ids, *, top_k: int = 4, beta: float = 1.0, chunk: int = 1,
                          max_new_tokens: int = 64, eos_token_id: int | list[int] | None = None,
                          do_sample: bool = False, temperature: float = 1.0,
                          generator: torch.Generator | None = None) -> Tensor:
    """``input_ids`` (``[P]`` or ``[1, P]``) followed by up to ``max_new_tokens`` tokens, same number of dims."""
    prompt = _one_prompt(input_ids)
    _check_positive(top_k=top_k, chunk=chunk, max_new_tokens=max_new_tokens, temperature=temperature)
    eos = _eos_ids(policy, eos_token_id)
    proposer = PolicyState(policy, prompt[None], vocab_limit=value_model.config.vocab_size)
    session = Session(value_model, prompt)
    new: Chunk = []
    while len(new) < max_new_tokens and not (new and new[-1] in eos):
        budget = min(chunk, max_new_tokens - len(new))
        if chunk == 1:
            candidates, log_p = _top_k(proposer.logits[0], top_k)
        else:
            candidates, log_p = _sample_chunks(proposer, top_k, budget, temperature, eos, generator)
        values = session.score(candidates)
        pick = choose(log_p, values.to(log_p.device), beta, do_sample, generator)
        session.advance(candidates[pick])
        proposer.accept(pick, len(candidates), candidates[pick])
        new += candidates[pick]
    log.info("value-guided decoding: %d tokens, final value %.4f", len(new), float(session.values[-1]))
    out = torch.cat([prompt, torch.tensor(new, dtype=torch.long)])
    return out if torch.as_tensor(input_ids).dim() == 1 else out[None]


def choose(log_p: Tensor, values: Tensor, beta: float, do_sample: bool = False,
           generator: torch.Generator | None = None) -> int:
    """The index of the candidate with the highest ``log_p + beta * values`` (or one drawn from its softmax)."""
    scores = log_p.float() + beta * values.float()
    if do_sample:
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
    return int(scores.argmax())


def _top_k(logits: Tensor, k: int) -> tuple[list[Chunk], Tensor]:
    log_p, tokens = torch.log_softmax(logits.float(), -1).topk(min(k, logits.shape[-1]))
    return [[int(t)] for t in tokens], log_p.cpu()


def _sample_chunks(proposer: PolicyState, k: int, length: int, temperature: float, eos: set[int],
                   generator: torch.Generator | None) -> tuple[list[Chunk], Tensor]:
    """K chunks of up to ``length`` tokens sampled from the policy, each ending early at an end token; their
    summed log-probabilities (temperature 1)."""
    logits = proposer.logits[0].expand(k, -1)
    chunks: list[Chunk] = [[] for _ in range(k)]
    log_p = torch.zeros(k)
    for depth in range(length):
        if depth:
            logits = proposer.run_tree(tokens, depth - 1)
        tokens = _sample(logits, temperature, generator)
        step_log_p = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0].cpu()
        for i, token in enumerate(tokens.tolist()):
            if not (chunks[i] and chunks[i][-1] in eos):
                chunks[i].append(token)
                log_p[i] += step_log_p[i]
    return chunks, log_p


def _sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    probs = torch.softmax(logits.float() / temperature, -1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


@dataclass
class BestOfN:
    """``sequence``: the prompt and the best response (the input's number of dims); ``responses``: the n
    sampled responses; ``values``: float32 ``[n]``, each response's value at its last token; ``best``."""

    sequence: Tensor
    responses: list[Tensor]
    values: Tensor
    best: int


@torch.inference_mode()
def best_of_n(policy, value_model, input_ids, *, n: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
              eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None) -> BestOfN:
    """Sample ``n`` responses from ``policy`` and keep the one the value model rates highest."""
    prompt = _one_prompt(input_ids)
    _check_positive(n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    responses = sample_responses(policy, prompt, n, max_new_tokens, temperature, _eos_ids(policy, eos_token_id),
                                 generator, vocab_limit=value_model.config.vocab_size)
    per_token = score_group(value_model, prompt, responses)
    values = torch.stack([v[-1] for v in per_token]).cpu()
    best = int(values.argmax())
    sequence = torch.cat([prompt, torch.tensor(responses[best], dtype=torch.long)])
    log.info("best-of-%d: values %s, picked %d", n, [round(float(v), 4) for v in values], best)
    return BestOfN(sequence if torch.as_tensor(input_ids).dim() == 1 else sequence[None],
                   [torch.tensor(r, dtype=torch.long) for r in responses], values, best)


def sample_responses(policy, prompt: Tensor, n: int, max_new_tokens: int, temperature: float, eos: set[int],
                     generator: torch.Generator | None = None, vocab_limit: int | None = None) -> list[Chunk]:
    """``n`` responses sampled from ``policy`` after ``prompt`` ``[P]``: the prompt runs once, the n rows then
    decode as one batch over its cache; each response ends at its first end token (kept)."""
    proposer = PolicyState(policy, prompt[None], vocab_limit=vocab_limit)
    proposer.broadcast(n)
    responses: list[Chunk] = [[] for _ in range(n)]
    alive = torch.ones(n, dtype=torch.long)
    for step in range(max_new_tokens):
        tokens = _sample(proposer.logits, temperature, generator).cpu()
        for i in alive.nonzero()[:, 0].tolist():
            responses[i].append(int(tokens[i]))
        alive = alive * torch.tensor([int(r[-1] not in eos) for r in responses])
        if not alive.any() or step == max_new_tokens - 1:
            break
        proposer.logits = proposer.run_block(tokens[:, None].to(proposer.device), alive[:, None].to(proposer.device))
    return responses


def _one_prompt(input_ids) -> Tensor:
    ids, _, batched = prompt_batch(input_ids)
    if batched and ids.shape[0] != 1:
        raise InputError(f"decoding takes one prompt ([P] or [1, P]), got {ids.shape[0]}")
    return ids[0].cpu()


def _eos_ids(policy, eos_token_id) -> set[int]:
    if eos_token_id is None:
        config = getattr(policy, "generation_config", None) or policy.config
        eos_token_id = getattr(config, "eos_token_id", None) or getattr(policy.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def _check_positive(**numbers) -> None:
    for name, value in numbers.items():
        if not value > 0:
            raise InputError(f"{name} must be positive, got {value}")
