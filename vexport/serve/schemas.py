"""Request bodies of every endpoint (pydantic), and the error every rejected request gets.

Types are strict (``"1"`` is not a token id, ``1.0`` is not an int). The vexport endpoints (``/v1/...``) refuse
unknown fields, so a typo is named rather than ignored; the OpenRLHF and vLLM endpoints ignore fields those
servers do not know, as they do, and the vLLM models list every field of vLLM's own (vllm.py honours or
refuses each). A rejected request answers ``{"error": {"message", "type", "field", "code"}}``; on the vLLM
endpoints vLLM's ``{"error": {"message", "type", "param", "code"}}`` (vllm.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TokenIds = list[int]


_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}


def encodable(value):
    """VALUE with every string one encodable line: a lone surrogate becomes the text ``\\ud800``, a control
    character (a newline, a NUL) ``\\x0a``."""
    if isinstance(value, str):
        return value.translate(_CONTROLS).encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encodable(v) for v in value]
    return value


class RequestError(Exception):
    """A request the server refuses: HTTP STATUS, the FIELD at fault (``texts[2]``), and a one-line message."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}

    def body(self) -> dict:
        kind = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 410: "gone", 413: "too_large",
                422: "invalid_request", 429: "overloaded", 499: "client_closed", 503: "unavailable"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "error"), "field": self.field,
                          "code": self.status}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Strict):
    role: str
    content: str


# --- OpenRLHF ---
class RewardRequest(_Lenient):
    """OpenRLHF's remote reward model call: ``query`` is each full text (prompt and response)."""

    query: list[str] = Field(min_length=1)
    prompts: list[Any] | None = None
    labels: list[Any] | None = None


# --- vLLM ---
class ContentPart(_Lenient):
    """One part of a message's content; vllm.py takes ``text`` parts and refuses the others by name."""

    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart]


EncodingFormat = Literal["float", "base64", "bytes", "bytes_only"]
EmbedDType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"]


class _VllmInput(_Lenient):
    """Every field of vLLM 0.34's ``ClassificationRequest`` (completion and chat forms); vllm.py honours or refuses
    each. ``input`` is a string, strings, token ids, or lists of token ids; or ``messages``, one chat."""

    model: str | None = None
    user: str | None = None
    input: Any = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    use_activation: bool | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    padding: Literal["max_length", "do_not_pad"] | None = None
    request_id: str | None = None
    priority: int = 0
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    mm_processor_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None  # vLLM: True for input, False for messages
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' and 'messages'")
        return self


class ClassifyRequest(_VllmInput):
    """vLLM's ``/classify``: the value of each input at its last token."""


class PoolingRequest(_VllmInput):
    """vLLM's ``/pooling`` (``PoolingRequest``): per-token values (``task: token_classify``) or the last token's
    (``classify``), as JSON floats, base64 or raw bytes."""

    task: str | None = None
    encoding_format: EncodingFormat = "float"
    embed_dtype: EmbedDType = "float32"
    endianness: Literal["native", "big", "little"] = "native"
    dimensions: int | None = None


# --- vexport ---
class ValuesRequest(_Strict):
    """Per-token (or last-token) values of texts, chats or token-id lists."""

    texts: list[str] | None = Field(default=None, min_length=1)
    messages: list[list[Message]] | None = Field(default=None, min_length=1)
    input_ids: list[TokenIds] | None = Field(default=None, min_length=1)
    prompt_lengths: list[int] | None = None
    per_token: bool = True
    encoding: Literal["json", "base64"] = "json"

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("texts", "messages", "input_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'texts', 'messages' and 'input_ids' (got {given or 'none'})")
        return self


class GroupRequest(_Strict):
    """One prompt and n responses: the prompt runs once, the responses as one batch over its cache."""

    prompt: str | None = None
    prompt_ids: TokenIds | None = None
    responses: list[str] | None = Field(default=None, min_length=1)
    response_ids: list[TokenIds] | None = Field(default=None, min_length=1)
    per_token: bool = True
    encoding: Literal["json", "base64"] = "json"

    @model_validator(mode="after")
    def _one_each(self):
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of 'prompt' and 'prompt_ids'")
        if (self.responses is None) == (self.response_ids is None):
            raise ValueError("give exactly one of 'responses' and 'response_ids'")
        return self


class SessionRequest(_Strict):
    prompt: str | None = None
    prompt_ids: TokenIds | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of 'prompt' and 'prompt_ids'")
        return self


class ScoreRequest(_Strict):
    """K candidates: next tokens ``[5, 9]`` or chunks ``[[5, 6], [9]]``."""

    candidates: list[int] | list[TokenIds] = Field(min_length=1)

    @field_validator("candidates")
    @classmethod
    def _chunks(cls, value):
        return [[c] if isinstance(c, int) else c for c in value]


class AdvanceRequest(_Strict):
    tokens: TokenIds = Field(min_length=1)
