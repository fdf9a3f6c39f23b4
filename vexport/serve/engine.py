"""The local engine: the model in this process, every model call in one thread, values batched across requests.

An engine is what the HTTP app calls: ``values(sequences)``, ``group(prompt, responses)`` and the session
calls, all ``async``. ``vexport.serve.ray_engine.RayEngine`` has the same calls over Ray Serve replicas.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from vexport.serve.batcher import Batcher, group_chunks
from vexport.serve.config import ServeOptions
from vexport.serve.sessions import SessionStore
from vexport.serve.worker import ModelWorker

log = logging.getLogger(__name__)


class EngineUnavailable(Exception):
    """The engine could not answer now (a replica died or is restarting): HTTP 503, to retry."""


class LocalEngine:
    """A loaded ValueModel served from this process."""

    name = "local"

    def __init__(self, model, options: ServeOptions, metrics=None):
        self.model, self.options, self.metrics = model, options, metrics
        self.worker = ModelWorker(model, options.batch_tokens)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vexport-model")
        self.batcher = Batcher(self.worker.plan, self.worker.run_batch, self.executor,
                               batch_tokens=options.batch_tokens, max_wait_s=options.max_wait_ms / 1000,
                               max_queue_tokens=options.max_queue_tokens, metrics=metrics)
        self.sessions = SessionStore(model, int(options.session_memory_mb * (1 << 20)), options.session_ttl_s)
        self.ready = False

    def describe(self) -> dict:
        return {"engine": self.name, "format": self.model.format, "precision": self.model.precision,
                "device": str(self.model.device), "replicas": 1}

    async def start(self) -> None:
        self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        self.executor.shutdown(wait=True)

    async def values(self, sequences):
        return await self.batcher.submit(sequences)

    async def group(self, prompt, responses):
        """The responses in chunks of about ``batch_tokens``, each one model call: other requests run between."""
        rows = []
        with self.batcher.reserved(len(prompt) + sum(len(r) for r in responses)):
            for chunk in group_chunks(len(prompt), responses, self.options.batch_tokens):
                rows += await self._call(self.worker.group, prompt, chunk)
        return rows

    async def session_create(self, prompt):
        with self.batcher.reserved(len(prompt)):
            return await self._call(self.sessions.create, prompt)

    async def session_score(self, session_id, candidates):
        with self.batcher.reserved(sum(len(c) for c in candidates)):
            return await self._call(self.sessions.score, session_id, candidates)

    async def session_advance(self, session_id, tokens):
        with self.batcher.reserved(len(tokens)):
            return await self._call(self.sessions.advance, session_id, tokens)

    async def session_values(self, session_id):
        return await self._call(self.sessions.values, session_id)

    async def session_delete(self, session_id):
        return await self._call(self.sessions.delete, session_id)

    async def session_stats(self) -> dict:
        return self.sessions.stats()

    async def _call(self, fn, *args):
        """FN in the model thread, queued behind the batches already there."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
