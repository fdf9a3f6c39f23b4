"""Request content to token ids, checked, with every refusal naming its field (``texts[2]``, ``input_ids[0][5]``).

Texts are tokenized exactly as ``vexport score`` tokenizes a ``text`` row (``tokenizer(text)``); chats are
rendered with the model's chat template and encoded without a second bos, as its ``messages`` rows are;
response texts of a group continue their prompt (no special tokens). Nothing is ever truncated: a sequence
over ``max_length`` tokens, an empty one, or a token id outside the vocabulary is a 400. Tokenizer calls run
one at a time (a fast tokenizer is not safe to call from several threads at once).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from vexport.evalset import encode, render
from vexport.serve.schemas import Message, RequestError

CHARS_PER_TOKEN_CAP = 64  # a text over 64 x max_length characters is refused before it is tokenized


class Encoder:
    """Token ids for texts, chats and id lists, within the vocabulary and ``max_length``."""

    def __init__(self, tokenizer, vocab_size: int, max_length: int):
        self.tokenizer, self.vocab_size, self.max_length = tokenizer, vocab_size, max_length
        self._lock = threading.Lock()

    def texts(self, field: str, texts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        for i, text in enumerate(texts):
            self._check_text(f"{field}[{i}]", text, allow_empty=not special_tokens)
        with self._lock:
            try:
                encoded = self.tokenizer(list(texts), add_special_tokens=special_tokens, verbose=False)["input_ids"]
            except Exception:  # one text the tokenizer cannot take fails the call: find it
                encoded = [self._one(f"{field}[{i}]", t, special_tokens) for i, t in enumerate(texts)]
        return [self._check_length(f"{field}[{i}]", list(ids)) for i, ids in enumerate(encoded)]

    def chats(self, field: str, chats: Sequence[Sequence[Message]]) -> list[list[int]]:
        return [self.chat(f"{field}[{i}]", chat) for i, chat in enumerate(chats)]

    def chat(self, field: str, messages: Sequence[Message]) -> list[int]:
        """The chat with the generation prompt; a final assistant turn follows it, left open."""
        if not messages:
            raise RequestError(400, field, f"{field} is empty: give at least one message")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        head, response = (turns[:-1], turns[-1]["content"]) if turns[-1]["role"] == "assistant" else (turns, "")
        if not head:
            raise RequestError(400, field, f"{field} has only an assistant turn: nothing to respond to")
        for i, turn in enumerate(turns):
            self._check_text(f"{field}[{i}].role", turn["role"])
            self._check_text(f"{field}[{i}].content", turn["content"], allow_empty=True)
        with self._lock:
            try:
                ids = encode(self.tokenizer, render(self.tokenizer, head, response))
            except Exception as exc:  # jinja and tokenizers raise their own types
                raise RequestError(400, field, f"{field}: the chat template failed ({_line(exc)})") from None
        return self._check_length(field, ids)

    def ids(self, field: str, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        return [self.one_ids(f"{field}[{i}]", row) for i, row in enumerate(rows)]

    def one_ids(self, field: str, row: Sequence[int]) -> list[int]:
        for j, token in enumerate(row):
            if not 0 <= token < self.vocab_size:
                raise RequestError(400, f"{field}[{j}]", f"{field}[{j}] is token id {token}, outside the "
                                                         f"vocabulary [0, {self.vocab_size})")
        return self._check_length(field, list(row))

    def check_total(self, field: str, tokens: int) -> None:
        if tokens > self.max_length:
            raise RequestError(400, field, f"{field}: {tokens} tokens in all, over --max-length {self.max_length}")

    def _check_text(self, field: str, text: str, allow_empty: bool = False) -> None:
        if not allow_empty and not text.strip():
            raise RequestError(400, field, f"{field} is empty")
        cap = CHARS_PER_TOKEN_CAP * self.max_length
        if len(text) > cap:
            raise RequestError(400, field, f"{field} is {len(text)} characters, over the {cap}-character cap for "
                                           f"--max-length {self.max_length}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, field, f"{field} is not valid Unicode (it holds a lone surrogate)") from None

    def _one(self, field: str, text: str, special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"]
        except Exception as exc:
            raise RequestError(400, field, f"{field}: the tokenizer failed ({_line(exc)})") from None

    def _check_length(self, field: str, ids: list[int]) -> list[int]:
        if not ids:
            raise RequestError(400, field, f"{field} has no tokens")
        if len(ids) > self.max_length:
            raise RequestError(400, field, f"{field} is {len(ids)} tokens, over --max-length {self.max_length}")
        return ids


def _line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
