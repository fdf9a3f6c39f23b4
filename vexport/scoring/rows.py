"""One input row to token ids, or the reason it is rejected.

A row is a JSON object with one of: ``text`` (tokenized exactly as ``tokenizer(text)``), ``prompt`` and
``response`` (a user turn rendered with the chat template and its generation prompt, then the response, the
assistant turn left open), or ``messages`` (a chat; a final assistant turn is left open the same way). An
optional ``id`` is carried through. Nothing is ever truncated: a row over ``max_length`` tokens is rejected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vexport.errors import VexportError
from vexport.evalset import ChatError, checked_messages, encode, render

CHARS_PER_TOKEN_CAP = 64  # a text over 64 x max_length characters is rejected before it is tokenized
_FORMS = "give 'text', 'prompt' and 'response', or 'messages'"


class RowRejected(Exception):
    """A row that cannot be scored; the message is the reason written to errors.jsonl."""


@dataclass(frozen=True)
class EncodedRow:
    ids: list[int]
    id: int | str | None


@dataclass(frozen=True)
class _Request:
    text: str
    chat: bool  # rendered with the chat template: no second bos, eos appended with --append-eos
    id: int | str | None


def line_limit(max_length: int) -> int:
    """The longest JSONL line read whole: room for 64 characters per token, each up to 6 bytes as JSON."""
    return max(1 << 20, 6 * CHARS_PER_TOKEN_CAP * max_length)


class RowEncoder:
    """Turns a window of raw rows into EncodedRow or a rejection reason (str), tokenizing in one call."""

    def __init__(self, tokenizer: Any, max_length: int, append_eos: bool = False, id_kind: str | None = None):
        if append_eos and tokenizer.eos_token_id is None:
            raise VexportError("--append-eos: the model's tokenizer has no end-of-sequence token")
        self.tokenizer, self.max_length, self.append_eos, self.id_kind = tokenizer, max_length, append_eos, id_kind

    def encode(self, lines: Sequence[bytes | None]) -> list[EncodedRow | str]:
        requests: list[_Request | str] = []
        for line in lines:
            try:
                requests.append(self._request(line))
            except RowRejected as exc:
                requests.append(printable(str(exc)))
        ids = iter(self._tokenize([r for r in requests if isinstance(r, _Request)]))
        return [r if isinstance(r, str) else self._finish(r, next(ids)) for r in requests]

    def _request(self, line: bytes | None) -> _Request:
        record = parse_line(line, line_limit(self.max_length), self.max_length)
        text, chat = row_text(record, self.tokenizer)
        row_id = check_id(record.get("id"), self.id_kind)
        cap = CHARS_PER_TOKEN_CAP * self.max_length
        if len(text) > cap:
            raise RowRejected(f"{len(text)} characters, over the {cap}-character cap for --max-length "
                              f"{self.max_length} ({CHARS_PER_TOKEN_CAP} per token)")
        return _Request(valid_unicode(text, "the chat" if chat else "text"), chat, row_id)

    def _tokenize(self, requests: list[_Request]) -> list[list[int] | str]:
        """Token ids for every request, in order: plain texts as tokenizer(text) (in one call), chats without a
        second bos; a text the tokenizer fails on is rejected, not the window."""
        out: list[list[int] | str] = [[] for _ in requests]
        plain = [i for i, r in enumerate(requests) if not r.chat]
        try:
            encoded = self.tokenizer([requests[i].text for i in plain], verbose=False)["input_ids"] if plain else []
        except Exception:  # one bad text fails the whole call: find it row by row
            encoded = [self._one(lambda t=requests[i].text: self.tokenizer(t, verbose=False)["input_ids"])
                       for i in plain]
        for i, ids in zip(plain, encoded):
            out[i] = ids if isinstance(ids, str) else list(ids)
        for i, r in enumerate(requests):
            if r.chat:
                out[i] = self._one(lambda t=r.text: encode(self.tokenizer, t))
        return out

    @staticmethod
    def _one(tokenize) -> list[int] | str:
        try:
            return tokenize()
        except Exception as exc:  # tokenizers raise several types on text they cannot take
            message = " ".join(str(exc).split())[:200]
            return printable(f"the tokenizer failed on this row ({type(exc).__name__}: {message})")

    def _finish(self, request: _Request, ids: list[int] | str) -> EncodedRow | str:
        if isinstance(ids, str):
            return ids
        if request.chat and self.append_eos:
            ids = [*ids, self.tokenizer.eos_token_id]
        if not ids:
            return "no tokens"
        if len(ids) > self.max_length:
            return f"{len(ids)} tokens, over --max-length {self.max_length}"
        return EncodedRow(ids, request.id)


def parse_line(line: bytes | None, limit: int, max_length: int) -> dict:
    if line is None:
        raise RowRejected(f"line over {limit} bytes (longer than --max-length {max_length} allows)")
    if not line.strip():
        raise RowRejected("blank line")
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise RowRejected("not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RowRejected(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an integer over Python's digit limit; nesting too deep
        raise RowRejected(f"not valid JSON ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})") from None
    if not isinstance(record, dict):
        raise RowRejected(f"expected a JSON object, got {type(record).__name__}")
    return record


ID_RANGES = {"int": (-(1 << 63), 1 << 63), "uint": (0, 1 << 64)}  # [low, high) the id column's type holds


def check_id(value: Any, kind: str | None) -> int | str | None:
    """The row's id, which must have the type of the input's id column (None when absent). Integer ids must fit
    that column: int64, or uint64 for a uint64 Parquet column; a JSONL id of 2**63 or more is rejected (give
    such ids as strings)."""
    if value is None:
        return None
    if kind is None:
        raise RowRejected("has an 'id' but the first rows of the input have none: give every row an id or none")
    if kind in ID_RANGES:
        if not isinstance(value, int) or isinstance(value, bool):
            raise RowRejected(f"id {value!r} is not an integer like the ids of the first rows")
        low, high = ID_RANGES[kind]
        if not low <= value < high:
            bits = "64-bit signed" if kind == "int" else "64-bit unsigned"
            shown = str(value) if len(str(value)) <= 30 else f"{str(value)[:20]}... ({len(str(value))} digits)"
            raise RowRejected(f"id {shown} does not fit the id column ({bits} integers): give such ids as strings")
    if kind == "str" and not isinstance(value, str):
        raise RowRejected(f"id {value!r} is not a string like the ids of the first rows")
    if kind == "str":
        valid_unicode(value, "id")
    return value


def valid_unicode(text: str, name: str) -> str:
    """TEXT, unless it holds a lone surrogate (JSON allows "\\ud800"; UTF-8, Arrow and tokenizers do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RowRejected(f"{name} is not valid Unicode (it holds a lone surrogate)") from None
    return text


def printable(reason: str) -> str:
    """A reason that can be written as UTF-8 whatever the row held (lone surrogates escaped)."""
    return reason.encode("utf-8", "backslashreplace").decode("utf-8")


def row_text(record: dict, tokenizer: Any) -> tuple[str, bool]:
    """The text to score and whether it came from the chat template."""
    present = [f for f in ("text", "prompt", "response", "messages") if record.get(f) is not None]
    if not present:
        raise RowRejected(f"missing fields: {_FORMS}")
    if "text" in present:
        if len(present) > 1:
            raise RowRejected(f"'text' together with {', '.join(repr(f) for f in present[1:])}: {_FORMS}")
        return _text_field(record["text"]), False
    if "messages" in present:
        if len(present) > 1:
            raise RowRejected(f"'messages' together with 'prompt'/'response': {_FORMS}")
        return _render_chat(tokenizer, _messages(record["messages"])), True
    for name in ("prompt", "response"):
        if name not in present:
            raise RowRejected(f"missing field '{name}' (a row with 'prompt' needs 'response' and back)")
    prompt, response = _text_field(record["prompt"], "prompt"), record["response"]
    if not isinstance(response, str):
        raise RowRejected(f"'response' must be a string, got {type(response).__name__}")
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return _render_chat(tokenizer, chat), True


def _text_field(value: Any, name: str = "text") -> str:
    if not isinstance(value, str):
        raise RowRejected(f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowRejected(f"empty {name}")
    return value


def _messages(messages: Any) -> list[dict]:
    try:
        return checked_messages(messages, roles=None)  # the chat template judges the roles
    except ChatError as exc:
        raise RowRejected(exc.reason) from None


def _render_chat(tokenizer: Any, messages: list[dict]) -> str:
    """The chat with the generation prompt; a final assistant message follows it with its turn left open."""
    last = messages[-1]
    head, response = (messages[:-1], last["content"]) if last["role"] == "assistant" else (messages, "")
    if not head:
        raise RowRejected("'messages' has only an assistant turn: nothing to respond to")
    try:
        return render(tokenizer, head, response)
    except Exception as exc:  # jinja raises its own types, e.g. for an unknown role
        raise RowRejected(f"chat template failed: {' '.join(str(exc).split())}") from None
