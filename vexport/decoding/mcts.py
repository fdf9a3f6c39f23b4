"""PPO-MCTS decoding (Liu et al. 2023, "Don't throw away your value model!", arXiv 2309.15028): before each
token, a Monte-Carlo tree search guided by the PPO policy (priors) and value model (leaf values).

    out = ppo_mcts_generate(policy, value_model, input_ids, attention_mask, sim=10, k=10)
    out.sequences, out.attention_mask      # [B, P + T], as the reference's generate returns them

The settings keep the reference's names and meaning (``ppo_mcts.py`` of liujch1998/ppo-mcts): ``sim``
simulations per token, each adding one node; a node's children are the policy's top ``k`` tokens with priors
``softmax(logits / te)``; selection by PUCT with ``c_puct``; a leaf's value from the value model, replaced at
a terminal (end) token by ``reward_gain * r + reward_bias`` from ``reward_model`` (as in the reference, only
when ``kl_coef != 0``); with a ``ref_policy`` and ``kl_coef``, an edge's Q is ``gamma * V(child) - kl_coef *
(p - p_ref)`` (``clamp_kl``: the difference clamped at 0), else ``V(child)``. The next token is the root's
most visited child (``do_sample``: drawn from the visit counts to the power ``1 / td``, ``anneal_td`` taking
``td`` towards 0 over the response, cut to the ``top_p`` nucleus). Rows stop at an end token; later
positions hold ``pad_token_id`` with attention mask 0. The search goes on below end tokens, as the
reference's does (a terminal node's own value is never averaged).

``mode="exact"`` (the default) runs the reference's search: one leaf per simulation and a fresh tree for
every token, so with ``do_sample=False`` in float32 it picks the reference's tokens. It is still faster: the
root is not run again (the chosen child was already evaluated), and the models keep a tree-structured KV
cache (``TreeKV``: every node's keys and values stored once, a leaf run with a mask over its ancestors)
instead of concatenating every ancestor's slice at every expansion.

``mode="fast"`` changes the search in two documented ways (each also a keyword of its own):

- ``reuse_tree=True``: the subtree under the chosen token becomes the next token's tree, with its visit
  counts and values, and only the simulations it lacks are run: the tree is searched until it holds
  ``sim`` nodes below the root, as in exact mode, but the nodes kept from the last token are not run again.
- ``leaves=W`` (8 in fast mode): each forward of each model expands up to ``W`` leaves per prompt. The
  ``W`` selections of a forward are made one after another with a *virtual loss* (every edge on a selected
  path counts one more visit and its Q is lowered by ``virtual_loss`` until the forward is done), so they
  spread out, and a selection passes over the edges already chosen in this forward (taking its node's next
  best edge). The ``sim`` simulations then take about ``sim / W`` forwards, and the tree differs from the
  sequential one: one forward expands at most one new level, so a fresh root's children tend to share the
  visits; ties in the root's visit counts then go to the higher prior (not the smaller token id). Keep
  ``W`` well below ``sim`` (with ``W >= sim`` a fresh root's choice is the policy's top token).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vexport.decoding.generate import _eos_ids
from vexport.decoding.mcts_models import SearchModels
from vexport.decoding.mcts_tree import Node, Settings, annealed_td, backup, choose_token, expand, select
from vexport.decoding.tree_cache import TreeKV
from vexport.errors import InputError

log = logging.getLogger(__name__)

MODES = ("exact", "fast")


@dataclass
class MCTSOutput:
    """``sequences``/``attention_mask`` ``[B, P + T]``; ``values[b]``: the value of each generated token of
    row ``b`` (the value model's, at the node of that token); ``forwards``: forwards of each model;
    ``kv_bytes``: the largest KV memory held; ``nodes``: the most tree nodes held at once (all rows)."""

    sequences: Tensor
    attention_mask: Tensor
    values: list[list[float]]
    forwards: int
    seconds: float
    kv_bytes: int
    nodes: int

    def responses(self, prompt_width: int) -> list[list[int]]:
        """Each row's generated tokens (up to and including its end token)."""
        return [row[prompt_width:][mask[prompt_width:].bool()].tolist()
                for row, mask in zip(self.sequences, self.attention_mask)]


@dataclass
class Plan:
    """How the search runs (``mode`` and its options, see the module docstring)."""

    leaves: int = 1
    reuse_tree: bool = False
    virtual_loss: float = 1.0

    @classmethod
    def of(cls, mode: str, leaves: int | None, reuse_tree: bool | None, virtual_loss: float) -> "Plan":
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        fast = mode == "fast"
        plan = cls(leaves if leaves is not None else (8 if fast else 1),
                   reuse_tree if reuse_tree is not None else fast, virtual_loss)
        if plan.leaves < 1:
            raise InputError(f"leaves must be at least 1, got {plan.leaves}")
        return plan


@torch.inference_mode()
def ppo_mcts_generate(policy, value_model, input_ids, attention_mask=None, *, ref_policy=None, reward_model=None,
                      max_new_tokens: int = 20, sim: int = 10, k: int = 10, c_puct: float = 8.0, te: float = 1.0,
                      do_sample: bool = False, td: float = 1.0, anneal_td: bool = True, top_p: float = 1.0,
                      gamma: float = 1.0, kl_coef: float = 0.0, clamp_kl: bool = False, reward_gain: float = 1.0,
                      reward_bias: float = 0.0, eos_token_id: int | list[int] | None = None,
                      pad_token_id: int | None = None, mode: str = "exact", leaves: int | None = None,
                      reuse_tree: bool | None = None, virtual_loss: float = 1.0, seed: int | None = None,
                      on_token=None) -> MCTSOutput:
    """PPO-MCTS over left-padded prompts ``input_ids`` ``[B, P]`` (see the module docstring).

    ``policy``/``ref_policy``: Hugging Face causal LMs; ``value_model``/``reward_model``: vexport models
    (``vexport.load``) on a backend with sessions. ``on_token(n)`` is called after every generated token."""
    settings = Settings(sim, k, c_puct, te, do_sample, td, anneal_td, top_p, gamma, kl_coef, clamp_kl,
                        reward_gain, reward_bias)
    _check(settings, max_new_tokens, ref_policy)
    plan = Plan.of(mode, leaves, reuse_tree, virtual_loss)
    ids, mask = _prompts(input_ids, attention_mask)
    eos = _eos_ids(policy, eos_token_id)
    models = SearchModels(policy, value_model, ref_policy, reward_model, settings, eos)
    search = _Search(models, settings, plan, ids, mask, np.random.default_rng(seed))
    start = time.perf_counter()
    search.run(max_new_tokens, _pad_id(policy, pad_token_id, eos), on_token or (lambda n=1: None))
    out = search.output(time.perf_counter() - start)
    log.info("PPO-MCTS (%s): %d prompts, %d forwards of each model, %.1f s, peak %d nodes / %d KV bytes", mode,
             len(out.values), out.forwards, out.seconds, out.nodes, out.kv_bytes)
    return out


class _Search:
    """The B search trees of one call, their TreeKV and the tokens generated so far."""

    def __init__(self, models: SearchModels, settings: Settings, plan: Plan, ids: Tensor, mask: Tensor, rng):
        self.models, self.settings, self.plan, self.rng = models, settings, plan, rng
        self.kv = TreeKV(models.configs, ids.shape[0], models.device)
        self.prefix = [row[m.bool()].tolist() for row, m in zip(ids, mask)]  # real tokens of each root sequence
        self.ids, self.mask = ids, mask
        self.values: list[list[float]] = [[] for _ in self.prefix]
        evaluations = models.run_prompts(self.kv, ids, mask, self.prefix)
        self.roots: list[Node | None] = [
            Node(seq[-1], None, len(seq) - 1, dataclasses.replace(e, terminal=False))
            for seq, e in zip(self.prefix, evaluations)]
        self.kv_bytes, self.nodes = self.kv.nbytes(), 0

    def run(self, max_new_tokens: int, pad_id: int, on_token) -> None:
        for index in range(max_new_tokens):
            if all(root is None for root in self.roots):
                break
            self.simulate()
            td = annealed_td(self.settings, index, max_new_tokens)
            chosen = [None if root is None else self._child(root, td) for root in self.roots]
            self._append(chosen, pad_id)
            self._advance(chosen)
            on_token(1)

    def simulate(self) -> None:
        """``sim`` new nodes per live row, up to ``plan.leaves`` per row in each forward."""
        made = [self.settings.sim if root is None else root.visits - 1 for root in self.roots]  # kept nodes count
        while min(made) < self.settings.sim:
            picks = [self._pick(root, min(self.plan.leaves, self.settings.sim - n)) if n < self.settings.sim
                     else [] for root, n in zip(self.roots, made)]
            self._expand(picks)
            made = [n + len(p) for n, p in zip(made, picks)]

    def _pick(self, root: Node, width: int) -> list[tuple[Node, int]]:
        """Up to ``width`` unexplored edges, chosen one after another under virtual loss, each passing over
        the edges already chosen."""
        picks, undo, pending = [], [], {}
        for _ in range(width):
            pick = select(root, self.settings.c_puct, pending)
            if pick is None:
                break
            node, action = pick
            picks.append(pick)
            pending.setdefault(node, set()).add(action)
            if width > 1:
                undo += _virtual_loss(node, action, root, self.plan.virtual_loss)
        for node, action, q in reversed(undo):
            node.visits, node.child_visits[action], node.qs[action] = node.visits - 1, node.child_visits[action] - 1, q
        return picks

    def _expand(self, picks: list[list[tuple[Node, int]]]) -> None:
        width = max(len(p) for p in picks)
        start = self.kv.columns
        evaluations = self.models.run_leaves(self.kv, picks, self.roots, self.prefix, width)
        for b, row in enumerate(picks):
            for w, (node, action) in enumerate(row):
                leaf = expand(node, action, evaluations[b][w], start + w)
                backup(leaf, self.roots[b], self.settings)
        self.kv_bytes = max(self.kv_bytes, self.kv.nbytes())
        self.nodes = max(self.nodes, sum(_count(root) for root in self.roots if root is not None))

    def _child(self, root: Node, td: float) -> Node:
        token = choose_token(root, td, self.settings.do_sample, self.settings.top_p, self.rng, self.plan.leaves > 1)
        return root.children[int(np.nonzero(root.evaluation.tokens == token)[0][0])]

    def _append(self, chosen: list[Node | None], pad_id: int) -> None:
        tokens = torch.tensor([pad_id if c is None else c.token for c in chosen], dtype=torch.long)
        live = torch.tensor([c is not None for c in chosen], dtype=torch.long)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, live[:, None]], dim=1)
        for b, child in enumerate(chosen):
            if child is not None:
                self.values[b].append(float(child.evaluation.value))
                self.prefix[b].append(child.token)

    def _advance(self, chosen: list[Node | None]) -> None:
        """Move each root to its chosen child, keep the caches' root sequences (and, with ``reuse_tree``, the
        chosen subtree), drop everything else."""
        self.kv.commit([None if c is None else c.column for c in chosen])
        roots, keep = [], []
        for child in chosen:
            if child is None or child.terminal:
                roots.append(None)
                keep.append([])
            elif self.plan.reuse_tree:
                child.parent = None
                roots.append(child)
                keep.append([n.column for n in _subtree(child) if n is not child])
            else:
                roots.append(Node(child.token, None, child.pos, child.evaluation, child.column))
                keep.append([])
        moved = self.kv.compact(keep)
        for b, root in enumerate(roots):
            for node in _subtree(root) if root is not None else ():
                node.column = moved[b].get(node.column, -1)
        self.roots = roots

    def output(self, seconds: float) -> MCTSOutput:
        return MCTSOutput(self.ids, self.mask, self.values, self.models.forwards, seconds, self.kv_bytes,
                          self.nodes)


def _virtual_loss(node: Node, action: int, root: Node, loss: float) -> list[tuple[Node, int, np.float32]]:
    """Count one more visit on every edge from ``root`` to ``(node, action)`` and lower its Q by ``loss``;
    returns what to restore."""
    undo = []
    while True:
        undo.append((node, action, node.qs[action]))
        node.visits += 1
        node.child_visits[action] += 1
        node.qs[action] = node.qs[action] - np.float32(loss)
        if node is root:
            return undo
        node, action = node.parent, node.parent.children.index(node)


def _subtree(root: Node) -> list[Node]:
    nodes, stack = [], [root]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack += [c for c in node.children if c is not None]
    return nodes


def _count(root: Node) -> int:
    return len(_subtree(root))


def _prompts(input_ids, attention_mask) -> tuple[Tensor, Tensor]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"input_ids must be integer token ids [B, P], got {tuple(ids.shape)} {ids.dtype}")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).reshape(ids.shape)
    if not bool(mask[:, -1].all()):
        raise InputError("prompts must be left-padded: every row's last token must be real (attention_mask 1)")
    return ids.long().cpu(), mask.long().cpu()


def _pad_id(policy, pad_token_id: int | None, eos: set[int]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    pad = getattr(policy.config, "pad_token_id", None)
    return int(pad) if pad is not None else min(eos, default=0)


def _check(settings: Settings, max_new_tokens: int, ref_policy) -> None:
    s = settings
    for name, value in (("max_new_tokens", max_new_tokens), ("sim", s.sim), ("k", s.k)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    for name in ("c_puct", "te", "td", "top_p", "reward_gain"):
        if not getattr(s, name) > 0:
            raise InputError(f"{name} must be positive, got {getattr(s, name)}")
    if not 0 < s.gamma <= 1:
        raise InputError(f"gamma must be in (0, 1], got {s.gamma}")
    if s.kl_coef < 0 or (s.kl_coef > 0 and ref_policy is None):
        raise InputError(f"kl_coef must be >= 0 and needs a ref_policy when > 0 (got {s.kl_coef})")
    if not math.isfinite(s.reward_bias):
        raise InputError(f"reward_bias must be a finite number, got {s.reward_bias}")
