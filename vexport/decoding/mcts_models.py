"""The models of a PPO-MCTS search run over a ``TreeKV``: the policy (priors), the value model (leaf values),
optionally a reference policy (KL penalties) and a reward model (terminal values), each forward evaluating
every new leaf of every prompt at once, turned into ``Evaluation``s as the reference computes them."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vexport.decoding.cache import additive_mask
from vexport.decoding.forward import incremental_runner, module_device, module_dtype
from vexport.decoding.mcts_tree import Evaluation, Node, Settings
from vexport.decoding.policy import policy_logits
from vexport.decoding.tree_cache import TreeKV


class SearchModels:
    """Policy, value model, reference policy and reward model; ``forwards`` counts forwards of each."""

    def __init__(self, policy, value_model, ref_policy, reward_model, settings: Settings, eos: set[int]):
        self.policy, self.ref_policy, self.reward_model = policy, ref_policy, reward_model
        self.value = incremental_runner(value_model)
        self.settings, self.eos = settings, eos
        self.device = module_device(policy)
        self.vocab_limit = value_model.config.vocab_size
        self.use_ref = settings.kl_coef != 0.0
        self.configs = {"policy": policy.config, "value": self.value.config}
        if self.use_ref:
            self.configs["ref"] = ref_policy.config
        self.forwards = 0

    def run_prompts(self, kv: TreeKV, ids: Tensor, mask: Tensor, prefix: list[list[int]]) -> list[Evaluation]:
        """Run the left-padded prompts ``[B, P]``; the evaluation of each prompt's last token."""
        mask2d, positions = kv.prompt_inputs(mask)
        logits, ref_logits, values = self._forward(kv, ids.to(self.device), mask2d, positions, last_only=True)
        return self._evaluate(logits[:, 0], None if ref_logits is None else ref_logits[:, 0], values[:, -1],
                              [seq[-1] for seq in prefix], prefix)

    def run_leaves(self, kv: TreeKV, picks: list[list[tuple[Node, int]]], roots: list[Node | None],
                   prefix: list[list[int]], width: int) -> list[list[Evaluation]]:
        """Run one new leaf per pick (``picks[b]``: ``(node, action)`` edges of row ``b``) in one forward of
        each model; the new leaves' evaluations, row by row."""
        batch = len(picks)
        ids = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        paths: list[list] = [[None] * width for _ in range(batch)]
        for b, row in enumerate(picks):
            for w, (node, action) in enumerate(row):
                ids[b, w], positions[b, w] = int(node.evaluation.tokens[action]), node.pos + 1
                paths[b][w] = node.ancestors(roots[b])
        seen = kv.leaf_inputs(paths)
        logits, ref_logits, values = self._forward(kv, ids.to(self.device), seen, positions.to(self.device))
        flat = [(b, w) for b, row in enumerate(picks) for w in range(len(row))]
        if not flat:
            return [[] for _ in picks]
        rows, cols = torch.tensor([f[0] for f in flat]), torch.tensor([f[1] for f in flat])
        sequences = [prefix[b] + _path_tokens(*picks[b][w], roots[b]) for b, w in flat]
        evaluations = self._evaluate(logits[rows, cols], None if ref_logits is None else ref_logits[rows, cols],
                                     values[rows, cols], [s[-1] for s in sequences], sequences)
        out: list[list[Evaluation]] = [[] for _ in picks]
        for (b, _), evaluation in zip(flat, evaluations):
            out[b].append(evaluation)
        return out

    def _forward(self, kv: TreeKV, ids: Tensor, mask: Tensor, positions: Tensor, last_only: bool = False):
        """float32 policy logits ``[B, n, V]`` (``n = 1`` with ``last_only``), reference logits or None,
        values ``[B, n]``; a 4-D boolean ``mask`` becomes each model's additive mask."""
        self.forwards += 1
        logits = policy_logits(self.policy, ids, _mask_for(mask, module_dtype(self.policy)), positions,
                               kv.caches["policy"], last_only)
        ref_logits = None
        if self.use_ref:
            ref_logits = policy_logits(self.ref_policy, ids, _mask_for(mask, module_dtype(self.ref_policy)),
                                       positions, kv.caches["ref"], last_only)
        value_mask = _mask_for(mask, self.value.dtype).to(self.value.device)
        values = self.value.cached_values(ids.to(self.value.device), value_mask, positions.to(self.value.device),
                                          kv.caches["value"])
        return self._limit(logits), self._limit(ref_logits), values.float().cpu()

    def _evaluate(self, logits: Tensor, ref_logits: Tensor | None, values: Tensor, last: list[int],
                  sequences: list[list[int]]) -> list[Evaluation]:
        """Evaluations of N nodes from their policy logits ``[N, V]``, reference logits and values ``[N]``."""
        s = self.settings
        priors = torch.softmax(logits / s.te, dim=-1)
        klpens = None
        if self.use_ref:
            gap = priors - torch.softmax(ref_logits / s.te, dim=-1)
            klpens = (-s.kl_coef * (gap.clamp_min(0.0) if s.clamp_kl else gap)).cpu().numpy()
        ends = [token in self.eos for token in last]
        values = self._rewarded(values, ends, sequences)
        priors = priors.cpu().numpy()
        k = min(s.k, priors.shape[-1])
        top = np.argpartition(priors, -k, axis=-1)[:, -k:]  # the reference's order of the children
        return [Evaluation(top[i].astype(np.int64), priors[i, top[i]], np.float32(values[i]),
                           None if klpens is None else klpens[i, top[i]], ends[i]) for i in range(len(last))]

    def _rewarded(self, values: Tensor, ends: list[bool], sequences: list[list[int]]) -> np.ndarray:
        """Values, with the reward model's ``reward_gain * r + reward_bias`` at end tokens (as the reference,
        only with a KL penalty, ``kl_coef != 0``)."""
        values = values.float().clone()
        if self.reward_model is None or not self.use_ref or not any(ends):
            return values.numpy()
        for i, end in enumerate(ends):
            if end:
                reward = self.reward_model.sequence_values(torch.tensor([sequences[i]]))[0].float().cpu()
                values[i] = reward * self.settings.reward_gain + self.settings.reward_bias
        return values.numpy()

    def _limit(self, logits: Tensor | None) -> Tensor | None:
        """No token the value model does not know (a policy's vocabulary may be padded past it)."""
        if logits is not None and logits.shape[-1] > self.vocab_limit:
            logits = logits.clone()
            logits[..., self.vocab_limit:] = float("-inf")
        return logits


def _mask_for(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A 2-D mask as it is; a 4-D boolean mask as the model's additive mask."""
    return additive_mask(mask, dtype) if mask.dim() == 4 else mask


def _path_tokens(node: Node, action: int, root: Node | None) -> list[int]:
    """The tokens from below ``root`` down to ``node``, then the action's token."""
    tokens, walk = [int(node.evaluation.tokens[action])], node
    while walk is not root:
        tokens.append(walk.token)
        walk = walk.parent
    return tokens[::-1]
