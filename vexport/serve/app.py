"""The FastAPI app: routes (routes.py), errors as JSON naming the field, API key, metrics, lifecycle.

Every refusal answers ``{"error": {"message", "type", "field", "code"}}`` (on vLLM's ``/pooling`` and ``/classify``,
vLLM's body with ``param``: ``_as_json``): malformed JSON 400, a wrong field
type or a missing field 422, content the model cannot take (too long, outside the vocabulary, empty) 400, a
body over ``--max-body-mb`` or a request over a limit (admission.py) 413, a full queue 429 with
``Retry-After``, an unknown session 404, an evicted one or one lost in a restart 410, an engine replica lost
mid-request 503 with ``Retry-After`` (the client retries). Error bodies are always encodable: a lone surrogate
the client sent is written back escaped (``\\ud800``). ``/health`` and ``/ready`` answer without the API key,
for probes; everything else needs ``Authorization: Bearer KEY`` (or ``?api_key=KEY`` with ``--key-in-url``:
auth.py) when the server has one. Bodies are counted as
they arrive, with ``Content-Length`` or chunked, and cut at ``--max-body-mb``.
"""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from vexport.errors import VexportError
from vexport.serve.auth import KeyCheck
from vexport.serve.batcher import QueueFull
from vexport.serve.engine import EngineUnavailable
from vexport.serve import vllm
from vexport.serve.metrics import Metrics
from vexport.serve.routes import Api, overloaded
from vexport.serve.schemas import (AdvanceRequest, ClassifyRequest, GroupRequest, PoolingRequest, RequestError,
                                   RewardRequest, ScoreRequest, SessionRequest, ValuesRequest, encodable)
from vexport.serve.sessions import SessionGone, SessionNotFound, SessionRefused

log = logging.getLogger(__name__)



def create_app(engine, encoder, options, metrics: Metrics | None = None) -> FastAPI:
    """The app over ENGINE (local or Ray Serve), ENCODER (tokenizer and limits) and the resolved OPTIONS."""
    metrics = metrics or Metrics()
    api = Api(engine, encoder, options, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        log.info("serving %s on the %s engine", options.model_name, engine.name)
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="vexport serve", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    _routes(app, api, engine, options, metrics)
    _errors(app)
    auth = KeyCheck(options.api_key, options.key_in_url, metrics.auth_refused)
    app.add_middleware(_Gate, auth=auth, metrics=metrics,
                       max_body=int(options.max_body_mb * (1 << 20)))
    return app


def _routes(app: FastAPI, api: Api, engine, options, metrics: Metrics) -> None:
    app.post("/get_reward")(api.get_reward)
    app.post("/pooling")(api.pooling)
    app.post("/classify")(api.classify)
    app.post("/v1/values")(api.values)
    app.post("/v1/groups")(api.groups)
    app.post("/v1/sessions")(api.session_create)
    app.post("/v1/sessions/{session_id}/score")(api.session_score)
    app.post("/v1/sessions/{session_id}/advance")(api.session_advance)
    app.get("/v1/sessions/{session_id}")(api.session_get)
    app.delete("/v1/sessions/{session_id}")(api.session_delete)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        body = {"ready": bool(engine.ready), "model": options.model_name, **engine.describe(),
                "max_length": options.max_length, "batch_tokens": options.batch_tokens}
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "owned_by": "vexport"}]}


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request, exc: RequestError):
        return _as_json(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _as_json(_validation_error(exc.errors()), request.url.path)

    @app.exception_handler(QueueFull)
    async def full(request, exc: QueueFull):
        return _as_json(overloaded(exc), request.url.path)

    @app.exception_handler(SessionGone)
    async def gone(request, exc: SessionGone):
        return _as_json(RequestError(410, "session_id", str(exc)), request.url.path)

    @app.exception_handler(SessionRefused)
    async def session_refused(request, exc: SessionRefused):
        return _as_json(RequestError(exc.status, exc.field, exc.message), request.url.path)

    @app.exception_handler(SessionNotFound)
    async def missing(request, exc: SessionNotFound):
        return _as_json(RequestError(404, "session_id", str(exc)), request.url.path)

    @app.exception_handler(EngineUnavailable)
    async def unavailable(request, exc: EngineUnavailable):
        return _as_json(RequestError(503, None, str(exc), {"Retry-After": "1"}), request.url.path)

    @app.exception_handler(VexportError)
    async def bad_input(request, exc: VexportError):
        message = " ".join(str(exc).split())
        field = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
        return _as_json(RequestError(400, field, message), request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code in (404, 405):  # routing: no endpoint here, or not with this method
            message = f"path {request.url.path}: {exc.detail} for {request.method}"
            return _as_json(RequestError(exc.status_code, "path", message, dict(exc.headers or {})),
                            request.url.path)
        if exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, say)
            message = f"body: {exc.detail} (a request body is one JSON object, UTF-8)"
            return _as_json(RequestError(400, "body", message, dict(exc.headers or {})), request.url.path)
        return _as_json(RequestError(exc.status_code, None, str(exc.detail), dict(exc.headers or {})),
                        request.url.path)

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):
        log.exception("request to %s failed", request.url.path)
        return _as_json(RequestError(500, None, f"internal error: {type(exc).__name__}"), request.url.path)


def _as_json(error: RequestError, path: str | None = None) -> JSONResponse:
    """ERROR as the body of PATH's protocol: vLLM's on its endpoints (vllm.py), vexport's elsewhere."""
    if path in vllm.PATHS:
        return vllm.error_response(error)
    return JSONResponse(encodable(error.body()), status_code=error.status, headers=error.headers)


def _validation_error(errors) -> RequestError:
    """The first error, with its field written as ``texts[2]`` (pydantic's union member tags left out)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        position = first["loc"][1] if len(first.get("loc", ())) > 1 else "?"
        reason = first.get("ctx", {}).get("error", "")
        return RequestError(400, "body", f"malformed JSON at character {position}: {reason}".rstrip(": "))
    parts = [p for p in first.get("loc", ()) if p != "body"]
    field = _field_name(parts)
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing" and not parts:
        return RequestError(400, "body", "the body must be a JSON object")
    if field is None:  # the body as a whole (a check across fields, or not an object)
        return RequestError(422, "body", f"body: {message}")
    return RequestError(422, field, f"{field}: {message}")


def _field_name(parts) -> str | None:
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or part in ("str", "int", "bool", "float", "list", "function-after"):
            continue  # a union member's tag, not a field
        else:
            name += f".{part}" if name else part
    return name or None


class _Gate:
    """ASGI middleware: the API key, a body size cap (bytes counted as they arrive), and per-endpoint request
    counts and latency."""

    def __init__(self, app, auth: KeyCheck, metrics: Metrics, max_body: int):
        self.app, self.auth, self.metrics, self.max_body = app, auth, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        status = {"code": 500}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            replay = None
            if refusal is None:
                replay, refusal = await self._body(receive)
            if refusal is not None:
                response = _as_json(refusal, scope["path"])
                response.headers["Connection"] = "close"  # the rest of the body is never read
                await response(scope, receive, tracked_send)
            elif replay is not None:
                await self.app(scope, replay, tracked_send)
            else:
                status["code"] = 499  # the client went away while sending
        finally:
            endpoint = _endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _refusal(self, scope) -> RequestError | None:
        if (refused := self.auth.refusal(scope)) is not None:
            return refused
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return self._too_large(f"the body is {int(length)} bytes")
        return None

    async def _body(self, receive):
        """The whole body read here, counted as it arrives and cut at the cap: (a receive that replays it, None),
        (None, the 413) past the cap, or (None, None) when the client went away."""
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None  # http.disconnect: nobody to answer
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None, self._too_large(f"the body is over {self.max_body} bytes ({size} read so far)")
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                return _replay(b"".join(body), receive), None

    def _too_large(self, what: str) -> RequestError:
        return RequestError(413, "body", f"{what}, over --max-body-mb {self.max_body / (1 << 20):g}")


def _replay(body: bytes, receive):
    """A receive that gives BODY in one message, then whatever the connection says next (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _endpoint(scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
