"""Admission: a request's cost checked against the server's limits before anything runs or allocates.

One rule for every endpoint. Once a request is token ids (before it is queued), what it asks the model to run
is counted: its sequences' tokens (``/v1/values``, ``/pooling``, ``/classify``, ``/get_reward``), a group's
prompt and responses (``/v1/groups``), a session's candidates (``.../score``). Over a limit is a 413 naming the
field and the flag; nothing queued, no session and no other client's request is touched. Within the limits, a
full queue is a 429 (``batcher.QueueFull``), and a session call that cannot fit under ``--session-memory-mb``
is refused by the session store before it runs (``sessions.SessionRefused``). The body's bytes are bounded
before any of this, as they arrive (``app._Gate``, ``--max-body-mb``).

    --max-queue-tokens   the tokens of any one request (and of everything queued: 429)
    --max-length         the tokens of one sequence, and of a session's candidates scored in one call (they
                         run side by side in one forward, under an attention mask as wide as their sum)
"""

from __future__ import annotations

from collections.abc import Sequence

from vexport.serve.schemas import RequestError


class Admission:
    """The checks, bound to the resolved serve options."""

    def __init__(self, options):
        self.max_queue_tokens, self.max_length = options.max_queue_tokens, options.max_length

    def sequences(self, field: str, sequences: Sequence[Sequence[int]]) -> int:
        """The tokens of SEQUENCES, refused over ``--max-queue-tokens``."""
        return self._within(field, sum(len(s) for s in sequences), self.max_queue_tokens, "--max-queue-tokens")

    def group(self, field: str, prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> int:
        """A group's prompt and responses, refused over ``--max-queue-tokens``."""
        tokens = len(prompt) + sum(len(r) for r in responses)
        return self._within(field, tokens, self.max_queue_tokens, "--max-queue-tokens")

    def candidates(self, field: str, candidates: Sequence[Sequence[int]]) -> int:
        """A session score's candidates, refused over ``--max-length`` tokens in all."""
        return self._within(field, sum(len(c) for c in candidates), self.max_length, "--max-length")

    @staticmethod
    def _within(field: str, tokens: int, limit: int, flag: str) -> int:
        if tokens > limit:
            raise RequestError(413, field, f"{field}: {tokens} tokens in one request, over {flag} {limit}: "
                                           "split it")
        return tokens
