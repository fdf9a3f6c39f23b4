"""`vexport generate` as a user runs it (subprocesses, started side by side): every search on the tiny models,
JSONL out, and a bad prompts file refused in one line with no output written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import make_causal_lm
from vexport.runtime import load

SEARCH_FLAGS = {
    "greedy": [],
    "best-of-n": ["--n", "3", "--seed", "0"],
    "guided": ["--top-k", "3", "--beta", "2"],
    "mcts": ["--sim", "6", "--k", "3", "--mode", "fast", "--leaves", "3"],
}


def start(*args) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vexport", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gqa_model_dir):
    """Every search and one bad prompts file, run at once: {name: (returncode, stdout, stderr, output path)}."""
    tmp = tmp_path_factory.mktemp("generate")
    policy = make_causal_lm(tiny_gqa_model_dir, tmp / "policy")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The cat likes"}) + "\n\n"
                       + json.dumps({"messages": [{"role": "user", "content": "What is 12 times 7?"}]}) + "\n")
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"text": "no prompt field"}) + "\n")
    jobs = {}
    for search, flags in {**SEARCH_FLAGS, "bad": []}.items():
        output = tmp / f"out-{search}.jsonl"
        source = bad if search == "bad" else prompts
        jobs[search] = (start("generate", "--policy", policy, "--value", tiny_gqa_model_dir, "--prompts", source,
                              "-o", output, "--search", "greedy" if search == "bad" else search,
                              "--max-new-tokens", "4", *flags), output)
    return {name: (*job.communicate(timeout=300), job.returncode, output) for name, (job, output) in jobs.items()}


@pytest.mark.parametrize("search", list(SEARCH_FLAGS))
def test_each_search_writes_one_record_per_prompt(runs, search):
    stdout, stderr, code, output = runs[search]
    assert code == 0, stderr
    assert f"answered 2 prompts; wrote {output}" in " ".join(stdout.split())
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r.get("prompt") for r in records] == ["The cat likes", None] and "messages" in records[1]
    for record in records:
        assert record["search"] == search and record["tokens"] == len(record["response_ids"]) <= 4
        assert record["forwards"] >= 1 and record["seconds"] > 0 and isinstance(record["response"], str)
        assert len(record["values"]) == record["tokens"] >= 1


def test_the_values_are_the_responses_values(runs, tiny_gqa_model_dir):
    """The recorded values are the value model's on prompt + response (checked on the text prompt)."""
    output = runs["greedy"][3]
    record = json.loads(output.read_text().splitlines()[0])
    value_model = load(tiny_gqa_model_dir)
    prompt = value_model.tokenizer("The cat likes")["input_ids"]
    full = value_model.values(torch.tensor([prompt + record["response_ids"]]))[0, len(prompt):]
    torch.testing.assert_close(torch.tensor(record["values"]), full, atol=1e-4, rtol=0)


def test_a_bad_prompts_line_is_one_error_naming_it_and_nothing_is_written(runs):
    stdout, stderr, code, output = runs["bad"]
    assert code == 2 and not output.exists()
    assert "bad.jsonl:2" in stderr and "'prompt'" in stderr and "Traceback" not in stderr
    assert not list(output.parent.glob(".out-bad.jsonl.partial-*"))
