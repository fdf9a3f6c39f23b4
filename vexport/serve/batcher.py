"""Batching across requests for the local engine: an asyncio queue cut into token-budget batches.

Requests wait in the queue until it holds ``batch_tokens`` tokens or its oldest request has waited
``max_wait_s``; then a flush takes from every queued request its next sequences, at most ``batch_tokens``
tokens of each (always one sequence), plans them at once (sorted by length, within the token budget: the
scoring planner) and runs the batches one after another in the single model thread, each request answered as
soon as its last sequence is done. What a large request has left waits for the next flush, together with the
requests that arrived meanwhile: one client's many sequences cannot hold the model thread for more than one
batch's worth of its tokens while a small request waits. Under load the model never waits.

The queue is bounded in tokens (``QueueFull``: HTTP 429); other model work (a group, a session call) takes its
tokens from the same bound through ``reserved``. A request whose client went away is cancelled, and its
sequences that have not run yet are dropped. Each sequence's values come from the same padded batch rules
whatever else is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds too many tokens; ``retry_after`` is a whole number of seconds to wait."""

    def __init__(self, queued: int, limit: int, retry_after: int):
        super().__init__(f"the server is busy: {queued} tokens queued, --max-queue-tokens is {limit}")
        self.retry_after = retry_after


@dataclass
class _Request:
    sequences: Sequence[Sequence[int]]
    future: asyncio.Future
    arrival: float
    tokens: int
    results: list = field(default_factory=list)
    remaining: int = 0
    taken: int = 0  # sequences handed to a flush so far

    def take(self, budget: int) -> list[int]:
        """The indices of the next sequences, at most BUDGET tokens of them (always at least one)."""
        start, tokens = self.taken, 0
        while self.taken < len(self.sequences) and (self.taken == start or
                                                    tokens + len(self.sequences[self.taken]) <= budget):
            tokens += len(self.sequences[self.taken])
            self.taken += 1
        return list(range(start, self.taken))

    @property
    def untaken_tokens(self) -> int:
        return sum(len(s) for s in self.sequences[self.taken:])


class Batcher:
    """``await batcher.submit(sequences)`` gives each sequence's per-token values (float32 numpy arrays)."""

    def __init__(self, plan: Callable, run_batch: Callable, executor: Executor, *, batch_tokens: int,
                 max_wait_s: float, max_queue_tokens: int, metrics=None):
        self.plan, self.run_batch, self.executor = plan, run_batch, executor
        self.batch_tokens, self.max_wait_s, self.max_queue_tokens = batch_tokens, max_wait_s, max_queue_tokens
        self.metrics = metrics
        self._pending: deque[_Request] = deque()
        self._pending_tokens = 0
        self._in_flight_tokens = 0
        self._in_flight_requests = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._tokens_per_s = 0.0

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="vexport-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def queued_tokens(self) -> int:
        return self._in_flight_tokens

    @contextlib.contextmanager
    def reserved(self, tokens: int):
        """TOKENS of the queue's bound held for the block (``QueueFull`` when they do not fit)."""
        if self._in_flight_tokens and self._in_flight_tokens + tokens > self.max_queue_tokens:
            if self.metrics:
                self.metrics.rejected.inc()
            raise QueueFull(self._in_flight_tokens, self.max_queue_tokens, self._retry_after())
        self._account(tokens, 1)
        try:
            yield
        finally:
            self._account(-tokens, -1)

    async def submit(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        tokens = sum(len(s) for s in sequences)
        with self.reserved(tokens):
            loop = asyncio.get_running_loop()
            request = _Request(sequences, loop.create_future(), loop.time(), tokens, [None] * len(sequences),
                               len(sequences))
            self._pending.append(request)
            self._pending_tokens += tokens
            self._arrived.set()
            try:
                return await request.future
            finally:
                if not request.future.done():
                    request.future.cancel()  # the caller was cancelled (client gone): its unrun sequences go

    def _account(self, tokens: int, requests: int) -> None:
        self._in_flight_tokens += tokens
        self._in_flight_requests += requests
        if self.metrics:
            self.metrics.queue_tokens.set(self._in_flight_tokens)
            self.metrics.queue_requests.set(self._in_flight_requests)

    def _retry_after(self) -> int:
        if self._tokens_per_s <= 0:
            return 1
        return max(1, math.ceil(self._in_flight_tokens / self._tokens_per_s))

    async def _loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._pending:
                continue
            await self._gather()
            items = self._take()
            try:
                await self._run(items)
            except Exception as exc:  # never leave a request waiting on a loop that died
                log.exception("batching failed")
                for r, _ in items:
                    if not r.future.done():
                        r.future.set_exception(exc)
            if self._pending:
                self._arrived.set()  # what large requests left, and what arrived meanwhile, is the next flush

    def _take(self) -> list[tuple[_Request, int]]:
        """This flush's sequences: at most ``batch_tokens`` tokens of each queued request; the rest stays queued."""
        items, left = [], deque()
        for request in self._pending:
            if request.future.done():
                continue
            items += [(request, i) for i in request.take(self.batch_tokens)]
            if request.taken < len(request.sequences):
                left.append(request)
        self._pending = left
        self._pending_tokens = sum(r.untaken_tokens for r in left)
        return items

    async def _gather(self) -> None:
        """Wait until the queue holds a batch's worth of tokens or its oldest request has waited long enough."""
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].arrival + self.max_wait_s
        while self._pending_tokens < self.batch_tokens and (timeout := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return

    async def _run(self, items: list[tuple[_Request, int]]) -> None:
        loop = asyncio.get_running_loop()
        for batch in self.plan([len(r.sequences[i]) for r, i in items]):
            batch = [items[k] for k in batch if not items[k][0].future.done()]  # dropped: client gone
            if not batch:
                continue
            sequences = [r.sequences[i] for r, i in batch]
            start = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self.executor, self.run_batch, sequences)
            except Exception as exc:  # a model failure fails the requests in this batch, not the server
                log.exception("model batch of %d sequences failed", len(sequences))
                for r, _ in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            self._record(sequences, time.perf_counter() - start)
            for (r, i), row in zip(batch, rows):
                r.results[i] = row
                r.remaining -= 1
                if r.remaining == 0 and not r.future.done():
                    r.future.set_result(r.results)

    def _record(self, sequences: Sequence[Sequence[int]], seconds: float) -> None:
        tokens = sum(len(s) for s in sequences)
        rate = tokens / max(seconds, 1e-6)
        self._tokens_per_s = rate if self._tokens_per_s == 0 else 0.8 * self._tokens_per_s + 0.2 * rate
        if self.metrics:
            self.metrics.tokens.inc(tokens)
            self.metrics.batch_rows.observe(len(sequences))
            self.metrics.batch_tokens.observe(len(sequences) * max(len(s) for s in sequences))


def group_chunks(prompt_tokens: int, responses: Sequence[Sequence[int]], batch_tokens: int) -> list[list]:
    """RESPONSES cut in order into chunks whose prompt plus padded responses fit BATCH_TOKENS (at least one each)."""
    chunks: list[list] = [[]]
    for response in responses:
        chunk = chunks[-1]
        width = max([len(response), *(len(r) for r in chunk)])
        if chunk and prompt_tokens + (len(chunk) + 1) * width > batch_tokens:
            chunks.append(chunk := [])
        chunk.append(response)
    return chunks
