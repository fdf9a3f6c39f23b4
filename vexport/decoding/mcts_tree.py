"""The PPO-MCTS search tree of one prompt: PUCT selection, expansion from an evaluation, value backup, and the
choice of the next token from the root's visit counts (Liu et al. 2023, arXiv 2309.15028, Algorithm 1).

Statistics are kept as the paper's reference code keeps them, so that its decisions are reproduced: priors,
values and Q in float32, visit counts as integers, and the PUCT scores and the running-mean value updates
computed in float64 from them. Nothing here runs a model: ``Evaluation`` is what the models said of a node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Evaluation:
    """What the models said of one node: its top-k next tokens and their priors (``softmax(logits / te)``,
    float32, in ``np.argpartition`` order as the reference stores them), the KL penalty of each (``None``
    without a reference policy), its value (the reward for a terminal node when a reward model is used),
    and whether its token ended the sequence."""

    tokens: np.ndarray
    priors: np.ndarray
    value: np.float32
    klpens: np.ndarray | None
    terminal: bool


@dataclass
class Settings:
    """The search settings, with the reference's names and meaning (see ``vexport.decoding.mcts``)."""

    sim: int = 10
    k: int = 10
    c_puct: float = 8.0
    te: float = 1.0
    do_sample: bool = False
    td: float = 1.0
    anneal_td: bool = True
    top_p: float = 1.0
    gamma: float = 1.0
    kl_coef: float = 0.0
    clamp_kl: bool = False
    reward_gain: float = 1.0
    reward_bias: float = 0.0


@dataclass(eq=False)
class Node:
    """One node: the token that led to it, its statistics and its children (``children[a]``: the node
    reached by action ``a``, i.e. token ``tokens[a]``, or None while unexplored)."""

    token: int
    parent: "Node | None"
    pos: int  # the position id of its token
    evaluation: Evaluation
    column: int = -1  # its keys' and values' column in the TreeKV (-1: a prompt token)
    visits: int = 1
    value: np.float32 = field(default=np.float32(0.0))
    qs: np.ndarray = field(default=None)
    child_visits: np.ndarray = field(default=None)
    children: list = field(default=None)

    def __post_init__(self):
        e = self.evaluation
        self.value = np.float32(e.value)
        self.qs = np.full(len(e.tokens), self.value, dtype=np.float32)  # children's Q start at this value
        self.child_visits = np.zeros(len(e.tokens), dtype=np.int32)
        self.children = [None] * len(e.tokens)

    @property
    def terminal(self) -> bool:
        return self.evaluation.terminal

    def puct(self, c_puct: float) -> np.ndarray:
        """``Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))`` in float64."""
        explore = np.sqrt(np.float64(self.visits)) * c_puct * self.evaluation.priors / (self.child_visits + 1)
        return self.qs + explore

    def ancestors(self, root: "Node") -> list[int]:
        """The TreeKV columns of this node and its ancestors below ``root`` (the root is in the sequence)."""
        columns, node = [], self
        while node is not root:
            columns.append(node.column)
            node = node.parent
        return columns


def select(root: Node, c_puct: float, pending: dict | None = None) -> tuple[Node, int] | None:
    """Walk down by the highest PUCT score (first on ties) to an unexplored edge: ``(node, action)``.
    ``pending[node]``: actions already being expanded, passed over (None when every action at a node is)."""
    node = root
    while True:
        scores = node.puct(c_puct)
        if pending and node in pending:
            scores[list(pending[node])] = -np.inf
            if np.isneginf(scores).all():
                return None
        action = int(np.argmax(scores))
        child = node.children[action]
        if child is None:
            return node, action
        node = child


def expand(parent: Node, action: int, evaluation: Evaluation, column: int) -> Node:
    child = Node(int(parent.evaluation.tokens[action]), parent, parent.pos + 1, evaluation, column)
    parent.children[action] = child
    return child


def backup(leaf: Node, root: Node, settings: Settings) -> None:
    """Back the new leaf's value up to the root: each edge's Q becomes its child's value (``gamma * V +``
    the KL penalty when a reference policy is used; the reference applies no ``gamma`` otherwise), and each
    non-terminal node's value is the visit-weighted mean of its children's Q (its own evaluation counted once)."""
    node = leaf
    while node is not root:
        parent, action = node.parent, node.parent.children.index(node)
        old_q = np.float64(parent.qs[action])
        if settings.kl_coef != 0.0:
            parent.qs[action] = np.float32(settings.gamma) * node.value + parent.evaluation.klpens[action]
        else:
            parent.qs[action] = node.value
        parent.child_visits[action] += 1
        if not parent.terminal:
            mean = (np.float64(parent.value) * parent.visits - old_q * (node.visits - 1)
                    + np.float64(parent.qs[action]) * node.visits) / (parent.visits + 1.0)
            parent.value = np.float32(mean)
        parent.visits += 1
        node = parent


def visit_weights(root: Node, td: float) -> np.ndarray:
    """The root children's visit counts raised to ``1 / td`` (float64)."""
    return root.child_visits.astype(np.float64) ** (1.0 / td)


def choose_token(root: Node, td: float, do_sample: bool, top_p: float, rng: np.random.Generator | None,
                 ties_by_prior: bool = False) -> int:
    """The most visited child's token (the smallest token id on ties, as an argmax over the vocabulary; with
    ``ties_by_prior``, the highest prior), or one drawn from the visit counts to the power ``1 / td``, cut to
    the top-p nucleus."""
    weights, tokens = visit_weights(root, td), root.evaluation.tokens
    if not do_sample:
        tied = np.flatnonzero(weights == weights.max())
        if ties_by_prior:
            return int(tokens[tied[np.argmax(root.evaluation.priors[tied])]])
        return int(tokens[tied].min())
    order = np.argsort(tokens)  # over the vocabulary, as the reference's dense counts
    probs, tokens = weights[order] / weights.sum(), tokens[order]
    if top_p != 1.0:
        ranked = np.argsort(-probs, kind="stable")
        cut = int(np.argmax(np.cumsum(probs[ranked]) > top_p))
        kept = np.zeros_like(probs)
        kept[ranked[:cut + 1]] = probs[ranked[:cut + 1]]
        probs = kept / kept.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(tokens, p=probs))


def annealed_td(settings: Settings, token_index: int, max_new_tokens: int) -> float:
    """``td``, or with ``anneal_td`` ``td * (1 - token_index / max_new_tokens)`` (towards greedy)."""
    if not settings.anneal_td:
        return settings.td
    return settings.td * (1 - token_index / max_new_tokens)
