"""OpenRLHF's own reward client against a real `vexport serve` (127.0.0.1, a free port) with an API key.

OpenRLHF is installed without its dependencies (``pip install --no-deps --target $VENV/openrlhf
openrlhf==0.11.2``, as .ci/run does); nothing of it is copied here. Two of its files are run as they are installed:
- ``openrlhf/utils/agent.py``: ``SingleTurnAgentExecutor.execute`` builds the query exactly as a PPO rollout
  does (prompt tokens + generated tokens, decoded with their special tokens) and posts it with its own
  ``_fetch_rewards_via_http``. The rollout engine (vLLM in a trainer) is replaced by fixed responses: the
  reward call is what is under test. ``openrlhf/utils/__init__.py`` is skipped: it imports the math grader
  (``pylatexenc``) and nothing the client needs.
- ``openrlhf/cli/serve_rm.py``: its module imports deepspeed, peft and flash-attn (a CUDA build), so it
  cannot be imported here; its ``RewardModelProxy.tokenize_fn`` is compiled from the installed file's source
  and run on its own tokenizer (``get_tokenizer``): the tokenization the rewards must equal.
OpenRLHF sends no headers, so the key travels in the URL (``--key-in-url``). The server normalises rewards
(``--reward-normalize``) with the mean and std in the model's config.json; ``--reward-overlong refuse`` is
tested on tests/test_serve_vllm.py's server.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import re
import sys
import types
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serve_helpers import ServerProcess
from vexport.evalset import TULU_CHAT_TEMPLATE
from vexport.runtime import load
from vexport.tiny import tiny_corpus

KEY = "rm-key-4821"
MAX_LEN = 64  # --reward-max-len: long queries get cut
TOL = dict(rtol=1e-5, atol=1e-5)
MEAN, STD = 0.25, 2.0  # --reward-normalize: (reward - mean) / std, as serve_rm.py --reward.normalize_enable


def normalised(values) -> np.ndarray:
    return (np.asarray(values, dtype=np.float64) - MEAN) / STD


def openrlhf_files() -> Path:
    """The installed package: ``pip install --no-deps --target $VENV/openrlhf openrlhf==0.11.2`` (.ci/run). Not
    into site-packages: OpenRLHF's wheel also installs a top-level ``tests`` package, which would hide ours."""
    root = Path(sys.prefix) / "openrlhf" / "openrlhf"
    if not (root / "utils" / "agent.py").is_file():
        pytest.skip(f"OpenRLHF is not installed in {root.parent}: pip install --no-deps --target {root.parent} "
                    "openrlhf==0.11.2 (.ci/run does)")
    return root


@pytest.fixture(scope="module")
def openrlhf_utils():
    """``openrlhf.utils.agent`` and ``.utils`` imported from the installed files, ``utils/__init__.py`` skipped."""
    root = openrlhf_files()
    names = ("openrlhf", "openrlhf.utils", "openrlhf.utils.logging_utils", "openrlhf.utils.agent",
             "openrlhf.utils.utils")
    saved = {name: sys.modules.get(name) for name in names}
    for name, folder in (("openrlhf", root), ("openrlhf.utils", root / "utils")):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = [str(folder)]
    try:
        yield types.SimpleNamespace(agent=importlib.import_module("openrlhf.utils.agent"),
                                    utils=importlib.import_module("openrlhf.utils.utils"))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def serve_rm_tokenize_fn():
    """``RewardModelProxy.tokenize_fn`` from the installed serve_rm.py, compiled alone."""
    source = (openrlhf_files() / "cli" / "serve_rm.py").read_text()
    proxy = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "RewardModelProxy")
    method = next(n for n in proxy.body if isinstance(n, ast.FunctionDef) and n.name == "tokenize_fn")
    namespace: dict = {}
    exec(compile(ast.Module(body=[method], type_ignores=[]), "serve_rm.py", "exec"), namespace)  # noqa: S102
    return namespace["tokenize_fn"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny value model with a chat template that starts with the bos token, as Llama's does, and the reward
    mean and std OpenRLHF writes into config.json when it trains a reward model with normalization."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-bos-template"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{{ bos_token }}" + TULU_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mean": MEAN, "std": STD}))
    return folder


@pytest.fixture(scope="module")
def server(model_dir):
    process = ServerProcess(model_dir, "--api-key", KEY, "--key-in-url", "--reward-max-len", str(MAX_LEN),
                            "--max-length", "128", "--reward-normalize")
    process.wait_ready(headers={"Authorization": f"Bearer {KEY}"})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)


class FixedResponses:
    """The rollout engine's place: 'generates' the next of RESPONSES (token ids) for each prompt."""

    def __init__(self, responses: list[list[int]]):
        self.responses = iter(responses)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = types.SimpleNamespace(token_ids=next(self.responses), finish_reason="stop", logprobs=None)
        return types.SimpleNamespace(outputs=[output])


def rollout(openrlhf_utils, url: str, tokenizer, chats: list[tuple[str, str]]) -> list[dict]:
    """OpenRLHF's single-turn rollouts of CHATS (question, answer): the executor posts each query to URL."""
    executor = openrlhf_utils.agent.SingleTurnAgentExecutor(remote_rm_url=[url])
    engine = FixedResponses([tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                             for _, a in chats])
    params = types.SimpleNamespace(max_tokens=64, logprobs=None)

    async def run():
        outputs = []
        for question, _ in chats:  # one at a time: the engine hands out responses in order
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)
            outputs.append(await executor.execute(prompt, None, params, 256, tokenizer, engine))
        return outputs

    return asyncio.run(run())


def chats(n: int, seed: int, words: int = 2) -> list[tuple[str, str]]:
    corpus = tiny_corpus()[:60]
    return [(corpus[(seed + i) % 60], " ".join(corpus[(seed + 7 * i + j) % 60] for j in range(words)))
            for i in range(n)]


def test_openrlhf_client_gets_the_rewards_of_vexport_score_and_serve_rm_tokenization(
        server, model, model_dir, openrlhf_utils, tmp_path):
    from vexport.scoring import read_scores, score

    tokenizer = openrlhf_utils.utils.get_tokenizer(str(model_dir), None, "left")
    pairs = chats(6, seed=3)
    outputs = rollout(openrlhf_utils, f"{server.url}/get_reward?api_key={KEY}", tokenizer, pairs)
    rewards = [o["reward"] for o in outputs]
    assert all(isinstance(r, list) and len(r) == 1 for r in rewards), rewards  # None: the call failed
    rewards = [r[0] for r in rewards]
    assert [o["extra_logs"]["rm_truncated"] for o in outputs] == [[0]] * 6

    # offline `vexport score` of the same chats (the assistant turn ends in eos, as the rollout's did)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a + tokenizer.eos_token}]}
            for q, a in pairs]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    score(model_dir, tmp_path / "chats.jsonl", tmp_path / "scores")
    np.testing.assert_allclose(rewards, normalised(read_scores(tmp_path / "scores")["value"].to_numpy()), **TOL)

    # serve_rm.py's own tokenization of the queries OpenRLHF sent, through the model (left padded)
    queries = [tokenizer.decode(o["observation_tokens"], skip_special_tokens=False) for o in outputs]
    batch = serve_rm_tokenize_fn()(types.SimpleNamespace(tokenizer=tokenizer, max_length=MAX_LEN), queries, "cpu")
    bos = (batch["input_ids"] == tokenizer.bos_token_id) & (batch["attention_mask"] == 1)
    assert bos.sum(dim=1).tolist() == [1] * 6  # the template's bos only: none added on top
    values = model.values(batch["input_ids"], batch["attention_mask"])[:, -1].numpy()
    np.testing.assert_allclose(rewards, normalised(values), **TOL)
    assert [len(ids) for ids in tokenizer(queries, add_special_tokens=False)["input_ids"]] == \
        [o["extra_logs"]["num_tokens"][0] for o in outputs]


def test_long_queries_are_cut_as_serve_rm_cuts_them_and_counted(server, model, model_dir, openrlhf_utils):
    tokenizer = openrlhf_utils.utils.get_tokenizer(str(model_dir), None, "left")
    queries = [" ".join(tiny_corpus()[i:i + 9]) for i in (0, 20)] + ["a short one"]
    auth = {"Authorization": f"Bearer {KEY}"}
    body = httpx.post(f"{server.url}/get_reward", json={"query": queries}, headers=auth, timeout=60).json()
    lengths = [len(ids) for ids in tokenizer(queries, add_special_tokens=False)["input_ids"]]
    assert lengths[0] > MAX_LEN and lengths[1] > MAX_LEN and lengths[2] <= MAX_LEN
    assert body["extra_logs"]["rm_truncated"] == [1, 1, 0]
    assert body["extra_logs"]["num_tokens"] == [MAX_LEN, MAX_LEN, lengths[2]]
    batch = serve_rm_tokenize_fn()(types.SimpleNamespace(tokenizer=tokenizer, max_length=MAX_LEN), queries, "cpu")
    values = model.values(batch["input_ids"], batch["attention_mask"])[:, -1].numpy()
    np.testing.assert_allclose(body["rewards"], normalised(values), **TOL)
    metrics = httpx.get(f"{server.url}/metrics", headers=auth).text
    assert metric(metrics, "vexport_reward_truncated_total") >= 2


def test_refused_requests_are_logged_without_the_key_and_counted(server):
    url = f"{server.url}/get_reward"
    query = {"query": ["The cat sat."]}
    assert httpx.post(url, json=query).status_code == 401
    assert httpx.post(f"{url}?api_key=wrong-{KEY}", json=query).status_code == 401
    assert httpx.post(url, json=query, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{url}?api_key={KEY}", json=query).status_code == 200
    assert httpx.post(url, json=query, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics?api_key={KEY}").text
    for reason in ("missing", "wrong_url", "wrong_header"):
        assert metric(metrics, f'vexport_auth_refused_total{{reason="{reason}"}}') >= 1, reason
    log = server.stderr()
    refusals = [line for line in log.splitlines() if "refused POST /get_reward from 127.0.0.1:" in line]
    assert len(refusals) >= 3, log[-2000:]
    assert KEY not in log


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_reward_options_are_checked_by_flag():
    from vexport.errors import VexportError
    from vexport.serve.config import ServeOptions
    from vexport.serve.openrlhf import resolve

    options = ServeOptions(max_length=128)
    assert resolve(options, types.SimpleNamespace()).reward_max_len == 128  # 2048 capped at --max-length
    for bad, flag in ((dict(reward_max_len=129), "--reward-max-len"),
                      (dict(reward_overlong="cut"), "--reward-overlong"), (dict(reward_normalize=True), "--reward-normalize")):
        with pytest.raises(VexportError, match=flag):
            resolve(ServeOptions(max_length=128, **bad), types.SimpleNamespace(mean=None))
