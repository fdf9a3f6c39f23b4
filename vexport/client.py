"""``ValueClient``: a `vexport serve` server called with the same calls as an in-process ``ValueModel``.

    model = vexport.load("value-model")                 client = ValueClient("http://127.0.0.1:8000")
    model.values(ids, mask)           # float32 [B, T]  client.values(ids, mask)
    model.sequence_values(ids, mask)  # float32 [B]     client.sequence_values(ids, mask)
    model.score_group(prompt, responses)                client.score_group(prompt, responses)  (or .group)
    s = model.session(prompt); s.score([5, 9]); s.advance([9]); s.values   the same on client.session(prompt)

and ``client.rewards(texts)`` (OpenRLHF's ``/get_reward``). Values travel as float32 bytes (base64), so they
are exactly the server's. A 429 or 503 answer and a connection error are retried with exponential backoff
(a 429's ``Retry-After`` is honoured); every other refusal raises ``ServerError`` with the server's message.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from collections.abc import Sequence

import numpy as np
import torch

from vexport.errors import VexportError

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 502, 503, 504)


class ServerError(VexportError):
    """The server refused a request: ``status`` and ``field`` as it gave them."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.field = status, field


class ValueClient:
    """A client of one `vexport serve` URL; ``api_key`` defaults to none (``VEXPORT_API_KEY`` is the server's)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0, retries: int = 5,
                 backoff_s: float = 0.1, max_backoff_s: float = 5.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.retried = 0  # how many times a request was sent again

    # --- the ValueModel calls ---
    def values(self, input_ids, attention_mask=None) -> torch.Tensor:
        """float32 [B, T]: the value of every token; padding positions are 0."""
        ids, mask = _batch(input_ids, attention_mask)
        real = [b for b in range(ids.shape[0]) if mask[b].any()]  # an all-padding row is all zeros
        out = torch.zeros(ids.shape, dtype=torch.float32)
        if real:
            for b, row in zip(real, self.token_values([ids[b][mask[b].bool()].tolist() for b in real])):
                out[b, mask[b].bool()] = torch.from_numpy(row)
        return out

    def sequence_values(self, input_ids, attention_mask=None) -> torch.Tensor:
        """float32 [B]: the value of each sequence at its last real token."""
        ids, mask = _batch(input_ids, attention_mask)
        body = self.post("/v1/values", {"input_ids": [row[m.bool()].tolist() for row, m in zip(ids, mask)],
                                        "per_token": False, "encoding": "base64"})
        return torch.from_numpy(_decode(body["values"]))

    def score_group(self, prompt_ids, responses) -> list[torch.Tensor]:
        """Per-token values (float32) of each response after one shared prompt, the prompt run once."""
        responses = [torch.as_tensor(r).reshape(-1).tolist() for r in responses]
        body = self.post("/v1/groups", {"prompt_ids": torch.as_tensor(prompt_ids).reshape(-1).tolist(),
                                        "response_ids": responses, "encoding": "base64"})
        return [torch.from_numpy(r) for r in _split(_decode(body["values"]), body["num_tokens"])]

    group = score_group

    def session(self, prompt_ids) -> "RemoteSession":
        """A session whose KV cache lives on the server: ``score``, ``advance``, ``values``, ``close``."""
        body = self.post("/v1/sessions", {"prompt_ids": torch.as_tensor(prompt_ids).reshape(-1).tolist()},
                         idempotent=False)
        return RemoteSession(self, body["session"], body["values"])

    # --- by text and raw ids ---
    def token_values(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token values of each token-id list (float32 numpy arrays)."""
        body = self.post("/v1/values", {"input_ids": [list(map(int, s)) for s in sequences], "encoding": "base64"})
        return _split(_decode(body["values"]), body["num_tokens"])

    def text_values(self, texts: Sequence[str], prompt_lengths: Sequence[int] | None = None) -> list[np.ndarray]:
        payload = {"texts": list(texts), "encoding": "base64"}
        if prompt_lengths is not None:
            payload["prompt_lengths"] = list(prompt_lengths)
        body = self.post("/v1/values", payload)
        return _split(_decode(body["values"]), body["num_tokens"])

    def rewards(self, texts: Sequence[str]) -> list[float]:
        """OpenRLHF's call: the value at each text's last token."""
        return self.post("/get_reward", {"query": list(texts)})["rewards"]

    def ready(self) -> dict:
        return self._send("GET", "/ready", None)

    # --- transport ---
    def post(self, path: str, payload: dict, idempotent: bool = True) -> dict:
        return self._send("POST", path, payload, idempotent)

    def delete(self, path: str) -> dict:
        return self._send("DELETE", path, None, idempotent=False)

    def _send(self, method: str, path: str, payload: dict | None, idempotent: bool = True) -> dict:
        """Send, retrying what is safe to send again: anything refused before it ran (429, 503, no connection),
        and a lost answer or a gateway error only when the call is idempotent (not a session's advance)."""
        import httpx

        retry_on = RETRY_STATUSES if idempotent else (429, 503)
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, json=payload)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                unsent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                if attempt == self.retries or not (idempotent or unsent):
                    raise ServerError(0, f"{method} {path}: {type(exc).__name__}: {exc}") from None
                self._wait(attempt, None, f"{type(exc).__name__}")
                continue
            if response.status_code in retry_on and attempt < self.retries:
                self._wait(attempt, response.headers.get("Retry-After"), f"HTTP {response.status_code}")
                continue
            return _body(response, method, path)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None, why: str) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        log.info("%s: retrying in %.2f s", why, delay)
        self.retried += 1
        time.sleep(delay)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ValueClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteSession:
    """A server-side ``Session``: the same ``score``, ``advance`` and ``values`` (unbatched: one prompt)."""

    def __init__(self, client: ValueClient, session_id: str, values: list[float]):
        self.client, self.id = client, session_id
        self._values = torch.tensor(values, dtype=torch.float32)

    @property
    def values(self) -> torch.Tensor:
        """float32 [T]: the value of every token so far."""
        return self._values

    def score(self, candidates) -> torch.Tensor:
        """float32 [K]: the value after each candidate token, or at each chunk's last token."""
        if isinstance(candidates, torch.Tensor):
            candidates = candidates.tolist()
        body = self.client.post(f"/v1/sessions/{self.id}/score", {"candidates": candidates})
        return torch.tensor(body["values"], dtype=torch.float32)

    def advance(self, tokens) -> torch.Tensor:
        """Append TOKENS; their values (float32 [n])."""
        tokens = torch.as_tensor(tokens).reshape(-1).tolist()
        body = self.client.post(f"/v1/sessions/{self.id}/advance", {"tokens": tokens}, idempotent=False)
        added = torch.tensor(body["values"], dtype=torch.float32)
        self._values = torch.cat([self._values, added])
        return added

    def close(self) -> None:
        self.client.delete(f"/v1/sessions/{self.id}")

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batch(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise VexportError(f"input_ids must be an integer tensor [batch, sequence], got {tuple(ids.shape)} {ids.dtype}")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if mask.shape != ids.shape:
        raise VexportError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return ids.long(), mask.long()


def _body(response, method: str, path: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        raise ServerError(response.status_code, error.get("message") or f"{method} {path}: {response.text[:200]}",
                          error.get("field"))
    return body


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()


def _split(flat: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if lengths else []
