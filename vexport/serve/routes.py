"""The endpoint handlers: request bodies (schemas.py) to token ids (inputs.py) to the engine, and back to JSON.

    POST /get_reward        OpenRLHF: {"query": [str], ...} -> {"rewards", "scores", "extra_logs"}
    POST /pooling           vLLM: {"input", "task": "token_classify" | "classify"} -> {"data": [{"data"}]}
    POST /classify          vLLM: {"input"} -> {"data": [{"probs": [value]}]}
    POST /v1/values         texts | messages | input_ids, prompt_lengths, per_token, encoding json | base64
    POST /v1/groups         one prompt, n responses: the prompt runs once
    POST /v1/sessions       a session over a prompt; .../score, .../advance, GET and DELETE /v1/sessions/{id}

Values are raw (no sigmoid) unless a vLLM request asks for ``use_activation: true``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from vexport.serve.admission import Admission
from vexport.serve.batcher import QueueFull
from vexport.serve.schemas import (AdvanceRequest, ClassifyRequest, GroupRequest, PoolingRequest, RequestError,
                                   RewardRequest, ScoreRequest, SessionRequest, ValuesRequest)

log = logging.getLogger(__name__)

POOLING_TASKS = ("token_classify", "classify")


class Api:
    """Handlers bound to one engine, encoder and options."""

    def __init__(self, engine, encoder, options, metrics):
        self.engine, self.encoder, self.options, self.metrics = engine, encoder, options, metrics
        self.admission = Admission(options)

    # --- scoring through the batcher, dropped if the client goes away ---
    async def score(self, request: Request, field: str, sequences: list[list[int]]) -> list[np.ndarray]:
        self.admission.sequences(field, sequences)
        work = asyncio.ensure_future(self.engine.values(sequences))
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            gone.cancel()
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        self.metrics.dropped.inc()
        raise RequestError(499, None, "the client closed the connection; its request was dropped from the queue")

    async def tokenize(self, fn, *args):
        """Tokenize in a thread, so the event loop keeps taking requests."""
        return await asyncio.to_thread(fn, *args)

    # --- OpenRLHF ---
    async def get_reward(self, request: Request, body: RewardRequest):
        sequences = await self.tokenize(self.encoder.texts, "query", body.query)
        rewards = [float(v[-1]) for v in await self.score(request, "query", sequences)]
        return JSONResponse({"rewards": rewards, "scores": rewards,
                             "extra_logs": {"num_tokens": [len(s) for s in sequences]}})

    # --- vLLM ---
    async def pooling(self, request: Request, body: PoolingRequest):
        if body.task not in POOLING_TASKS:
            raise RequestError(400, "task", f"task {body.task!r} is not one a value model serves: "
                                            f"{', '.join(POOLING_TASKS)}")
        sequences = await self.tokenize(self.vllm_inputs, body)
        rows = _activate(await self.score(request, "input", sequences), body.use_activation)
        data = []
        for index, row in enumerate(rows):
            value = row[:, None] if body.task == "token_classify" else row[-1:]
            payload = _b64(value) if body.encoding_format == "base64" else value.tolist()
            data.append({"index": index, "object": "pooling", "data": payload})
        return JSONResponse(self._vllm_envelope("pool", data, sequences))

    async def classify(self, request: Request, body: ClassifyRequest):
        sequences = await self.tokenize(self.vllm_inputs, body)
        rows = _activate(await self.score(request, "input", sequences), body.use_activation)
        data = [{"index": i, "label": "LABEL_0", "probs": [float(row[-1])], "num_classes": 1}
                for i, row in enumerate(rows)]
        return JSONResponse(self._vllm_envelope("classify", data, sequences))

    def vllm_inputs(self, body) -> list[list[int]]:
        if body.messages is not None:
            return [self.encoder.chat("messages", body.messages)]
        value = body.input
        if isinstance(value, str):
            return self.encoder.texts("input", [value])
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                return self.encoder.texts("input", value)
            if all(_is_int(v) for v in value):
                return [self.encoder.one_ids("input", value)]
            if all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
                return self.encoder.ids("input", value)
        if isinstance(value, list) and not value:
            raise RequestError(400, "input", "input is empty")
        raise RequestError(422, "input", "input must be a string, a list of strings, a list of token ids or a list "
                                         "of lists of token ids")

    def _vllm_envelope(self, kind: str, data: list, sequences: list[list[int]]) -> dict:
        tokens = sum(len(s) for s in sequences)
        return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.options.model_name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    # --- vexport ---
    async def values(self, request: Request, body: ValuesRequest):
        field, sequences = await self.tokenize(self._values_inputs, body)
        spans = _response_spans(body.prompt_lengths, sequences, field)
        rows = await self.score(request, field, sequences)
        rows = [row[start:] for row, start in zip(rows, spans)]
        return JSONResponse(_values_body(rows, body.per_token, body.encoding))

    def _values_inputs(self, body: ValuesRequest) -> tuple[str, list[list[int]]]:
        if body.texts is not None:
            return "texts", self.encoder.texts("texts", body.texts)
        if body.messages is not None:
            return "messages", self.encoder.chats("messages", body.messages)
        return "input_ids", self.encoder.ids("input_ids", body.input_ids)

    async def groups(self, request: Request, body: GroupRequest):
        prompt, responses = await self.tokenize(self._group_inputs, body)
        self.admission.group("response_ids" if body.responses is None else "responses", prompt, responses)
        rows = await self.engine.group(prompt, responses)
        return JSONResponse({**_values_body(rows, body.per_token, body.encoding), "prompt_tokens": len(prompt)})

    def _group_inputs(self, body: GroupRequest) -> tuple[list[int], list[list[int]]]:
        if body.prompt is not None:
            prompt = self.encoder.texts("prompt", [body.prompt])[0]
        else:
            prompt = self.encoder.one_ids("prompt_ids", body.prompt_ids)
        if body.responses is not None:
            field, responses = "responses", self.encoder.texts("responses", body.responses, special_tokens=False)
        else:
            field, responses = "response_ids", self.encoder.ids("response_ids", body.response_ids)
        self.encoder.check_total(field, len(prompt) + max(len(r) for r in responses))
        return prompt, responses

    # --- sessions ---
    async def session_create(self, body: SessionRequest):
        if body.prompt is not None:
            prompt = (await self.tokenize(self.encoder.texts, "prompt", [body.prompt]))[0]
        else:
            prompt = self.encoder.one_ids("prompt_ids", body.prompt_ids)
        session_id, values = await self.engine.session_create(prompt)
        await self._session_gauges()
        return JSONResponse({"session": session_id, "tokens": len(prompt), "prompt_ids": prompt,
                             "values": values.tolist()}, status_code=201)

    async def session_score(self, session_id: str, body: ScoreRequest):
        candidates = self.encoder.ids("candidates", body.candidates)
        self.admission.candidates("candidates", candidates)
        values = await self.engine.session_score(session_id, candidates)
        await self._session_gauges()
        return JSONResponse({"session": session_id, "values": values.tolist()})

    async def session_advance(self, session_id: str, body: AdvanceRequest):
        tokens = self.encoder.one_ids("tokens", body.tokens)
        values = await self.engine.session_advance(session_id, tokens)
        await self._session_gauges()
        return JSONResponse({"session": session_id, "values": values.tolist()})

    async def session_get(self, session_id: str):
        values = await self.engine.session_values(session_id)
        return JSONResponse({"session": session_id, "tokens": len(values), "values": values.tolist()})

    async def session_delete(self, session_id: str):
        await self.engine.session_delete(session_id)
        await self._session_gauges()
        return JSONResponse({"session": session_id, "deleted": True})

    async def _session_gauges(self) -> None:
        stats = await self.engine.session_stats()
        self.metrics.sessions.set(stats["sessions"])
        self.metrics.session_evictions.set(stats["evictions"])


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the ASGI server's ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _activate(rows: list[np.ndarray], use_activation: bool | None) -> list[np.ndarray]:
    """Raw values; the sigmoid only when asked (vLLM applies it to one-label classifiers by default)."""
    if not use_activation:
        return rows
    return [(1.0 / (1.0 + np.exp(-row.astype(np.float64)))).astype(np.float32) for row in rows]


def _response_spans(prompt_lengths: list[int] | None, sequences: list[list[int]], field: str) -> list[int]:
    if prompt_lengths is None:
        return [0] * len(sequences)
    if len(prompt_lengths) != len(sequences):
        raise RequestError(400, "prompt_lengths", f"prompt_lengths has {len(prompt_lengths)} entries, {field} has "
                                                  f"{len(sequences)}")
    for i, (start, seq) in enumerate(zip(prompt_lengths, sequences)):
        if not 0 <= start < len(seq):
            raise RequestError(400, f"prompt_lengths[{i}]", f"prompt_lengths[{i}] is {start}: {field}[{i}] has "
                                                            f"{len(seq)} tokens (a response needs at least one)")
    return list(prompt_lengths)


def _values_body(rows: list[np.ndarray], per_token: bool, encoding: str) -> dict:
    lengths = [len(r) for r in rows]
    if not per_token:
        last = np.array([r[-1] for r in rows], dtype=np.float32)
        if encoding == "base64":
            return {"values": _b64(last), "shape": [len(rows)], "dtype": "float32", "num_tokens": lengths}
        return {"values": last.tolist(), "num_tokens": lengths}
    if encoding == "base64":
        flat = np.concatenate(rows) if rows else np.zeros(0, np.float32)
        return {"values": _b64(flat), "shape": [len(flat)], "dtype": "float32", "num_tokens": lengths}
    return {"values": [r.tolist() for r in rows], "num_tokens": lengths}


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def overloaded(exc: QueueFull) -> RequestError:
    return RequestError(429, None, str(exc), {"Retry-After": str(exc.retry_after)})
