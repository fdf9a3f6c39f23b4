"""uvicorn's HTTP protocol, made to answer a client that half-closes its socket after sending its request.

asyncio closes a connection when its protocol's ``eof_received()`` returns false, and uvicorn's returns None:
a client that sends a complete request and then shuts its writing side (``shutdown(SHUT_WR)``, ``nc -N``) is
taken for gone, its request dropped, and nothing is written back. At the TCP level that end-of-file is the same
as the one a client sends when it closes its socket altogether (a client that timed out), so which one to
serve is a choice, ``--half-close``:
- ``answer`` (the default): while a request is in flight, end-of-file keeps the connection open for writing;
  the answer is sent and then the connection is closed. A client that closed altogether while queued is
  scored all the same (its answer is lost).
- ``drop``: uvicorn's behaviour; end-of-file drops a queued request at once
  (``vexport_dropped_disconnected_total``), and a half-closed client gets no answer.
"""

from __future__ import annotations

HALF_CLOSE = ("answer", "drop")


def http_protocol(half_close: str):
    """The uvicorn HTTP protocol class for ``--half-close HALF_CLOSE``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if half_close == "drop":
        return AutoHTTPProtocol

    class AnswerHalfClosed(AutoHTTPProtocol):
        def eof_received(self) -> bool | None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return None  # between requests: the client is done, close as uvicorn does
            cycle.keep_alive = False  # answer, then close
            return True  # keep the transport open for writing

    return AnswerHalfClosed
