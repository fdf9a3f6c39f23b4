"""Check `vexport serve`'s /pooling and /classify against the request and response classes of vLLM's own wheel.

For a set of requests covering every field of vLLM's PoolingRequest and ClassificationRequest, in completion
(``input``) and chat (``messages``) form, it (1) validates the request with vLLM's request class (is it a
request vLLM takes?), (2) sends it to a real `vexport serve` (the tiny model, 127.0.0.1, a free port), and
(3) validates the answer: a 200 with vLLM's PoolingResponse / ClassificationResponse, base64 and bytes answers
decoded with vLLM's own ``binary2tensor`` / ``decode_pooling_output`` and compared with the float answer, a
refusal with vLLM's ErrorResponse and the field named in ``param``. It prints one row per request and the
fields of vLLM's classes no request covered; it exits 1 when a check fails.

vLLM is not installed, only read: download the wheel (``pip download --no-deps vllm==0.34.0 -d DIR``), unzip its
``*.py`` files into a folder and pass that folder as --vllm. Its protocol modules import a few small packages
beyond vexport's (msgspec, pyzmq, cloudpickle, pybase64, cachetools, py-cpuinfo, openai, openai-harmony, cbor2):
run this script with a Python that has them and vexport's dependencies, for example a venv holding those nine
and a .pth line naming vexport's site-packages.

    python scripts/check_vllm_protocol.py --vllm /tmp/vllm-0.34.0 [--model DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+) ")
MAX_LENGTH = 64
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "An apple."}]
TEXT = "The cat likes three red apples and the dog likes two green pears."


@dataclass
class Case:
    fields: tuple[str, ...]  # the vLLM fields this request exercises
    path: str
    body: dict
    status: int = 200
    param: str | None = None  # the field a refusal must name
    headers: dict = field(default_factory=dict)
    expect: str = ""  # what a 200 must hold, checked by check_values


def cases() -> list[Case]:
    chat = {"messages": CHAT}
    out = [Case(("input", "model", "user"), "/pooling", {"input": TEXT, "model": "m", "user": "u"}),
           Case(("input",), "/pooling", {"input": [TEXT, "A dog."]}),
           Case(("input",), "/pooling", {"input": [1, 40, 41, 42]}),
           Case(("input",), "/classify", {"input": [[1, 40, 41], [1, 50]]}),
           Case(("messages",), "/pooling", chat), Case(("messages",), "/classify", chat),
           Case(("messages",), "/pooling", {"messages": [{"role": "user", "content": [
               {"type": "text", "text": "Name"}, {"type": "text", "text": "a fruit."}]}]})]
    for form, base in (("input", {"input": TEXT}), ("messages", chat)):
        for path in ("/pooling", "/classify"):
            out += [Case(("truncate_prompt_tokens",), path, {**base, "truncate_prompt_tokens": 3}, expect="rows=3"),
                    Case(("truncate_prompt_tokens", "truncation_side"), path,
                         {**base, "truncate_prompt_tokens": 3, "truncation_side": "left"}, expect="rows=3"),
                    Case(("truncate_prompt_tokens",), path, {**base, "truncate_prompt_tokens": -1}),
                    Case(("truncate_prompt_tokens",), path, {**base, "truncate_prompt_tokens": MAX_LENGTH + 1},
                         400, "truncate_prompt_tokens"),
                    Case(("add_special_tokens",), path, {**base, "add_special_tokens": form == "messages"}),
                    Case(("use_activation",), path, {**base, "use_activation": True}),
                    Case(("request_id",), path, {**base, "request_id": "r-1"}, expect="id=r-1"),
                    Case(("request_id",), path, {**base, "request_id": "r-1"}, headers={"X-Request-Id": "h-2"},
                         expect="id=h-2"),
                    Case(("priority",), path, {**base, "priority": 0}),
                    Case(("priority",), path, {**base, "priority": 3}, 400, "priority"),
                    Case(("padding",), path, {**base, "padding": "do_not_pad"}),
                    Case(("padding",), path, {**base, "padding": "max_length"}, 400, "padding"),
                    Case(("cache_salt",), path, {**base, "cache_salt": "salt-0123456789"}),
                    Case(("mm_processor_kwargs",), path, {**base, "mm_processor_kwargs": {"a": 1}}, 400,
                         "mm_processor_kwargs"),
                    Case(("normalize",), path, {**base, "normalize": True}, 400, "normalize")]
        out += [Case(("task",), "/pooling", {**base, "task": "classify"}, expect="rows=1"),
                Case(("task",), "/pooling", {**base, "task": "token_classify"}),
                Case(("task",), "/pooling", {**base, "task": "embed"}, 400, "task"),
                Case(("task",), "/pooling", {**base, "task": "encode"}, 400, "task"),
                Case(("dimensions",), "/pooling", {**base, "dimensions": 8}, 400, "dimensions")]
        for encoding in ("base64", "bytes", "bytes_only"):
            for dtype, endian in (("float32", "native"), ("float16", "big"), ("bfloat16", "little"),
                                  ("fp8_e4m3", "native")):
                out.append(Case(("encoding_format", "embed_dtype", "endianness"), "/pooling",
                                {**base, "encoding_format": encoding, "embed_dtype": dtype, "endianness": endian}))
    for path in ("/pooling", "/classify"):
        out += [Case(("add_generation_prompt",), path, {"messages": CHAT[:2], "add_generation_prompt": True}),
                Case(("continue_final_message",), path, {**chat, "continue_final_message": True}),
                Case(("continue_final_message", "add_generation_prompt"), path,
                     {**chat, "continue_final_message": True, "add_generation_prompt": True}, 400,
                     "continue_final_message"),
                Case(("chat_template",), path, {**chat, "chat_template": "{% for m in messages %}{{ m['role'] }}: "
                                                                          "{{ m['content'] }}\n{% endfor %}"}),
                Case(("chat_template_kwargs",), path, {**chat, "chat_template_kwargs": {"unused": 1}}),
                Case(("media_io_kwargs",), path, {**chat, "media_io_kwargs": {"image": {}}}, 400, "media_io_kwargs"),
                Case(("add_generation_prompt",), path, {"input": TEXT, "add_generation_prompt": True}, 400,
                     "add_generation_prompt")]
    return out


class Vllm:
    """The classes of vLLM's wheel this check uses, imported from the unpacked folder."""

    def __init__(self, folder: Path):
        sys.path.insert(0, str(folder))
        from vllm.entrypoints.pooling.classify import protocol as classify
        from vllm.entrypoints.pooling.pooling import protocol as pooling
        from vllm.entrypoints.pooling.utils import MetadataItem, decode_pooling_output
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.utils.serial_utils import binary2tensor

        self.requests = {("/pooling", "input"): pooling.PoolingCompletionRequest,
                         ("/pooling", "messages"): pooling.PoolingChatRequest,
                         ("/classify", "input"): classify.ClassificationCompletionRequest,
                         ("/classify", "messages"): classify.ClassificationChatRequest}
        self.responses = {"/pooling": pooling.PoolingResponse, "/classify": classify.ClassificationResponse}
        self.reject = {"/pooling": pooling.PoolingRequest, "/classify": classify.ClassificationRequest}
        self.error, self.binary2tensor = ErrorResponse, binary2tensor
        self.metadata_item, self.decode = MetadataItem, decode_pooling_output

    def fields(self) -> set[str]:
        return {name for cls in self.requests.values() for name in cls.model_fields}

    def takes(self, case: Case) -> str:
        """Whether vLLM's own request validation takes the body ('yes', or its error's first line)."""
        from pydantic import TypeAdapter

        form = "messages" if "messages" in case.body else "input"
        try:
            TypeAdapter(self.reject[case.path]).validate_python(case.body)  # the removed-parameter check
            self.requests[(case.path, form)].model_validate(case.body)
            return "yes"
        except Exception as exc:  # pydantic's ValidationError or vLLM's VLLMValidationError
            return "no: " + " ".join(str(exc).split())[:60]


def check(vllm: Vllm, case: Case, response, floats) -> list[str]:
    """What is wrong with RESPONSE to CASE (empty: all right)."""
    import numpy as np

    if response.status_code != case.status:
        return [f"status {response.status_code}, want {case.status}: {response.text[:120]}"]
    if case.status != 200:
        error = vllm.error.model_validate(response.json()).error
        return [] if error.param == case.param else [f"param {error.param!r}, want {case.param!r}"]
    encoding = case.body.get("encoding_format", "float")
    if encoding in ("bytes", "bytes_only"):
        return check_bytes(vllm, case, response, floats)
    answer = vllm.responses[case.path].model_validate(response.json())
    problems = check_values(case, answer)
    if "completion_tokens_details" not in response.json()["usage"]:
        problems.append("usage.completion_tokens_details missing")
    if encoding == "base64":
        for item, want in zip(answer.data, floats, strict=True):
            got = vllm.binary2tensor(base64.b64decode(item.data), want.shape, case.body["embed_dtype"],
                                     case.body["endianness"]).float().numpy()
            if not np.array_equal(got, cast(want, case.body["embed_dtype"])):
                problems.append("base64 decodes to other values than the float answer")
    return problems


def check_bytes(vllm: Vllm, case: Case, response, floats) -> list[str]:
    import numpy as np

    if response.headers.get("content-type") != "application/octet-stream":
        return [f"content-type {response.headers.get('content-type')}"]
    if case.body["encoding_format"] == "bytes_only":
        return [] if "metadata" not in response.headers else ["bytes_only sent a metadata header"]
    metadata = json.loads(response.headers["metadata"])
    items = [vllm.metadata_item(**{**item, "shape": tuple(item["shape"])}) for item in metadata["data"]]
    decoded = vllm.decode(items, response.content)
    for got, want in zip(decoded, floats, strict=True):
        if not np.array_equal(got.float().numpy(), cast(want, case.body["embed_dtype"])):
            return ["bytes decode to other values than the float answer"]
    return []


def check_values(case: Case, answer) -> list[str]:
    if case.expect.startswith("rows="):
        rows = len(answer.data[0].data) if case.path == "/pooling" else None
        if rows is not None and rows != int(case.expect[5:]):
            return [f"{rows} rows, want {case.expect[5:]}"]
    if case.expect.startswith("id=") and not answer.id.endswith("-" + case.expect[3:]):
        return [f"id {answer.id}, want it to end in {case.expect[3:]}"]
    return []


def cast(values, embed_dtype: str):
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[embed_dtype]
    return torch.from_numpy(values).to(dtype).float().numpy()


def float_answer(http, case: Case):
    """The float answer to CASE's request with the encoding fields taken out, as float32 arrays."""
    import numpy as np

    body = {k: v for k, v in case.body.items() if k not in ("encoding_format", "embed_dtype", "endianness")}
    data = http.post(case.path, json=body).json()["data"]
    return [np.asarray(d["data"], dtype=np.float32) for d in data]


def serve(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "300"}
    process = subprocess.Popen([sys.executable, "-m", "vexport", "serve", str(model), "--port", "0", "--max-length",
                                str(MAX_LENGTH)], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
    for line in process.stdout:
        if match := URL_LINE.search(line):
            return process, match.group(1)
    raise SystemExit(f"vexport serve did not start; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm", type=Path, required=True, help="the unpacked vLLM wheel (its *.py files)")
    parser.add_argument("--model", type=Path, help="a value model (default: the tiny one, built here)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import httpx

    vllm = Vllm(args.vllm)
    work = Path(tempfile.mkdtemp(prefix="check-vllm-"))
    if args.model is None:
        from vexport.tiny import make_tiny_value_model

        args.model = make_tiny_value_model(work / "tiny", seed=0)
    process, url = serve(args.model, work / "server.log")
    rows, covered = [], set()
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(600):
                if http.get("/ready").status_code == 200:
                    break
                time.sleep(0.1)
            for case in cases():
                response = http.post(case.path, json=case.body, headers=case.headers)
                floats = float_answer(http, case) if case.body.get("encoding_format", "float") != "float" else None
                problems = check(vllm, case, response, floats)
                covered.update(case.fields)
                rows.append({"fields": ", ".join(case.fields), "form": "messages" if "messages" in case.body else
                             "input", "path": case.path, "request": json.dumps(
                                 {k: v for k, v in case.body.items() if k not in ("input", "messages")})[:70],
                             "vllm_takes": vllm.takes(case), "status": response.status_code,
                             "result": "ok" if not problems else "FAIL " + "; ".join(problems)})
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    print_table(rows, sorted(vllm.fields() - covered))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any(r["result"] != "ok" for r in rows) or vllm.fields() - covered else 0


def print_table(rows: list[dict], uncovered: list[str]) -> None:
    columns = ("fields", "form", "path", "status", "vllm_takes", "result", "request")
    widths = {c: min(72, max(len(c), *(len(str(r[c])) for r in rows))) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c])[:widths[c]].ljust(widths[c]) for c in columns))
    failed = sum(r["result"] != "ok" for r in rows)
    print(f"\n{len(rows)} requests, {failed} failed; fields of vLLM's request classes not covered: "
          f"{', '.join(uncovered) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
