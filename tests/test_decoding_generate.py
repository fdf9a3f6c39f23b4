"""Value-guided decoding and best-of-n with a tiny Llama policy sharing the tiny value model's tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from tests.helpers import REPO
from vexport.decoding import best_of_n, choose, sample_responses, value_guided_generate
from vexport.decoding.policy import PolicyState
from vexport.errors import InputError
from vexport.runtime import load

ATOL = 1e-4


@pytest.fixture(scope="module")
def policy(tiny_gqa_model_dir):
    config = AutoConfig.from_pretrained(tiny_gqa_model_dir)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def value_model(tiny_gqa_model_dir):
    return load(tiny_gqa_model_dir)


def prompt(length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 1000, (length,), generator=torch.Generator().manual_seed(seed))


def next_log_probs(policy, sequence: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(policy(input_ids=sequence[None]).logits[0, -1].float(), -1)


def test_each_step_takes_the_best_policy_plus_value_score(policy, value_model):
    start, top_k, beta = prompt(), 3, 2.0
    out = value_guided_generate(policy, value_model, start, top_k=top_k, beta=beta, max_new_tokens=6,
                                eos_token_id=[])
    assert out.shape == (len(start) + 6,) and torch.equal(out[:len(start)], start)
    for t in range(len(start), len(out)):
        log_p, candidates = next_log_probs(policy, out[:t]).topk(top_k)
        values = torch.tensor([float(value_model.values(torch.cat([out[:t], c.view(1)])[None])[0, -1])
                               for c in candidates])
        scores = log_p + beta * values
        chosen = int((candidates == out[t]).nonzero()[0, 0])
        assert float(scores[chosen]) >= float(scores.max()) - ATOL


def test_beta_zero_is_greedy_decoding(policy, value_model):
    start = prompt(seed=1)
    ours = value_guided_generate(policy, value_model, start[None], top_k=2, beta=0.0, max_new_tokens=7,
                                 eos_token_id=[])
    greedy = policy.generate(start[None], attention_mask=torch.ones(1, len(start), dtype=torch.long),
                             do_sample=False, max_new_tokens=7, min_new_tokens=7, pad_token_id=0)
    assert ours.shape == (1, len(start) + 7)
    assert torch.equal(ours, greedy)


def test_policy_tree_steps_keep_the_chosen_chunk(policy):
    """K chunks run side by side over the policy's cache; after accepting one, the policy's next-token
    logits equal those of the whole sequence run from scratch."""
    start = prompt(seed=2)
    with torch.inference_mode():
        state = PolicyState(policy, start[None])
        torch.testing.assert_close(state.logits[0], policy(input_ids=start[None]).logits[0, -1], atol=ATOL, rtol=0)
        first = torch.tensor([10, 20, 30])
        logits = state.run_tree(first, depth=0)
        second = torch.tensor([11, 21, 31])
        for k in range(3):
            full = policy(input_ids=torch.cat([start, first[k:k + 1]])[None]).logits[0, -1]
            torch.testing.assert_close(logits[k], full, atol=ATOL, rtol=0)
        state.run_tree(second, depth=1)
        state.accept(1, 3, [20, 21, 22])
        full = policy(input_ids=torch.cat([start, torch.tensor([20, 21, 22])])[None]).logits[0, -1]
    torch.testing.assert_close(state.logits[0], full, atol=ATOL, rtol=0)
    assert state.state.committed == len(start) + 3 and state.state.pending == 0


def test_chunked_generation(policy, value_model):
    start = prompt(seed=3)
    generator = torch.Generator().manual_seed(0)
    out = value_guided_generate(policy, value_model, start, top_k=3, beta=1.0, chunk=3, max_new_tokens=7,
                                eos_token_id=[], generator=generator)
    assert out.shape == (len(start) + 7,)  # chunks of 3, 3 and the last one cut to 1
    again = value_guided_generate(policy, value_model, start, top_k=3, beta=1.0, chunk=3, max_new_tokens=7,
                                  eos_token_id=[], generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_generation_stops_at_the_end_token(policy, value_model):
    start = prompt(seed=4)
    first = int(next_log_probs(policy, start).argmax())
    out = value_guided_generate(policy, value_model, start, top_k=1, beta=0.0, max_new_tokens=5,
                                eos_token_id=first)
    assert out.tolist() == start.tolist() + [first]


def test_sampled_responses_share_the_prompt(policy):
    """At a near-zero temperature, every row of the batched sampler is the greedy continuation."""
    start = prompt(seed=5)
    with torch.inference_mode():
        responses = sample_responses(policy, start, n=3, max_new_tokens=5, temperature=1e-4, eos=set())
    greedy = policy.generate(start[None], attention_mask=torch.ones(1, len(start), dtype=torch.long),
                             do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0)[0, len(start):]
    assert responses == [greedy.tolist()] * 3


def test_best_of_n_reranks_by_value(policy, value_model):
    start = prompt(seed=6)
    result = best_of_n(policy, value_model, start, n=4, max_new_tokens=5, eos_token_id=[],
                       generator=torch.Generator().manual_seed(1))
    assert len(result.responses) == 4 and result.values.shape == (4,)
    for response, value in zip(result.responses, result.values):
        full = value_model.values(torch.cat([start, response])[None])[0, -1]
        assert float(value) == pytest.approx(float(full), abs=ATOL)
    assert result.best == int(result.values.argmax())
    assert torch.equal(result.sequence, torch.cat([start, result.responses[result.best]]))


def test_choose_rule():
    log_p, values = torch.tensor([-0.1, -2.0, -1.0]), torch.tensor([0.0, 1.5, 0.2])
    assert choose(log_p, values, beta=0.0) == 0
    assert choose(log_p, values, beta=1.0) == 0  # -0.1 > -0.5 > -0.8
    assert choose(log_p, values, beta=2.0) == 1  # 1.0 > -0.1 and -0.6


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k must be positive"),
    ({"max_new_tokens": 0}, "max_new_tokens must be positive"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long)}, "one prompt"),
])
def test_bad_arguments(policy, value_model, kwargs, message):
    kwargs = {"input_ids": prompt(), **kwargs}
    with pytest.raises(InputError, match=message):
        value_guided_generate(policy, value_model, **kwargs)


def test_example_script_runs(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "example_value_guided.py"), "--workdir",
                             str(tmp_path), "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "value-guided:" in result.stdout and "best-of-4:" in result.stdout
