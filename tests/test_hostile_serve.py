"""`vexport serve` against a careless or hostile client: every request bounded before it runs (issue 28).

One real server per module (a subprocess on 127.0.0.1, the tiny value model: 1 KiB of KV cache a token, 512
positions) with small limits, so that each limit is reached cheaply. After every refusal: the status, one
line naming the field or flag, nothing held before lost (a session made first is still there), the server
answering a small request within 1 s; through all of it the server's RSS stays under 1.5x its idle RSS and
its log holds no traceback.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import typer

from tests.serve_helpers import ServerProcess
from vexport import cli

MAX_LENGTH, BATCH_TOKENS, QUEUE_TOKENS, BODY_MB = 512, 256, 20_000, 2
SESSION_TOKENS = 768  # --session-memory-mb 0.75 at 1 KiB a token


class RssWatch:
    """The server's resident memory, sampled every 10 ms in a thread: ``peak`` since ``start``."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def start(self) -> "RssWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    process = ServerProcess(tiny_model_dir, "--max-length", str(MAX_LENGTH), "--batch-tokens", str(BATCH_TOKENS),
                            "--max-queue-tokens", str(QUEUE_TOKENS), "--session-memory-mb", "0.75",
                            "--max-body-mb", str(BODY_MB), "--max-wait-ms", "2")
    process.wait_ready()
    yield process
    process.stop()
    assert "Traceback" not in process.stderr(), process.stderr()[-3000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def rss(server, http):
    """The watch, started once the server has answered every kind of request (its idle RSS: ``idle``)."""
    small(http)
    http.post("/v1/groups", json={"prompt_ids": [5] * 20, "response_ids": [[6] * 10] * 4})
    watch = RssWatch(server.process.pid)
    watch.idle = watch.now()
    watch.start()
    yield watch
    watch.stop()
    print(f"server RSS: idle {watch.idle / (1 << 20):.0f} MiB, peak through the hostile cases "
          f"{watch.peak / (1 << 20):.0f} MiB ({watch.peak / watch.idle:.2f}x)")
    assert watch.peak < 1.5 * watch.idle, f"peak RSS {watch.peak >> 20} MiB, idle {watch.idle >> 20} MiB"


def small(http) -> float:
    """Seconds a one-sequence request takes (it must answer 200)."""
    start = time.perf_counter()
    response = http.post("/v1/values", json={"input_ids": [[5, 6, 7]]})
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


def refused(response, status: int, field: str, *words: str) -> dict:
    """RESPONSE is STATUS with a one-line error naming FIELD and WORDS; the server then answers within 1 s."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and "\n" not in error["message"], error
    for word in words:
        assert word in error["message"], error
    return error


def healthy(http) -> None:
    assert small(http) < 1.0


@pytest.fixture()
def session(http):
    """A session made before the hostile request: it must survive it, values and all."""
    made = http.post("/v1/sessions", json={"prompt_ids": [5, 6, 7, 8]})
    assert made.status_code == 201, made.text
    yield made.json()
    kept = http.get(f"/v1/sessions/{made.json()['session']}")
    assert kept.status_code == 200 and kept.json()["values"] == made.json()["values"], kept.text
    http.delete(f"/v1/sessions/{made.json()['session']}")


# --- bodies: counted as they arrive, cut at --max-body-mb ---
def send_chunked(url: str, path: str, chunk_bytes: int, total_bytes: int) -> tuple[int, dict, int]:
    """POST PATH with ``Transfer-Encoding: chunked`` over a raw socket, stopping when the server answers:
    (status, JSON body, bytes sent)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk, sent = b'{"texts": ["' + b"a" * max(0, chunk_bytes - 12), 0
        while sent < total_bytes and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            chunk = b"a" * chunk_bytes
        if sent >= total_bytes:
            sock.sendall(b"0\r\n\r\n")
        return (*_read_response(sock), sent)


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body[:_length(data)])


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 1 << 40)


@pytest.mark.parametrize("chunk_bytes, total_mb", [(64 << 10, 40), (4 << 20, 40), (1000, 3)],
                         ids=["64KiB-chunks", "one-4MiB-chunk-at-a-time", "small-chunks"])
def test_a_chunked_body_is_cut_at_the_cap_with_413_naming_the_flag(server, http, rss, session, chunk_bytes,
                                                                    total_mb):
    status, body, sent = send_chunked(server.url, "/v1/values", chunk_bytes, total_mb << 20)
    assert status == 413 and body["error"]["field"] == "body", body
    assert "--max-body-mb 2" in body["error"]["message"], body
    assert sent < 12 << 20, f"{sent} bytes went in before the 413"  # cut near the cap, not read whole
    healthy(http)


def test_four_chunked_bodies_at_once_are_all_cut(server, http, rss, session):
    threads = [threading.Thread(target=lambda: answers.append(send_chunked(server.url, "/pooling", 64 << 10,
                                                                            30 << 20))) for _ in range(4)]
    answers: list = []
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a[0] for a in answers] == [413] * 4, answers
    healthy(http)


def test_the_body_cap_is_a_documented_flag():
    serve = typer.main.get_command(cli.app).commands["serve"]  # what `vexport serve --help` lists
    flag = next(p for p in serve.params if "--max-body-mb" in p.opts)
    assert flag.help and flag.default == 64.0


def test_a_chunked_body_under_the_cap_is_answered(server, http):
    parts = urlsplit(server.url)
    payload = json.dumps({"input_ids": [[5, 6, 7, 8]]}).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/values HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        for i in range(0, len(payload), 5):
            piece = payload[i:i + 5]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status, body = _read_response(sock)
    assert status == 200, body
    whole = http.post("/v1/values", json={"input_ids": [[5, 6, 7, 8]]}).json()  # the same, with Content-Length
    assert body["values"] == whole["values"]


# --- admission: a request's cost checked before it runs, one rule for every endpoint ---
def ids(n: int, length: int, start: int = 5) -> list[list[int]]:
    return [[start + (i * 7 + j) % 900 for j in range(length)] for i in range(n)]


ADMISSION = [  # (path, body, field, flag): each over a limit by its cost, whatever its shape
    ("/v1/groups", {"prompt_ids": [5] * 10, "response_ids": ids(500, 400)}, "response_ids", "--max-queue-tokens"),
    ("/v1/groups", {"prompt": "a cat", "responses": ["a cat sat on the mat " * 20] * 400}, "responses",
     "--max-queue-tokens"),
    ("/v1/values", {"input_ids": ids(50, 401)}, "input_ids", "--max-queue-tokens"),
    ("/get_reward", {"query": ["a cat sat on the mat " * 20] * 600}, "query", "--max-queue-tokens"),
]


@pytest.mark.parametrize("path, body, field, flag", ADMISSION, ids=[f"{a[0]}-{a[2]}" for a in ADMISSION])
def test_a_request_over_a_limit_is_refused_before_it_runs(http, rss, session, path, body, field, flag):
    before = http.get("/metrics").text
    start = time.perf_counter()
    error = refused(http.post(path, json=body), 413, field, flag)
    assert f"{flag} {QUEUE_TOKENS}" in error["message"]
    assert time.perf_counter() - start < 5.0  # refused from its size: nothing ran
    assert _metric(before, "vexport_tokens_total") == _metric(http.get("/metrics").text,
                                                              "vexport_tokens_total")
    healthy(http)


def test_a_group_under_the_limit_runs_in_chunks_with_the_values_of_each_sequence_alone(http):
    prompt, responses = [5] * 30, ids(12, 40) + ids(3, 7, start=50)  # 30 + 12 x 40 tokens: over --batch-tokens
    answer = http.post("/v1/groups", json={"prompt_ids": prompt, "response_ids": responses})
    assert answer.status_code == 200, answer.text
    alone = http.post("/v1/values", json={"input_ids": [prompt + r for r in responses],  # tests/test_serve.py:
                                          "prompt_lengths": [len(prompt)] * len(responses)})  # these are load()'s
    for got, want in zip(answer.json()["values"], alone.json()["values"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# --- sessions: a call that cannot fit is refused, the session kept ---
def new_session(http, tokens: int) -> str:
    made = http.post("/v1/sessions", json={"prompt_ids": ids(1, tokens)[0]})
    assert made.status_code == 201, made.text
    return made.json()["session"]


SESSION_CASES = [  # (prompt tokens, call, body, status, field, words)
    (4, "score", {"candidates": [[5]] * 16_000}, 413, "candidates", ("16000 tokens", "--max-length 512")),
    (4, "score", {"candidates": ids(2, 300)}, 413, "candidates", ("600 tokens", "--max-length 512")),
    (400, "score", {"candidates": [[7]] * 400}, 413, "candidates", ("--session-memory-mb 0.75", "kept")),
    (400, "advance", {"tokens": [7] * 400}, 413, "tokens", ("--session-memory-mb 0.75", "kept")),
    (500, "score", {"candidates": [[7] * 20, [8]]}, 400, "candidates", ("max_position_embeddings",)),
    (300, "advance", {"tokens": [7] * 250}, 400, "tokens", ("max_position_embeddings",)),
    (0, "create", {"prompt_ids": [7] * 513}, 400, "prompt_ids", ("--max-length 512",)),
]


@pytest.mark.parametrize("tokens, call, body, status, field, words", SESSION_CASES,
                         ids=[f"{c[1]}-{c[4]}-{c[3]}-{i}" for i, c in enumerate(SESSION_CASES)])
def test_a_session_call_that_cannot_fit_is_refused_and_the_session_kept(http, rss, tokens, call, body, status,
                                                                        field, words):
    if call == "create":
        refused(http.post("/v1/sessions", json=body), status, field, *words)
        return healthy(http)
    session_id = new_session(http, tokens)
    scored = http.post(f"/v1/sessions/{session_id}/score", json={"candidates": [[9], [10, 11]]})
    assert scored.status_code == 200, scored.text
    before = http.get(f"/v1/sessions/{session_id}").json()
    start = time.perf_counter()
    refused(http.post(f"/v1/sessions/{session_id}/{call}", json=body), status, field, *words)
    assert time.perf_counter() - start < 2.0
    healthy(http)
    assert http.get(f"/v1/sessions/{session_id}").json() == before  # kept as it was
    again = http.post(f"/v1/sessions/{session_id}/advance", json={"tokens": [10, 11]})  # the scored one, reused
    assert again.status_code == 200 and len(again.json()["values"]) == 2, again.text
    assert http.delete(f"/v1/sessions/{session_id}").status_code == 200


def test_a_session_lost_in_a_restart_is_410_and_an_id_never_issued_404(http):
    session_id = new_session(http, 4)
    instance, token = session_id.split(".")
    other = ("A" if instance[0] != "A" else "B") + instance[1:]
    for path in (f"/v1/sessions/{other}.{token}", f"/v1/sessions/{other}.{token[::-1]}"):
        error = refused(http.get(path), 410, "session_id", "restart")
        assert other in error["message"]
        refused(http.post(f"{path}/score", json={"candidates": [5]}), 410, "session_id", "restart")
    for never in ("nope", f"{instance}.{token[::-1]}", f"{other}.{token}x", "../../etc"):
        assert http.get(f"/v1/sessions/{never}").status_code == 404
    assert http.delete(f"/v1/sessions/{session_id}").status_code == 200


# --- error bodies always encodable: hostile strings in every string field of every endpoint ---
HOSTILE = {
    "lone-surrogate": "\ud800", "surrogates-reversed": "a\udfff\ud800b", "nul": "a\x00b", "only-nul": "\x00",
    "rtl-override": "a cat \u202e tac a", "bom-and-zwj": "\ufeff\u200d", "combining": "e" + "\u0301" * 2000,
    "huge": "a cat sat " * 5000, "astral": "\U0001F600\U000E0001", "control": "\x1b[2J\x07\r\n",
    "empty": "", "blank": " \t",
}

STRING_FIELDS = [  # (method, path, body with the hostile string at X)
    ("POST", "/get_reward", lambda x: {"query": [x]}),
    ("POST", "/get_reward", lambda x: {"query": ["a cat"], "prompts": [x], "labels": [x]}),
    ("POST", "/pooling", lambda x: {"input": x}),
    ("POST", "/pooling", lambda x: {"input": ["a cat", x]}),
    ("POST", "/pooling", lambda x: {"messages": [{"role": x, "content": "a cat"}]}),
    ("POST", "/pooling", lambda x: {"messages": [{"role": "user", "content": x}]}),
    ("POST", "/pooling", lambda x: {"input": "a cat", "model": x}),
    ("POST", "/pooling", lambda x: {"input": "a cat", "task": x}),
    ("POST", "/pooling", lambda x: {"input": "a cat", "encoding_format": x}),
    ("POST", "/classify", lambda x: {"input": x}),
    ("POST", "/classify", lambda x: {"messages": [{"role": x, "content": "a cat"}]}),
    ("POST", "/classify", lambda x: {"messages": [{"role": "user", "content": "a cat"}, {"role": "assistant",
                                                                                         "content": x}]}),
    ("POST", "/v1/values", lambda x: {"texts": ["a cat", x]}),
    ("POST", "/v1/values", lambda x: {"messages": [[{"role": x, "content": "a cat"}]]}),
    ("POST", "/v1/values", lambda x: {"messages": [[{"role": "user", "content": x}]]}),
    ("POST", "/v1/values", lambda x: {"texts": ["a cat"], "encoding": x}),
    ("POST", "/v1/values", lambda x: {"texts": ["a cat"], x: 1}),
    ("POST", "/v1/groups", lambda x: {"prompt": x, "responses": ["a cat"]}),
    ("POST", "/v1/groups", lambda x: {"prompt": "a cat", "responses": [" sat", x]}),
    ("POST", "/v1/groups", lambda x: {"prompt": "a cat", "responses": [" sat"], "encoding": x}),
    ("POST", "/v1/sessions", lambda x: {"prompt": x}),
    ("POST", "/v1/sessions/{x}/score", lambda x: {"candidates": [5]}),
    ("POST", "/v1/sessions/{x}/advance", lambda x: {"tokens": [5]}),
    ("GET", "/v1/sessions/{x}", None),
    ("DELETE", "/v1/sessions/{x}", None),
]


def _raw_json(body) -> bytes:
    """The JSON a client sends: lone surrogates as \\u escapes (the only way JSON can carry them)."""
    return json.dumps(body, ensure_ascii=True).encode()


def _send(http, method: str, path: str, body_of, value: str):
    if "{x}" in path:  # the path: percent-encoded UTF-8, a lone surrogate as its invalid bytes
        path = path.replace("{x}", "".join(f"%{b:02X}" for b in value.encode("utf-8", "surrogatepass"))[:3000])
    content = _raw_json(body_of(value)) if body_of else None
    return http.request(method, path, content=content, headers={"Content-Type": "application/json"})


def _error(response) -> tuple[str, str | None]:
    """The message and the field of an error body in either shape (vexport's, or vLLM's ``param``)."""
    body = response.json()
    error = body.get("error", body) if isinstance(body.get("error", body), dict) else body
    return str(error.get("message")), error.get("field", error.get("param"))


def test_hostile_strings_in_every_string_field_never_answer_500(server, http, rss, session):
    answered = 0
    for method, path, body_of in STRING_FIELDS:
        for name, value in HOSTILE.items():
            response = _send(http, method, path, body_of, value)
            case = (method, path, name, response.status_code, response.text[:300])
            assert response.status_code in (200, 201, 400, 404, 410, 413, 422), case
            if response.status_code >= 400:
                message, field = _error(response)
                assert field and "\n" not in message and "internal" not in message, case
            if response.status_code == 201:
                http.delete(f"/v1/sessions/{response.json()['session']}")
            answered += 1
    assert answered == len(STRING_FIELDS) * len(HOSTILE)
    healthy(http)
    assert "Traceback" not in server.stderr() and "Exception" not in server.stderr(), server.stderr()[-3000:]


@pytest.mark.parametrize("path, body, field", [
    ("/v1/values", {"messages": [[{"role": "\ud800", "content": "a cat"}]]}, "messages[0][0].role"),
    ("/v1/values", {"messages": [[{"role": "user", "content": "a"}, {"role": "\udfff", "content": "b"}]]},
     "messages[0][1].role"),
    ("/pooling", {"messages": [{"role": "\ud800", "content": "a cat"}]}, "messages[0].role"),
    ("/classify", {"messages": [{"role": "user\ud800", "content": "a cat"}]}, "messages[0].role"),
])
def test_a_lone_surrogate_in_a_chat_role_is_a_400_naming_it(http, rss, path, body, field):
    response = http.post(path, content=_raw_json(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    message, named = _error(response)
    assert field in (named or "") + message and "surrogate" in message, response.text
    healthy(http)


# --- scheduling: a large request cannot hold the model thread while a small one waits ---
@pytest.mark.parametrize("path, large", [
    ("/v1/values", {"input_ids": ids(40, 250), "per_token": False}),  # 10,000 tokens, 40 batches' worth
    ("/v1/groups", {"prompt_ids": [5] * 50, "response_ids": ids(30, 250), "per_token": False}),
], ids=["values", "groups"])
def test_a_small_request_is_answered_while_a_large_one_runs(server, http, rss, path, large):
    done: dict[str, float] = {}

    def send_large():
        with httpx.Client(base_url=server.url, timeout=120) as other:
            assert other.post(path, json=large).status_code == 200
        done["large"] = time.perf_counter()

    thread = threading.Thread(target=send_large)
    start = time.perf_counter()
    thread.start()
    while _metric(http.get("/metrics").text, "vexport_queue_tokens") == 0 and thread.is_alive():
        time.sleep(0.002)
    sent = time.perf_counter()
    small(http)
    done["small"] = time.perf_counter()
    thread.join()
    print(f"{path}: the small request waited {(done['small'] - sent) * 1000:.0f} ms; the large one took "
          f"{(done['large'] - start) * 1000:.0f} ms")
    assert done["small"] < done["large"], done


# --- parse errors name their field ---
@pytest.mark.parametrize("path", ["/v1/values", "/v1/groups", "/v1/sessions", "/get_reward", "/pooling"])
@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b'"text"', b"\xff\xfe{", b'{"texts": ["a"]', b"{} {}",
                                 b'{"texts": ["a"]}\x00', b"{" * 5000], ids=repr)
def test_a_body_that_does_not_parse_is_a_4xx_naming_body(http, path, raw):
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    message, field = _error(response)
    assert field == "body" and "\n" not in message, response.text


def test_groups_and_session_calls_take_their_tokens_from_the_queue_bound(server, http, rss):
    session_id = new_session(http, 4)
    answers: list = []

    def send_large():  # 19,750 tokens: with it queued, 251 more do not fit under --max-queue-tokens 20,000
        with httpx.Client(base_url=server.url, timeout=120) as other:
            answers.append(other.post("/v1/values", json={"input_ids": ids(79, 250), "per_token": False}))

    thread = threading.Thread(target=send_large)
    thread.start()
    while _metric(http.get("/metrics").text, "vexport_queue_tokens") == 0 and thread.is_alive():
        time.sleep(0.002)
    group = http.post("/v1/groups", json={"prompt_ids": [5] * 1, "response_ids": ids(14, 250)})
    score = http.post(f"/v1/sessions/{session_id}/score", json={"candidates": [[5]] * 400})
    thread.join()
    assert answers[0].status_code == 200, answers[0].text
    for response in (group, score):
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1, response.text
        assert "--max-queue-tokens" in response.json()["error"]["message"]
    assert http.post(f"/v1/sessions/{session_id}/score", json={"candidates": [[5]]}).status_code == 200
