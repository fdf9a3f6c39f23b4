"""Who may call the server: the API key as ``Authorization: Bearer KEY``, or (with ``--key-in-url``) in the URL.

OpenRLHF's trainer sends no headers and has no option to add one, so a protected server would refuse every
reward call. With ``--key-in-url`` the key may instead travel as ``?api_key=KEY`` in the URL, which
``--reward.remote_url http://host:8000/get_reward?api_key=KEY`` carries. The risk: a URL is written where a
header is not (shell history, process lists, the trainer's own logs and error messages, proxies' access logs),
so a key in a URL is easier to leak; use it on a private network, with a key for that trainer alone.

The key is taken out of the query string before the request goes further, so nothing downstream sees or logs
it. Every refusal is one WARNING line (method, path and client address; never the key, never the query) and
one count of ``vexport_auth_refused_total{reason}`` in ``/metrics``.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import parse_qsl, urlencode

from vexport.serve.schemas import RequestError

log = logging.getLogger(__name__)

KEY_PARAM = "api_key"
OPEN_PATHS = ("/health", "/ready")


class KeyCheck:
    """Refuses a request without the API key (none set: every request passes)."""

    def __init__(self, api_key: str | None, key_in_url: bool, refused_counter):
        self.api_key, self.key_in_url, self.refused = api_key, key_in_url, refused_counter

    def refusal(self, scope) -> RequestError | None:
        """None when SCOPE may pass; its query string loses any ``api_key`` either way."""
        url_key = _pop_url_key(scope)
        if not self.api_key or scope["path"] in OPEN_PATHS:
            return None
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        if header:
            return self._check(scope, header.encode(), f"Bearer {self.api_key}".encode(), "header")
        if url_key is not None:
            if not self.key_in_url:
                return self._refuse(scope, "url_not_enabled", f"an {KEY_PARAM} in the URL is accepted only when "
                                                              "the server runs with --key-in-url")
            return self._check(scope, url_key.encode(), self.api_key.encode(), "url")
        return self._refuse(scope, "missing", "missing API key: send the header 'Authorization: Bearer KEY'"
                            + (f" or put ?{KEY_PARAM}=KEY in the URL" if self.key_in_url else ""))

    def _check(self, scope, given: bytes, expected: bytes, where: str) -> RequestError | None:
        if hmac.compare_digest(given, expected):
            return None
        return self._refuse(scope, f"wrong_{where}", f"wrong API key in the {where}")

    def _refuse(self, scope, reason: str, message: str) -> RequestError:
        client = scope.get("client") or ("?", 0)
        log.warning("refused %s %s from %s:%s: %s (401)", scope.get("method", "?"), scope["path"], client[0],
                    client[1], reason.replace("_", " "))
        self.refused.labels(reason).inc()
        return RequestError(401, "Authorization", message, {"WWW-Authenticate": "Bearer"})


def _pop_url_key(scope) -> str | None:
    """The ``api_key`` query parameter's value (the last one given), removed from SCOPE's query string."""
    raw = scope.get("query_string") or b""
    if KEY_PARAM.encode() not in raw:
        return None
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    keys = [value for name, value in pairs if name == KEY_PARAM]
    if not keys:
        return None
    scope["query_string"] = urlencode([(n, v) for n, v in pairs if n != KEY_PARAM]).encode("latin-1")
    return keys[-1]
