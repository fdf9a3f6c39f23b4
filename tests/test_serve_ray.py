"""`vexport serve --engine ray` on a real local Ray instance (2 CPUs, started here) with 2 CPU replicas.

The same values as in-process through Ray Serve, and a replica killed mid-load: every request gets its
correct value or a clean 503 that is retried, never a wrong value, and Ray Serve brings the replica back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from tests.serve_helpers import ServerProcess
from vexport.client import ValueClient
from vexport.runtime import load
from vexport.tiny import tiny_corpus

ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install 'vexport[serve,ray]'")
serve = pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'vexport[serve,ray]'")

TOL = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir, ray_address):
    process = ServerProcess(tiny_model_dir, "--engine", "ray", "--replicas", "2", "--ray-address", ray_address,
                            "--threads", "1", "--max-length", "256")
    ready = process.wait_ready()
    assert ready["engine"] == "ray" and ready["replicas"] == 2
    process.apps = ready["applications"]
    yield process
    process.stop()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir)


def alone(model, ids) -> np.ndarray:
    return model.values(torch.tensor([list(ids)]))[0].numpy()


def test_ray_serve_gives_load_values(server, model):
    tok = model.tokenizer
    texts = [" ".join(tiny_corpus()[i:i + 1 + i % 3]) for i in range(0, 48, 3)]
    ids = [tok(t)["input_ids"] for t in texts]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = http.post("/v1/values", json={"texts": texts}).json()
        for got, seq in zip(body["values"], ids, strict=True):
            np.testing.assert_allclose(got, alone(model, seq), **TOL)
        rewards = http.post("/get_reward", json={"query": texts}).json()["rewards"]
        bare = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # as OpenRLHF's serve_rm.py
        np.testing.assert_allclose(rewards, [alone(model, s)[-1] for s in bare], **TOL)
        pooled = http.post("/pooling", json={"input": ids[:3], "task": "token_classify"}).json()["data"]
        for item, seq in zip(pooled, ids[:3], strict=True):
            np.testing.assert_allclose(np.asarray(item["data"])[:, 0], alone(model, seq), **TOL)
        bad = http.post("/v1/values", json={"input_ids": [[5, 1000]]})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "input_ids[0][1]"

    with ValueClient(server.url) as client:
        with ThreadPoolExecutor(16) as pool:  # concurrent clients, batched by @serve.batch in the replicas
            concurrent = list(pool.map(lambda s: client.token_values([s])[0], ids))
        for got, seq in zip(concurrent, ids):
            np.testing.assert_allclose(got, alone(model, seq), **TOL)
        prompt, responses = ids[0], [ids[1][1:], ids[2][1:]]
        for got, r in zip(client.score_group(prompt, responses), responses, strict=True):
            np.testing.assert_allclose(got.numpy(), alone(model, prompt + r)[len(prompt):], atol=1e-4, rtol=1e-4)
        session = client.session(prompt)
        scores = session.score([[5], [6, 7]])
        np.testing.assert_allclose(scores.numpy(), [alone(model, prompt + c)[-1] for c in ([5], [6, 7])],
                                   atol=1e-4, rtol=1e-4)
        session.advance([6, 7])
        np.testing.assert_allclose(session.values.numpy(), alone(model, prompt + [6, 7]), atol=1e-4, rtol=1e-4)
        session.close()


def replica_pids(app: str, calls: int = 40) -> set[int]:
    handle = serve.get_app_handle(app)
    return {response.result() for response in [handle.pid.remote() for _ in range(calls)]}


def test_a_replica_killed_mid_load_never_gives_a_wrong_value_and_comes_back(server, model):
    """Kills one replica's process (SIGKILL) while 8 clients send 64 requests."""
    sequences = [[5 + (i * 13 + j) % 900 for j in range(20 + i % 40)] for i in range(64)]
    want = [alone(model, s) for s in sequences]
    before = replica_pids(server.apps[0])
    assert len(before) == 2
    statuses, done = [], []
    lock = threading.Lock()

    def one(i):
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(30):
                answer = http.post("/v1/values", json={"input_ids": [sequences[i]], "encoding": "json"})
                with lock:
                    statuses.append(answer.status_code)
                if answer.status_code == 503:
                    assert answer.json()["error"]["type"] == "unavailable" and answer.headers["Retry-After"]
                    time.sleep(0.2)
                    continue
                assert answer.status_code == 200, answer.text
                np.testing.assert_allclose(answer.json()["values"][0], want[i], **TOL)
                with lock:
                    done.append(i)
                return
            raise AssertionError(f"request {i} never succeeded")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(64)]
        while len(done) < 8:
            time.sleep(0.01)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        for future in futures:
            future.result()
    assert sorted(done) == list(range(64))
    assert set(statuses) <= {200, 503}, statuses

    deadline, now = time.monotonic() + 120, set()
    while time.monotonic() < deadline and not (victim not in now and len(now) == 2):
        time.sleep(0.5)
        now = replica_pids(server.apps[0])  # Ray Serve routes to the replicas it knows to be alive
    assert victim not in now and len(now) == 2, (before, now)
    status = serve.status().applications[server.apps[0]].deployments["ValueReplica"]
    assert status.status == "HEALTHY" and status.replica_states.get("RUNNING") == 2
    with ValueClient(server.url) as client:
        np.testing.assert_allclose(client.token_values([sequences[0]])[0], want[0], **TOL)
