"""The Ray Serve engine (``--engine ray``): the model in Ray Serve replicas, the HTTP app in this process.

Two Serve applications, called through their deployment handles (no Serve HTTP proxy: uvicorn in this
process serves the same app as the local engine, so endpoints, validation and errors are identical):

- ``ValueReplica``: one replica per GPU of the cluster (``--replicas`` CPU replicas otherwise). Each call is
  one sequence; ``@serve.batch`` gathers concurrent calls into batches whose ``batch_size_fn`` is their token
  count (at most ``--batch-tokens``, flushed after ``--max-wait-ms``), and the replica cuts them with the
  same planner as the local engine. Ray Serve routes the calls and replaces a replica that dies.
- ``SessionReplica``: one replica holding the sessions (their KV caches must stay in one process), on a GPU
  if the cluster has one more than the value replicas, otherwise on CPU.

A replica lost mid-request answers 503 with ``Retry-After`` (``EngineUnavailable``); the client retries and
Ray Serve sends the retry to a live replica. A request never gets another request's values: each call
carries its own sequence and gets its own answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import asdict

import numpy as np
import ray
import ray.exceptions
from ray import serve
from ray.serve.exceptions import RayServeException

from vexport.errors import VexportError
from vexport.serve.batcher import QueueFull
from vexport.serve.config import ServeOptions
from vexport.serve.engine import EngineUnavailable

log = logging.getLogger(__name__)

MAX_ONGOING = 4096  # calls a replica accepts at once: one per sequence, so a batch can fill


def token_count(sequences: list[list[int]]) -> int:
    """``@serve.batch``'s batch size: the tokens of the queued sequences."""
    return sum(len(s) for s in sequences)


def _load(model: str, settings: dict):
    import torch

    from vexport.runtime import load

    threads = settings.get("threads")
    if threads:
        torch.set_num_threads(threads)
    return load(model, device=settings.get("device"), threads=threads)


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class ValueReplica:
    """One loaded model; ``values(sequence)`` calls are batched by ``@serve.batch``."""

    def __init__(self, model: str, settings: dict):
        from vexport.serve.worker import ModelWorker

        self.worker = ModelWorker(_load(model, settings), settings["batch_tokens"])
        self.values.set_max_batch_size(max(settings["batch_tokens"], settings["max_length"]))
        self.values.set_batch_wait_timeout_s(settings["max_wait_ms"] / 1000)

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.005, batch_size_fn=token_count)
    async def values(self, sequences: list[list[int]]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.worker.values, sequences)

    async def group(self, prompt: list[int], responses: list[list[int]]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.worker.group, prompt, responses)

    def pid(self) -> int:
        return os.getpid()


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class SessionReplica:
    """The sessions of the server (one replica: a session's KV cache lives in one process)."""

    def __init__(self, model: str, settings: dict):
        from vexport.serve.sessions import SessionStore

        self.store = SessionStore(_load(model, settings), int(settings["session_memory_mb"] * (1 << 20)),
                                  settings["session_ttl_s"])

    def call(self, name: str, *args):
        return getattr(self.store, name)(*args)


class RayEngine:
    """The engine calls of ``LocalEngine`` over the two Serve applications' handles."""

    name = "ray"

    def __init__(self, values, sessions, options: ServeOptions, apps: list[str], replicas: int, metrics=None):
        self._values, self._sessions, self.options, self.metrics = values, sessions, options, metrics
        self.apps, self.replicas = apps, replicas
        self.ready = False
        self._in_flight = 0

    @classmethod
    def deploy(cls, model: str, options: ServeOptions, metrics=None):
        """Join (or start) Ray, start both applications, and return the engine with the tokenizer and config
        the HTTP side needs (read from MODEL without loading its weights)."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        options = options.resolved(model, getattr(config, "max_position_embeddings", None))
        _connect(options.ray_address)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas = options.replicas or max(1, gpus)
        value_resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": options.threads or 1}
        session_gpu = gpus > replicas
        settings = {**asdict(options), "api_key": None, "threads": None if gpus else options.threads or 1,
                    "device": options.device or ("cuda" if gpus else "cpu")}
        suffix = uuid.uuid4().hex[:8]
        serve.start(proxy_location="Disabled")
        apps = [f"vexport-values-{suffix}", f"vexport-sessions-{suffix}"]
        log.info("Ray Serve: %d value replicas (%s), sessions on %s", replicas, value_resources,
                 "a GPU" if session_gpu else "CPU")
        values = serve.run(ValueReplica.options(num_replicas=replicas, ray_actor_options=value_resources,
                                                health_check_period_s=2, graceful_shutdown_timeout_s=5)
                           .bind(str(model), settings),
                           name=apps[0], route_prefix=None)
        session_settings = {**settings, "device": "cuda" if session_gpu else "cpu", "threads": options.threads or 1}
        sessions = serve.run(SessionReplica.options(ray_actor_options={"num_gpus": 1 if session_gpu else 0,
                                                                       "num_cpus": 0}, graceful_shutdown_timeout_s=5)
                             .bind(str(model), session_settings), name=apps[1], route_prefix=None)
        return cls(values, sessions, options, apps, replicas, metrics), tokenizer, config, options

    def describe(self) -> dict:
        return {"engine": self.name, "replicas": self.replicas, "applications": self.apps}

    async def start(self) -> None:
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        for app in self.apps:
            try:
                serve.delete(app, _blocking=False)  # the controller takes them down
            except Exception as exc:  # the cluster may be gone already
                log.warning("could not delete Serve application %s: %s", app, exc)
        ray.shutdown()  # stops the local instance if this process started it; otherwise only disconnects

    async def values(self, sequences):
        tokens = sum(len(s) for s in sequences)
        if self._in_flight and self._in_flight + tokens > self.options.max_queue_tokens:
            if self.metrics:
                self.metrics.rejected.inc()
            raise QueueFull(self._in_flight, self.options.max_queue_tokens, 1)
        self._account(tokens)
        responses = [self._values.values.remote(list(s)) for s in sequences]
        try:
            rows = await _answer(asyncio.gather(*responses))
        except asyncio.CancelledError:
            for response in responses:
                response.cancel()
            raise
        finally:
            self._account(-tokens)
        if self.metrics:
            self.metrics.tokens.inc(tokens)
        return rows

    def _account(self, tokens: int) -> None:
        self._in_flight += tokens
        if self.metrics:
            self.metrics.queue_tokens.set(self._in_flight)

    async def group(self, prompt, responses):
        return await _answer(self._values.group.remote(prompt, responses))

    async def session_create(self, prompt):
        return await self._session("create", prompt)

    async def session_score(self, session_id, candidates):
        return await self._session("score", session_id, candidates)

    async def session_advance(self, session_id, tokens):
        return await self._session("advance", session_id, tokens)

    async def session_values(self, session_id):
        return await self._session("values", session_id)

    async def session_delete(self, session_id):
        return await self._session("delete", session_id)

    async def session_stats(self) -> dict:
        return await self._session("stats")

    async def _session(self, name: str, *args):
        return await _answer(self._sessions.call.remote(name, *args))


async def _answer(awaitable):
    """The replica's answer; its own refusals (bad input, a session gone) re-raised as they are, a lost or
    restarting replica as EngineUnavailable."""
    try:
        return await awaitable
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, VexportError):
            raise cause from None
        if isinstance(cause, (ray.exceptions.RayActorError, RayServeException)):
            raise EngineUnavailable(f"a Ray Serve replica failed ({type(cause).__name__}); retry") from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RayServeException,
            ray.exceptions.RaySystemError) as exc:
        raise EngineUnavailable(f"a Ray Serve replica is unavailable ({type(exc).__name__}); retry") from None


def _connect(address: str | None) -> None:
    """Join the cluster at ADDRESS (or RAY_ADDRESS), or start a local instance."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise VexportError(f"--ray-address {address}: cannot join the Ray cluster ({' '.join(str(exc).split())})") \
            from None
