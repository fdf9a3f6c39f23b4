"""Server-side sessions: a ``ValueModel.session`` per id, its KV cache kept between requests.

The store holds every live session under a memory cap (the KV cache bytes of its tokens, pending candidates
included) and an idle time-to-live. Going over the cap evicts the least recently used sessions first; an
evicted or expired id answers ``SessionGone`` (HTTP 410, naming the session and why) for as long as the store
remembers it, an id it never issued ``SessionNotFound`` (404). Ids carry the store's instance id
(``INSTANCE.TOKEN``), so an id issued by an earlier run of the server, lost in a restart, answers 410 too.

A call that would take a session over the cap by itself (its tokens with the session's, alone under the cap)
is refused before it runs (``SessionRefused``, HTTP 413 naming the field and ``--session-memory-mb``), and the
session is kept as it was; a call past the model's positions is refused the same way (400). Calls may come
from several threads.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vexport.errors import InputError, VexportError

REMEMBERED_GONE = 10_000  # evicted ids kept to answer 410 rather than 404
SESSION_ID = re.compile(r"([A-Za-z0-9_-]{8})\.[A-Za-z0-9_-]{16}")  # INSTANCE.TOKEN, as create issues them


class SessionNotFound(VexportError):
    """No session with this id was ever issued here."""


class SessionGone(VexportError):
    """The session existed but was evicted (memory cap or idle time-to-live) or its replica was lost."""


class SessionRefused(VexportError):
    """A call refused before it ran, the session kept: HTTP STATUS, the FIELD at fault, one line."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(status, field, message)  # every argument in args: it pickles (Ray replicas)
        self.status, self.field, self.message = status, field, message

    def __str__(self) -> str:
        return self.message


@dataclass
class _Entry:
    session: Any
    last_used: float
    tokens: int = 0  # committed plus pending (scored candidates keep their keys and values until advance)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one call at a time on a session


class SessionStore:
    """Sessions of one model: ``create``, ``score``, ``advance``, ``delete``; values as float32 numpy arrays."""

    def __init__(self, model, memory_bytes: int, ttl_s: float, clock=time.monotonic):
        self.model, self.memory_bytes, self.ttl_s, self.clock = model, memory_bytes, ttl_s, clock
        self.token_bytes = kv_bytes_per_token(model)
        self._live: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0
        self.instance = secrets.token_urlsafe(6)  # 8 characters; a restarted server has another

    def create(self, prompt_ids: list[int]) -> tuple[str, np.ndarray]:
        self._check_cap("prompt_ids", 0, len(prompt_ids))
        with _naming("prompt_ids"):
            session = self.model.session(torch.tensor(prompt_ids, dtype=torch.long))
        session_id = f"{self.instance}.{secrets.token_urlsafe(12)}"
        with self._lock:
            self._live[session_id] = _Entry(session, self.clock(), len(prompt_ids))
            self._enforce(session_id)
        return session_id, _numpy(session.values)

    def score(self, session_id: str, candidates: list[list[int]]) -> np.ndarray:
        entry = self._use(session_id)
        with entry.lock:
            committed = int(entry.session.tokens.shape[-1])
            self._check_cap("candidates", committed, sum(len(c) for c in candidates), session_id)
            with _naming("candidates"):
                values = _numpy(entry.session.score(candidates))
            self._grow(session_id, entry, committed + sum(len(c) for c in candidates))
        return values

    def advance(self, session_id: str, tokens: list[int]) -> np.ndarray:
        entry = self._use(session_id)
        with entry.lock:
            self._check_cap("tokens", int(entry.session.tokens.shape[-1]), len(tokens), session_id)
            with _naming("tokens"):
                values = _numpy(entry.session.advance(tokens))
            self._grow(session_id, entry, int(entry.session.tokens.shape[-1]))
        return values

    def values(self, session_id: str) -> np.ndarray:
        entry = self._use(session_id)
        with entry.lock:
            return _numpy(entry.session.values)

    def delete(self, session_id: str) -> None:
        with self._lock:
            if self._live.pop(session_id, None) is None:
                self._raise_missing(session_id)
            self._gone[session_id] = "deleted"
            self._trim_gone()

    def stats(self) -> dict:
        with self._lock:
            self._expire(None)
            return {"sessions": len(self._live), "bytes": self._bytes(), "evictions": self.evictions}

    def _check_cap(self, field: str, committed: int, new: int, session_id: str | None = None) -> None:
        """Refuse, before anything runs, a call whose tokens cannot fit under the cap even with the session alone."""
        tokens = committed + new
        if tokens * self.token_bytes <= self.memory_bytes:
            return
        held = f"session {session_id} holds {committed} tokens (kept as it was); " if session_id else ""
        raise SessionRefused(413, field, f"{field}: {held}{new} more tokens make {tokens}, which need "
                                         f"{_mb(tokens * self.token_bytes)} of KV cache, over --session-memory-mb "
                                         f"{self.memory_bytes / (1 << 20):g}")

    # --- bookkeeping, under the lock ---
    def _use(self, session_id: str) -> _Entry:
        with self._lock:
            self._expire(None)
            entry = self._live.get(session_id)
            if entry is None:
                self._raise_missing(session_id)
            entry.last_used = self.clock()
            self._live.move_to_end(session_id)
            return entry

    def _grow(self, session_id: str, entry: _Entry, tokens: int) -> None:
        with self._lock:
            entry.tokens = tokens
            if session_id in self._live:
                self._enforce(session_id)
            if session_id not in self._live:
                raise SessionGone(f"session {session_id} was evicted: its {tokens} tokens need "
                                  f"{_mb(tokens * self.token_bytes)} of KV cache, over the cap of "
                                  f"{_mb(self.memory_bytes)}")

    def _enforce(self, current: str) -> None:
        """Drop idle sessions, then the least recently used others, then CURRENT itself, until under the cap."""
        self._expire(current)
        for session_id in [s for s in self._live if s != current] + [current]:
            if self._bytes() <= self.memory_bytes:
                return
            self._evict(session_id, f"evicted (least recently used) to keep sessions under {_mb(self.memory_bytes)}")

    def _expire(self, keep: str | None) -> None:
        now = self.clock()
        for session_id, entry in list(self._live.items()):
            if session_id != keep and now - entry.last_used > self.ttl_s:
                self._evict(session_id, f"expired after {self.ttl_s:g} s idle")

    def _evict(self, session_id: str, reason: str) -> None:
        self._live.pop(session_id, None)
        self._gone[session_id] = reason
        self.evictions += 1
        self._trim_gone()

    def _bytes(self) -> int:
        return sum(e.tokens for e in self._live.values()) * self.token_bytes

    def _trim_gone(self) -> None:
        while len(self._gone) > REMEMBERED_GONE:
            self._gone.popitem(last=False)

    def _raise_missing(self, session_id: str):
        reason = self._gone.get(session_id)
        if reason is not None:
            raise SessionGone(f"session {session_id} is gone: {reason}")
        issued = SESSION_ID.fullmatch(session_id)
        if issued and issued.group(1) != self.instance:
            raise SessionGone(f"session {session_id} is gone: it was issued by an earlier run of the server "
                              f"(instance {issued.group(1)}; this one is {self.instance}), its KV cache lost in "
                              "the restart")
        raise SessionNotFound(f"session {session_id} does not exist")


@contextlib.contextmanager
def _naming(field: str):
    """The model's refusals of the input (positions past the model's limit) as a 400 naming FIELD."""
    try:
        yield
    except InputError as exc:
        raise SessionRefused(400, field, f"{field}: {' '.join(str(exc).split())}") from None


def kv_bytes_per_token(model) -> int:
    """Keys and values of one token over every layer: float32 on CPU, 16-bit on an accelerator."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * (4 if model.device.type == "cpu" else 2)


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.float().cpu().numpy()


def _mb(size: float) -> str:
    return f"{size / (1 << 20):.3g} MiB"
