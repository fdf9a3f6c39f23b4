"""Value-guided decoding with vexport value models: KV-cached sessions with tree-attention candidate scoring,
shared-prompt best-of-n scoring, and decoding helpers for a Hugging Face causal-LM policy.

- ``Session`` (``model.session(prompt_ids)``): ``values``, ``score(candidates)``, ``advance(tokens)``;
- ``score_group`` (``model.score_group(prompt_ids, responses)``): per-token values of n responses to one prompt;
- ``forward_with_cache``: the ``past_key_values``/``use_cache`` path of ``ValueModel.__call__``;
- ``value_guided_generate`` and ``best_of_n``: decoding with a policy that shares the value model's tokenizer;
- ``ppo_mcts_generate``: PPO-MCTS (Liu et al. 2023), exact (the reference's search) or fast, over a
  tree-structured KV cache (``TreeKV``);
- ``greedy_search``, ``best_of_n_search``, ``guided_search``, ``mcts_search``: one prompt each, the same
  ``Generation`` record (what ``vexport generate`` writes).

Only the torch backends (``SESSION_BACKENDS``: the fp reference and the GPTQ int4 runtime) keep a KV cache.
"""

from __future__ import annotations

from vexport.decoding.forward import SESSION_BACKENDS
from vexport.decoding.generate import BestOfN, best_of_n, choose, sample_responses, value_guided_generate
from vexport.decoding.group import score_group
from vexport.decoding.incremental import ValueOutputWithPast, forward_with_cache
from vexport.decoding.mcts import MCTSOutput, ppo_mcts_generate
from vexport.decoding.searches import Generation, best_of_n_search, greedy_search, guided_search, mcts_search
from vexport.decoding.session import Session

__all__ = [
    "SESSION_BACKENDS",
    "BestOfN",
    "Generation",
    "MCTSOutput",
    "Session",
    "ValueOutputWithPast",
    "best_of_n",
    "best_of_n_search",
    "choose",
    "forward_with_cache",
    "greedy_search",
    "guided_search",
    "mcts_search",
    "ppo_mcts_generate",
    "sample_responses",
    "score_group",
    "value_guided_generate",
]
