"""vLLM's pooling API, ``POST /pooling`` and ``POST /classify``, answered as vLLM 0.34 answers a token classifier.

Every field of vLLM's ``PoolingRequest`` and ``ClassificationRequest`` (completion and chat forms) is either
done with vLLM's meaning or refused with a 400 naming it; fields vLLM does not know are ignored, as vLLM does.
- ``truncate_prompt_tokens`` keeps that many tokens (-1: ``--max-length``) on ``truncation_side`` (default: the
  tokenizer's); over ``--max-length`` it is a 400. ``add_special_tokens`` defaults to true for ``input`` and
  false for ``messages``.
- ``messages`` are rendered as vLLM renders them: the chat template (the request's ``chat_template`` or the
  tokenizer's) as text, with ``add_generation_prompt`` (default false), ``continue_final_message`` and
  ``chat_template_kwargs``, then tokenized; a content list's text parts are joined with newlines.
- ``encoding_format`` float, base64, bytes (octet-stream, a ``metadata`` header) or bytes_only, in ``embed_dtype``
  and ``endianness``. The ``id`` is ``pooling-``/``classify-`` and the ``X-Request-Id`` header, else
  ``request_id``, else a random one.
- Refused: ``dimensions``, ``normalize`` (removed from vLLM), ``priority`` other than 0, ``padding:
  max_length``, ``mm_processor_kwargs``/``media_io_kwargs`` (a text model), chat fields beside ``input``.
Refusals answer vLLM's body, ``{"error": {"message", "type", "param", "code"}}``, with vLLM's 400 for a schema
error where vexport's own endpoints answer 422 (a full queue 429 and a lost replica 503 too; a missing API key
or an oversized body is refused before the endpoint, in vexport's body).
"""

from __future__ import annotations

import base64
import json
import sys
import time
import uuid
from http import HTTPStatus

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from vexport.serve.schemas import ClassifyRequest, PoolingRequest, RequestError, encodable

POOLING_TASKS = ("token_classify", "classify")
REMOVED = {"normalize": "Parameter `normalize` was removed; use `use_activation` instead."}
REMOVED_TASKS = {"score": "`score` task was removed; use `classify` instead.",
                 "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead."}
CHAT_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs")
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


PATHS = ("/pooling", "/classify")  # every refusal on these answers vLLM's error body (app._as_json)


def error_response(error: RequestError) -> JSONResponse:
    """vLLM's ``ErrorResponse``: the field at fault is ``param``; every string one encodable line (schemas.py)."""
    kind = ERROR_TYPES.get(error.status) or HTTPStatus(error.status).phrase.replace(" ", "")
    body = {"error": {"message": error.message, "type": kind, "param": error.field, "code": error.status}}
    return JSONResponse(encodable(body), status_code=error.status, headers=error.headers)


class VllmEndpoints:
    """``/pooling`` and ``/classify`` over an ``Api`` (routes.py): its tokenizer thread, batcher and options."""

    def __init__(self, api):
        self.api = api

    async def pooling(self, request: Request):
        return await self._answer(request, PoolingRequest, "pooling")

    async def classify(self, request: Request):
        return await self._answer(request, ClassifyRequest, "classify")

    async def _answer(self, request: Request, schema, kind: str):
        body = parse(await request.body(), schema)  # a refusal is answered in vLLM's body (app._as_json)
        self._refuse_unsupported(body)
        sequences = await self.api.tokenize(self.inputs, body)
        rows = await self.api.score(request, "input" if body.input is not None else "messages", sequences)
        request_id = request.headers.get("x-request-id") or body.request_id or uuid.uuid4().hex
        envelope = {"id": f"{kind}-{request_id}", "object": "list", "created": int(time.time()),
                    "model": self.api.options.model_name}
        tokens = sum(len(s) for s in sequences)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                 "completion_tokens_details": None}
        rows = _activate(rows, body.use_activation)
        headers = {"X-Request-Id": request_id} if "x-request-id" in request.headers else None
        if kind == "classify":
            data = [{"index": i, "label": "LABEL_0", "probs": [float(row[-1])], "num_classes": 1}
                    for i, row in enumerate(rows)]
            return JSONResponse({**envelope, "data": data, "usage": usage}, headers=headers)
        values = [row[:, None] if body.task == "token_classify" else row[-1:] for row in rows]
        return pooled(body, values, envelope, usage, headers)

    def _refuse_unsupported(self, body) -> None:
        refusals = [
            ("dimensions", getattr(body, "dimensions", None) is not None, "dimensions is currently not supported"),
            ("priority", body.priority != 0, "priority must be 0: this server does not schedule by priority"),
            ("padding", body.padding == "max_length", "padding 'max_length' is not supported: a value model "
                                                      "reads every position, padding included"),
            ("mm_processor_kwargs", body.mm_processor_kwargs is not None, "this is a text model: "
                                                                           "mm_processor_kwargs is not supported"),
            ("media_io_kwargs", body.media_io_kwargs is not None, "this is a text model: media_io_kwargs is not "
                                                                   "supported"),
            ("continue_final_message", bool(body.continue_final_message and body.add_generation_prompt),
             "Cannot set both `continue_final_message` and `add_generation_prompt` to True."),
        ]
        refusals += [(name, body.input is not None and getattr(body, name) is not None,
                      f"{name} is for chat requests ('messages'), not 'input'") for name in CHAT_FIELDS]
        limit = body.truncate_prompt_tokens
        refusals.append(("truncate_prompt_tokens", limit is not None and limit > self.api.options.max_length,
                         f"truncate_prompt_tokens value is greater than max_model_len "
                         f"({self.api.options.max_length}). Please request a smaller truncation size."))
        if isinstance(body, PoolingRequest):
            body.task = body.task or "token_classify"
            refusals.append(("task", body.task not in POOLING_TASKS, f"task {body.task!r} is not one a value "
                                                                      f"model serves: {', '.join(POOLING_TASKS)}"))
        for name, refused, message in refusals:
            if refused:
                raise RequestError(400, name, message)

    def inputs(self, body) -> list[list[int]]:
        """Token ids of the request, cut by ``truncate_prompt_tokens``, each checked against ``--max-length``."""
        encoder = self.api.encoder
        limit = body.truncate_prompt_tokens
        limit = self.api.options.max_length if limit == -1 else limit
        side = body.truncation_side or getattr(encoder.tokenizer, "truncation_side", "right")
        named = _completion_ids(encoder, body) if body.messages is None else [("messages", self._chat_ids(body))]
        return [encoder.checked(field, _cut(ids, limit, side)) for field, ids in named]

    def _chat_ids(self, body) -> list[int]:
        turns = []
        for i, message in enumerate(body.messages):
            turns.append({"role": message.role, "content": _content_text(f"messages[{i}].content", message.content)})
        options = {**(body.chat_template_kwargs or {}), "add_generation_prompt": bool(body.add_generation_prompt),
                   "continue_final_message": bool(body.continue_final_message)}
        encoder = self.api.encoder
        text = encoder.template_text("messages", turns, body.chat_template, options)
        return encoder.raw_texts("messages", [text], special_tokens=bool(body.add_special_tokens))[0]


def parse(raw: bytes, schema):
    """The request body as SCHEMA; every fault a 400 naming its field (``param``)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RequestError(400, "body", f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body", "the body must be a JSON object")
    for name, message in REMOVED.items():
        if name in data:
            raise RequestError(400, name, message)
    if (task := data.get("task")) in REMOVED_TASKS:
        raise RequestError(400, "task", REMOVED_TASKS[task])
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_name(first.get("loc", ()))
        message = first.get("msg", "invalid value")
        raise RequestError(400, field, f"{field}: {message}" if field else message) from None


def _completion_ids(encoder, body) -> list[tuple[str, list[int]]]:
    value, special = body.input, body.add_special_tokens is not False
    if isinstance(value, str):
        return [("input", encoder.raw_texts("input", [value], special)[0])]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [(f"input[{i}]", ids) for i, ids in enumerate(encoder.raw_texts("input", value, special))]
        if all(_is_int(v) for v in value):
            return [("input", encoder.vocab_checked("input", value))]
        if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
            return [(f"input[{i}]", encoder.vocab_checked(f"input[{i}]", v)) for i, v in enumerate(value)]
    if isinstance(value, list) and not value:
        raise RequestError(400, "input", "input is empty")
    raise RequestError(400, "input", "input must be a string, a list of strings, a list of token ids or a list of "
                                     "lists of token ids")


def _content_text(field: str, content) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise RequestError(400, f"{field}[{j}].type", f"{field}[{j}] is a {part.type!r} part: this text "
                                                          "model takes 'text' parts only")
        texts.append(part.text)
    return "\n".join(texts)


def _cut(ids: list[int], limit: int | None, side: str) -> list[int]:
    """IDS cut to LIMIT tokens: the last ones (SIDE left) or the first (right), as vLLM's TokenizeParams cuts."""
    if limit is None or len(ids) <= limit:
        return ids
    return ids[len(ids) - limit:] if side == "left" else ids[:limit]


def pooled(body, values: list[np.ndarray], envelope: dict, usage: dict, headers: dict | None) -> Response:
    """The ``/pooling`` answer in the requested ``encoding_format``, ``embed_dtype`` and ``endianness``."""
    if body.encoding_format == "float":
        data = [{"index": i, "object": "pooling", "data": v.tolist()} for i, v in enumerate(values)]
        return JSONResponse({**envelope, "data": data, "usage": usage}, headers=headers)
    binaries = [to_bytes(v, body.embed_dtype, body.endianness) for v in values]
    if body.encoding_format == "base64":
        data = [{"index": i, "object": "pooling", "data": base64.b64encode(b).decode("ascii")}
                for i, b in enumerate(binaries)]
        return JSONResponse({**envelope, "data": data, "usage": usage}, headers=headers)
    headers = dict(headers or {})
    if body.encoding_format == "bytes":
        offsets = np.cumsum([0] + [len(b) for b in binaries])
        items = [{"index": i, "embed_dtype": body.embed_dtype, "endianness": body.endianness,
                  "start": int(offsets[i]), "end": int(offsets[i + 1]), "shape": list(v.shape)}
                 for i, v in enumerate(values)]
        metadata = {**{k: envelope[k] for k in ("id", "created", "model")}, "data": items,
                    "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["total_tokens"]}}
        headers["metadata"] = json.dumps(metadata)
    return Response(b"".join(binaries), media_type="application/octet-stream", headers=headers)


def to_bytes(values: np.ndarray, embed_dtype: str, endianness: str) -> bytes:
    """VALUES (float32) as vLLM's ``tensor2binary`` writes them: cast to EMBED_DTYPE, flattened, in ENDIANNESS."""
    import torch

    dtype, view = {"float32": (torch.float32, torch.float32), "float16": (torch.float16, torch.float16),
                   "bfloat16": (torch.bfloat16, torch.float16), "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8),
                   "fp8_e5m2": (torch.float8_e5m2, torch.uint8)}[embed_dtype]
    array = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(dtype).flatten().view(view).numpy()
    if endianness not in ("native", sys.byteorder):
        array = array.byteswap()
    return array.tobytes()


def _activate(rows: list[np.ndarray], use_activation: bool | None) -> list[np.ndarray]:
    """Raw values; the sigmoid only when asked."""
    if not use_activation:
        return rows
    return [(1.0 / (1.0 + np.exp(-row.astype(np.float64)))).astype(np.float32) for row in rows]


def _field_name(parts) -> str | None:
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or part in ("str", "int", "bool", "float", "list", "dict", "function-after"):
            continue  # a union member's tag, not a field
        else:
            name += f".{part}" if name else part
    return name or None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
