"""PPO-MCTS (vexport.decoding.mcts) against a plain, slow implementation of the reference's search written
here: every node run in full through each model (no KV cache), the tree kept in flat per-node arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from vexport.decoding import greedy_search, ppo_mcts_generate
from vexport.errors import InputError
from vexport.runtime import load

ATOL = 1e-4


def causal_lm(model_dir, seed: int) -> LlamaForCausalLM:
    config = AutoConfig.from_pretrained(model_dir)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tiny_gqa_model_dir, tiny_model_dir):
    """policy, value model, reference policy, reward model (all on the tiny tokenizer)."""
    return (causal_lm(tiny_gqa_model_dir, 0), load(tiny_gqa_model_dir), causal_lm(tiny_gqa_model_dir, 1),
            load(tiny_model_dir))


def prompts(lengths=(9, 6), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (n,), generator=g).tolist() for n in lengths]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class SlowSearch:
    """The reference's search for one prompt, literally: node i is the i-th node created, every statistic in
    a flat array, every evaluation a full forward of the node's whole sequence."""

    def __init__(self, policy, value, ref, reward, eos, s):
        self.policy, self.value, self.ref, self.reward, self.eos, self.s = policy, value, ref, reward, eos, s

    def evaluate(self, seq):
        with torch.inference_mode():
            ids = torch.tensor([seq])
            priors = torch.softmax(self.policy(input_ids=ids).logits[0, -1].float() / self.s["te"], -1)
            value = self.value(input_ids=ids).logits[0, -1, 0].float()
            klpens = None
            if self.s["kl_coef"] != 0.0:
                ref = torch.softmax(self.ref(input_ids=ids).logits[0, -1].float() / self.s["te"], -1)
                diff = priors - ref
                if self.s["clamp_kl"]:
                    diff = torch.clamp(diff, min=0.0)
                klpens = (-self.s["kl_coef"] * diff).numpy()
                if self.reward is not None and seq[-1] in self.eos:
                    value = self.reward(input_ids=ids).logits[0, -1, 0].float() * self.s["reward_gain"] \
                        + self.s["reward_bias"]
        return priors.numpy(), np.float32(value), klpens

    def new_node(self, i, seq, terminal):
        priors, value, klpens = self.evaluate(seq)
        top = np.argpartition(priors, -self.k, axis=-1)[-self.k:]
        self.tokens[i], self.prior[i], self.value_of[i] = top, priors[top], value
        self.klpen[i] = klpens[top] if klpens is not None else 0.0
        self.q[i], self.n[i], self.terminal[i], self.seq[i] = value, 1, terminal, seq

    def search(self, seq, sim, k):
        self.k, nodes = k, sim + 1
        self.tokens = np.zeros((nodes, k), np.int64)
        self.prior, self.q, self.klpen = (np.zeros((nodes, k), np.float32) for _ in range(3))
        self.child, self.cn = np.full((nodes, k), -1), np.zeros((nodes, k), np.int32)
        self.value_of, self.n = np.zeros(nodes, np.float32), np.zeros(nodes, np.int32)
        self.parent, self.action, self.terminal = np.full(nodes, -1), np.full(nodes, -1), np.zeros(nodes, bool)
        self.seq = {}
        self.new_node(0, seq, False)
        for i in range(1, nodes):
            node = 0
            while True:
                uct = self.q[node] + np.sqrt(self.n[node]) * self.s["c_puct"] * self.prior[node] / (self.cn[node] + 1)
                a = int(np.argmax(uct))
                if self.child[node, a] == -1:
                    break
                node = self.child[node, a]
            token = int(self.tokens[node, a])
            self.new_node(i, self.seq[node] + [token], token in self.eos)
            self.child[node, a], self.parent[i], self.action[i] = i, node, a
            self.backward(i)
        return self.tokens[0], self.cn[0]

    def backward(self, node):
        while node != 0:
            p, a = self.parent[node], self.action[node]
            old_q = self.q[p, a]
            if self.s["kl_coef"] != 0.0:
                self.q[p, a] = np.float32(self.s["gamma"]) * self.value_of[node] + self.klpen[p, a]
            else:
                self.q[p, a] = self.value_of[node]
            self.cn[p, a] += 1
            if not self.terminal[p]:
                self.value_of[p] = (np.float64(self.value_of[p]) * self.n[p] - np.float64(old_q) * (self.n[node] - 1)
                                    + np.float64(self.q[p, a]) * self.n[node]) / (self.n[p] + 1.0)
            self.n[p] += 1
            node = p

    def generate(self, prompt, max_new_tokens, sim, k):
        seq = list(prompt)
        for _ in range(max_new_tokens):
            tokens, visits = self.search(seq, sim, k)
            best = visits.max()
            seq.append(int(tokens[visits == best].min()))
            if seq[-1] in self.eos:
                break
        return seq[len(prompt):]


SETTINGS = [
    dict(sim=10, k=10, c_puct=8.0, te=1.0, kl_coef=0.0, gamma=1.0, clamp_kl=False),
    dict(sim=6, k=3, c_puct=1.0, te=0.7, kl_coef=0.0, gamma=0.9, clamp_kl=False),
    dict(sim=8, k=4, c_puct=2.0, te=1.3, kl_coef=0.5, gamma=0.9, clamp_kl=False),
    dict(sim=8, k=5, c_puct=4.0, te=1.0, kl_coef=2.0, gamma=1.0, clamp_kl=True),
]


def slow(models, settings, rows, max_new_tokens, eos=(), reward=False, bias=-0.25):
    policy, value, ref, reward_model = models
    s = dict(settings, reward_gain=1.5, reward_bias=bias)
    search = SlowSearch(policy, value, ref, reward_model if reward else None, set(eos), s)
    return [search.generate(row, max_new_tokens, s["sim"], s["k"]) for row in rows]


def fast_call(models, rows, max_new_tokens, eos=(), reward=False, bias=-0.25, **settings):
    policy, value, ref, reward_model = models
    ids, mask = left_pad(rows)
    out = ppo_mcts_generate(policy, value, ids, mask, ref_policy=ref, reward_model=reward_model if reward else None,
                            max_new_tokens=max_new_tokens, eos_token_id=list(eos), pad_token_id=0,
                            reward_gain=1.5, reward_bias=bias, **settings)
    return out, out.responses(ids.shape[1])


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"sim{s['sim']}-k{s['k']}-kl{s['kl_coef']}")
def test_exact_mode_picks_the_slow_reference_tokens(models, settings):
    rows = prompts()
    out, responses = fast_call(models, rows, 5, **settings)
    assert responses == slow(models, settings, rows, 5)
    assert out.forwards == 1 + 5 * settings["sim"]  # the prompt once, then one forward per simulation


def test_end_tokens_stop_a_row_and_the_reward_model_scores_terminal_nodes(models):
    rows = prompts(seed=3)
    settings = SETTINGS[2]
    free = slow(models, settings, rows, 4)
    eos = (free[0][1], free[1][2])  # tokens the search meets at different depths in the two rows
    out, responses = fast_call(models, rows, 6, eos=eos, reward=True, bias=5.0, **settings)  # worth ending
    expected = slow(models, settings, rows, 6, eos=eos, reward=True, bias=5.0)
    assert responses == expected
    assert any(r[-1] in eos and len(r) < 6 for r in responses)
    width = max(map(len, rows))
    for row, mask, response in zip(out.sequences, out.attention_mask, responses):
        assert row[width + len(response):].eq(0).all() and mask[width + len(response):].eq(0).all()


def test_batched_prompts_equal_one_prompt_at_a_time(models):
    rows = prompts((5, 11, 8), seed=4)
    _, together = fast_call(models, rows, 4, **SETTINGS[0])
    alone = [fast_call(models, [row], 4, **SETTINGS[0])[1][0] for row in rows]
    assert together == alone


def test_every_recorded_value_is_the_full_forward_value_in_fast_mode(models):
    """Subtree reuse, compaction and several leaves per forward keep every node's keys and values right."""
    policy, value = models[:2]
    rows = prompts((7, 10), seed=5)
    out, responses = fast_call(models, rows, 6, mode="fast", leaves=4, sim=12, k=4, kl_coef=0.0)
    assert out.forwards <= 1 + 6 * 3  # 12 simulations, 4 leaves per forward
    for row, response, values in zip(rows, responses, out.values):
        full = value.values(torch.tensor([row + response]))[0, len(row):]
        torch.testing.assert_close(torch.tensor(values), full, atol=ATOL, rtol=0)


def test_fast_mode_keeps_the_chosen_subtree_and_with_one_leaf_and_no_reuse_is_exact(models):
    rows = prompts(seed=7)
    exact, exact_tokens = fast_call(models, rows, 4, **SETTINGS[0])
    plain, plain_tokens = fast_call(models, rows, 4, mode="fast", leaves=1, reuse_tree=False, **SETTINGS[0])
    reused, _ = fast_call(models, rows, 4, mode="fast", leaves=1, **SETTINGS[0])
    assert plain_tokens == exact_tokens and plain.forwards == exact.forwards
    assert reused.nodes == exact.nodes == 2 * (SETTINGS[0]["sim"] + 1)  # trees of the same size ...
    assert reused.forwards < exact.forwards  # ... the kept nodes not run again


def test_fast_mode_breaks_ties_in_visits_by_the_prior(models):
    """sim = k = leaves, no reuse: one forward expands every root child once, so every token is the tie among
    all children, which goes to the policy's top token (greedy decoding), not the smallest token id."""
    policy, value = models[:2]
    rows = prompts(seed=8)
    _, responses = fast_call(models, rows, 3, mode="fast", leaves=4, sim=4, k=4, reuse_tree=False)
    for row, response in zip(rows, responses):
        assert response == greedy_search(policy, value, row, max_new_tokens=3, eos_token_id=[]).response


def test_kv_memory_grows_by_one_column_per_node(models):
    """Exact mode holds the prompt, the tokens so far and one column per node: never nodes x depth."""
    rows = [prompts()[0]]
    small, _ = fast_call(models, rows, 3, sim=10, k=3)
    large, _ = fast_call(models, rows, 3, sim=50, k=3)
    per_column = (large.kv_bytes - small.kv_bytes) / 40
    assert small.kv_bytes == per_column * (len(rows[0]) + 2 + 10)
    assert large.nodes == 51


def test_sampling_with_a_tiny_nucleus_is_the_greedy_choice(models):
    rows = prompts(seed=6)
    _, greedy = fast_call(models, rows, 4, **SETTINGS[1])
    _, sampled = fast_call(models, rows, 4, do_sample=True, top_p=1e-9, td=0.5, seed=1, **SETTINGS[1])
    _, again = fast_call(models, rows, 4, do_sample=True, top_p=0.9, seed=7, **SETTINGS[1])
    _, same = fast_call(models, rows, 4, do_sample=True, top_p=0.9, seed=7, **SETTINGS[1])
    assert sampled == greedy and again == same


@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_coef=0.5, ref_policy=None), "ref_policy"),
    (dict(sim=0), "sim"),
    (dict(mode="quick"), "mode"),
    (dict(gamma=1.5), "gamma"),
])
def test_bad_settings_are_one_clear_error(models, kwargs, match):
    policy, value = models[:2]
    ids, _ = left_pad(prompts()[:1])
    with pytest.raises(InputError, match=match):
        ppo_mcts_generate(policy, value, ids, max_new_tokens=2, **kwargs)


def test_right_padded_prompts_are_refused(models):
    policy, value = models[:2]
    with pytest.raises(InputError, match="left-padded"):
        ppo_mcts_generate(policy, value, torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
