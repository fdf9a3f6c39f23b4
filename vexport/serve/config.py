"""``vexport serve`` options, checked once (bad values: a VexportError naming the flag, exit code 2)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from vexport.batching import DEFAULT_BATCH_TOKENS
from vexport.errors import VexportError

ENGINES = ("local", "ray")
API_KEY_ENV = "VEXPORT_API_KEY"


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_wait_ms: float = 5.0
    max_queue_tokens: int | None = None  # default: 32 batches' worth
    max_length: int | None = None  # default: the model's max_position_embeddings
    engine: str = "local"
    replicas: int | None = None
    ray_address: str | None = None
    session_memory_mb: float = 1024.0
    session_ttl_s: float = 600.0
    device: str | None = None
    threads: int | None = None
    model_name: str | None = None  # the name /v1/models and the vLLM responses give; default: MODEL as given
    max_body_mb: float = 64.0
    key_in_url: bool = False  # also take the API key as ?api_key=KEY (auth.py)
    reward_max_len: int | None = None  # /get_reward: queries cut to this many tokens (openrlhf.py)
    reward_overlong: str = "truncate"  # or "refuse"
    reward_normalize: bool = False  # (reward - config.mean) / config.std
    reward_mean_std: tuple[float, float] | None = None  # set from the model's config by openrlhf.resolve
    half_close: str = "answer"  # or "drop" (protocol.py)

    def resolved(self, model: str, max_positions: int | None) -> "ServeOptions":
        """Defaults filled in from MODEL and the environment; every flag checked."""
        self.check()
        max_length = self.max_length or max_positions
        if max_length is None:
            raise VexportError("--max-length is required: the model's config has no max_position_embeddings")
        if max_positions and max_length > max_positions:
            raise VexportError(f"--max-length {max_length} is over the model's max_position_embeddings "
                               f"({max_positions})")
        queue = self.max_queue_tokens or 32 * max(self.batch_tokens, max_length)
        if queue < max_length:
            raise VexportError(f"--max-queue-tokens {queue} is under --max-length {max_length}: "
                               "a longest sequence could never be queued")
        return replace(self, max_length=max_length, max_queue_tokens=queue,
                       api_key=self.api_key or os.environ.get(API_KEY_ENV) or None,
                       model_name=self.model_name or str(model))

    def check(self) -> None:
        if self.half_close not in ("answer", "drop"):
            raise VexportError(f"--half-close must be answer or drop, got {self.half_close!r}")
        if self.engine not in ENGINES:
            raise VexportError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "local" and (self.replicas is not None or self.ray_address is not None):
            raise VexportError("--replicas and --ray-address are for --engine ray (the local engine is one process)")
        if not 0 <= self.port <= 65535:
            raise VexportError(f"--port must be in 0..65535, got {self.port}")
        for flag, value in (("--batch-tokens", self.batch_tokens), ("--max-length", self.max_length),
                            ("--max-queue-tokens", self.max_queue_tokens), ("--replicas", self.replicas),
                            ("--threads", self.threads)):
            if value is not None and value < 1:
                raise VexportError(f"{flag} must be at least 1, got {value}")
        for flag, value in (("--max-wait-ms", self.max_wait_ms), ("--session-memory-mb", self.session_memory_mb),
                            ("--session-ttl-s", self.session_ttl_s), ("--max-body-mb", self.max_body_mb)):
            if not value >= 0:
                raise VexportError(f"{flag} must be 0 or more, got {value}")
