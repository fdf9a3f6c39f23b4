"""vLLM's ``/pooling`` and ``/classify`` on a real `vexport serve` (127.0.0.1, a free port): every request field
vLLM 0.34 defines is done with vLLM's meaning or refused with a 400 naming it in ``param``.

Values are checked against ``vexport.load(MODEL).values()`` on the token ids vLLM would build (its tokenization
and chat rendering written out here with the tokenizer's own calls). scripts/check_vllm_protocol.py checks the
same answers against the request and response classes of vLLM's wheel. The module's server also runs with
``--reward-overlong refuse``, tested here to save a second server.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from tests.serve_helpers import ServerProcess
from vexport.runtime import load
from vexport.tiny import tiny_corpus

MAX_LENGTH = 64
TOL = dict(rtol=1e-5, atol=1e-5)
TEXTS = ["The cat likes three red apples.", " ".join(tiny_corpus()[:3])]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "An apple."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    process = ServerProcess(tiny_model_dir, "--max-length", str(MAX_LENGTH), "--reward-max-len", "16",
                            "--reward-overlong", "refuse", "--max-body-mb", "1")
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir)


def alone(model, ids) -> np.ndarray:
    return model.values(torch.tensor([list(ids)]))[0].numpy()


def rows(body) -> list[np.ndarray]:
    return [np.asarray(item["data"], dtype=np.float32)[:, 0] for item in body["data"]]


def test_truncation_and_special_tokens_as_vllm(http, model):
    tok = model.tokenizer
    ids = tok(TEXTS[1])["input_ids"]
    cases = [({"truncate_prompt_tokens": 3}, ids[:3]),  # the tokenizer's side: right keeps the first
             ({"truncate_prompt_tokens": 3, "truncation_side": "left"}, ids[-3:]),
             ({"truncate_prompt_tokens": -1}, ids[:MAX_LENGTH]),
             ({"add_special_tokens": False}, tok(TEXTS[1], add_special_tokens=False)["input_ids"])]
    assert tok.truncation_side == "right" and ids[0] == tok.bos_token_id
    for extra, want in cases:
        body = http.post("/pooling", json={"input": TEXTS[1], **extra}).json()
        got = rows(body)[0]
        assert got.shape == (min(len(want), MAX_LENGTH),), extra
        np.testing.assert_allclose(got, alone(model, want), **TOL, err_msg=str(extra))
        assert body["usage"]["prompt_tokens"] == len(want)
    long = list(range(5, 5 + MAX_LENGTH + 10))  # token ids over --max-length: -1 cuts them to it
    got = rows(http.post("/pooling", json={"input": long, "truncate_prompt_tokens": -1}).json())[0]
    np.testing.assert_allclose(got, alone(model, long[:MAX_LENGTH]), **TOL)
    classify = http.post("/classify", json={"input": TEXTS, "truncate_prompt_tokens": 4,
                                            "truncation_side": "left"}).json()
    np.testing.assert_allclose([d["probs"][0] for d in classify["data"]],
                               [alone(model, tok(t)["input_ids"][-4:])[-1] for t in TEXTS], **TOL)


@pytest.mark.parametrize("dtype, endianness, numpy_dtype", [
    ("float32", "native", "=f4"), ("float16", "native", "=f2"), ("float32", "big", ">f4"),
    ("float16", "little", "<f2"), ("bfloat16", "big", None)])
def test_base64_and_bytes_in_the_asked_dtype_and_byte_order(http, model, dtype, endianness, numpy_dtype):
    ids = model.tokenizer(TEXTS[0])["input_ids"]
    want = torch.from_numpy(alone(model, ids)).to(getattr(torch, dtype)).float().numpy()

    def decode(raw: bytes) -> np.ndarray:
        if numpy_dtype is not None:
            return np.frombuffer(raw, dtype=numpy_dtype).astype(np.float32)
        bits = np.frombuffer(raw, dtype=">u2" if endianness == "big" else "<u2").astype(np.uint32) << 16
        return bits.view(np.float32)  # bfloat16: the high half of a float32

    request = {"input": ids, "embed_dtype": dtype, "endianness": endianness}
    b64 = http.post("/pooling", json={**request, "encoding_format": "base64"}).json()["data"][0]["data"]
    np.testing.assert_array_equal(decode(base64.b64decode(b64)), want)
    raw = http.post("/pooling", json={**request, "encoding_format": "bytes"})
    assert raw.headers["content-type"] == "application/octet-stream"
    metadata = json.loads(raw.headers["metadata"])
    item = metadata["data"][0]
    assert (item["embed_dtype"], item["endianness"], item["shape"]) == (dtype, endianness, [len(ids), 1])
    np.testing.assert_array_equal(decode(raw.content[item["start"]:item["end"]]), want)
    only = http.post("/pooling", json={**request, "encoding_format": "bytes_only"})
    assert "metadata" not in only.headers and only.content == raw.content


def vllm_chat_ids(tok, messages, **options) -> list[int]:
    """vLLM's rendering: the template as text (no generation prompt unless asked), tokenized without special tokens."""
    template = options.pop("chat_template", None)
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, **options)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_requests_are_rendered_as_vllm_renders_them(http, model):
    tok = model.tokenizer
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}, {"type": "text", "text": "Yes."}]}
             if m["role"] == "user" else m for m in CHAT]
    joined = [{**m, "content": m["content"] + "\nYes."} if m["role"] == "user" else m for m in CHAT]
    shout = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}{{ sep }}{% endfor %}"
    cases = [({}, vllm_chat_ids(tok, CHAT, add_generation_prompt=False)),
             ({"messages": CHAT[:2], "add_generation_prompt": True},
              vllm_chat_ids(tok, CHAT[:2], add_generation_prompt=True)),
             ({"continue_final_message": True}, vllm_chat_ids(tok, CHAT, continue_final_message=True)),
             ({"chat_template": shout, "chat_template_kwargs": {"sep": " | "}},
              vllm_chat_ids(tok, CHAT, chat_template=shout, sep=" | ")),
             ({"add_special_tokens": True}, tok(tok.apply_chat_template(CHAT, tokenize=False))["input_ids"]),
             ({"messages": parts}, vllm_chat_ids(tok, joined))]
    assert cases[0][1][0] != tok.bos_token_id and cases[4][1][0] == tok.bos_token_id
    for extra, want in cases:
        body = http.post("/pooling", json={"messages": CHAT, **extra}).json()
        np.testing.assert_allclose(rows(body)[0], alone(model, want), **TOL, err_msg=str(extra))
        classify = http.post("/classify", json={"messages": CHAT, **extra}).json()
        np.testing.assert_allclose(classify["data"][0]["probs"], [alone(model, want)[-1]], **TOL)


def test_ids_usage_and_request_id_echo(http):
    body = http.post("/pooling", json={"input": TEXTS[0], "request_id": "abc-1"}).json()
    assert body["id"] == "pooling-abc-1"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["completion_tokens_details"] is None
    echoed = http.post("/classify", json={"input": TEXTS[0], "request_id": "abc-1"}, headers={"X-Request-Id": "h-9"})
    assert echoed.json()["id"] == "classify-h-9" and echoed.headers["x-request-id"] == "h-9"
    assert http.post("/classify", json={"input": TEXTS[0]}).json()["id"].startswith("classify-")


REFUSED = [  # (path, body, param): every one a 400 with vLLM's error body
    ("/pooling", {"input": "a", "dimensions": 4}, "dimensions"),
    ("/pooling", {"input": "a", "normalize": True}, "normalize"),
    ("/classify", {"input": "a", "normalize": False}, "normalize"),
    ("/pooling", {"input": "a", "task": "encode"}, "task"),
    ("/pooling", {"input": "a", "task": "embed"}, "task"),
    ("/pooling", {"input": "a", "priority": 1}, "priority"),
    ("/pooling", {"input": "a", "padding": "max_length"}, "padding"),
    ("/pooling", {"input": "a", "mm_processor_kwargs": {"x": 1}}, "mm_processor_kwargs"),
    ("/classify", {"messages": CHAT, "media_io_kwargs": {"image": {}}}, "media_io_kwargs"),
    ("/pooling", {"input": "a", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/pooling", {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ("/pooling", {"input": "a", "truncate_prompt_tokens": MAX_LENGTH + 1}, "truncate_prompt_tokens"),
    ("/pooling", {"input": "a", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ("/pooling", {"input": "a", "encoding_format": "npy"}, "encoding_format"),
    ("/pooling", {"input": "a", "embed_dtype": "int8"}, "embed_dtype"),
    ("/pooling", {"input": "a", "endianness": "middle"}, "endianness"),
    ("/pooling", {"input": {"a": 1}}, "input"),
    ("/pooling", {"input": []}, "input"),
    ("/pooling", {"input": [1, -1]}, "input[1]"),
    ("/classify", {"input": [[3, 1000]]}, "input[0][1]"),
    ("/pooling", {"input": [5] * (MAX_LENGTH + 1)}, "input"),
    ("/pooling", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ("/pooling", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/classify", {"input": "a", "messages": CHAT}, None),
]


def test_fields_it_cannot_honour_are_refused_by_name_with_vllms_error_body(http):
    for path, body, param in REFUSED:
        response = http.post(path, json=body)
        error = response.json()["error"]
        assert (response.status_code, error["param"], error["code"]) == (400, param, 400), (path, body, error)
        assert error["type"] == "BadRequestError" and error["message"] and "field" not in error
    malformed = http.post("/pooling", content=b'{"input": ', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "body"
    own = http.post("/v1/values", json={"texts": [1]})  # vexport's own endpoints keep their 422 and 'field'
    assert own.status_code == 422 and own.json()["error"]["field"] == "texts[0]"


def test_the_gates_refusals_answer_in_vllms_body_on_the_vllm_endpoints(http):
    """The body cap is checked before any endpoint runs: on /pooling and /classify its 413 is still vLLM's body."""
    big = {"input": "word " * (300 << 10)}  # 1.5 MB, over --max-body-mb 1
    for path in ("/pooling", "/classify"):
        error = http.post(path, json=big).json()["error"]
        assert (error["code"], error["param"], "field" in error) == (413, "body", False), (path, error)
        assert "--max-body-mb" in error["message"]
    own = http.post("/v1/values", json={"texts": [big["input"]]})
    assert own.status_code == 413 and own.json()["error"]["field"] == "body"
    assert http.post("/pooling", json={"input": "ok"}).status_code == 200


def test_reward_overlong_refuse_keeps_the_400(http, model):
    short = http.post("/get_reward", json={"query": ["A cat."]}).json()
    np.testing.assert_allclose(short["rewards"], [alone(model, model.tokenizer("A cat.", add_special_tokens=False)[
        "input_ids"])[-1]], **TOL)
    response = http.post("/get_reward", json={"query": ["A cat.", TEXTS[1]]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["field"] == "query[1]" and "--reward-max-len 16" in error["message"]


def test_a_client_that_half_closes_after_its_request_gets_the_answer(server, model):
    """``shutdown(SHUT_WR)`` after a complete request (``--half-close answer``, the default)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    for path, payload in (("/pooling", {"input": TEXTS[0]}), ("/get_reward", {"query": [TEXTS[0]]})):
        body = json.dumps(payload).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):  # the server closes after answering
                answer += chunk
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer[:300]
        got = json.loads(content)
        want = alone(model, model.tokenizer(TEXTS[0], add_special_tokens=path == "/pooling")["input_ids"])
        value = got["data"][0]["data"][-1][0] if path == "/pooling" else got["rewards"][0]
        np.testing.assert_allclose(value, want[-1], **TOL)
