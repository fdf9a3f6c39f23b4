"""Prompt groups for evaluation: the built-in set, JSONL readers, chat-template rendering and encoding."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vexport.errors import InputError, VexportError
from vexport.jsonl import parse_json, read_lines

__all__ = [
    "TULU_CHAT_TEMPLATE",
    "ChatError",
    "EncodedSample",
    "PromptGroup",
    "builtin_prompt_groups",
    "checked_messages",
    "encode",
    "encode_groups",
    "long_context_samples",
    "read_prompt_groups",
    "render",
]

logger = logging.getLogger(__name__)

# Tulu 2: "<|user|>\n{content}\n<|assistant|>\n{content}</s>\n" per turn; the markers are plain text.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")
BUILTIN_FILE = "prompt_groups.jsonl"
MAX_CHARS_PER_TOKEN = 64  # a text over 64 x max_length characters is refused before it is tokenized
PAST_THRESHOLD = 32  # tokens a long-context sample runs past each position threshold of the model


@dataclass(frozen=True)
class PromptGroup:
    """A chat before the response (ending in a user turn) and candidate responses to it."""

    messages: tuple[dict, ...]
    responses: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The content of the last user message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass(frozen=True)
class EncodedSample:
    """One rendered (prompt group, response) pair and its token ids."""

    group: int
    response: int
    text: str
    input_ids: tuple[int, ...]


def builtin_prompt_groups() -> list[PromptGroup]:
    """The built-in evaluation set: 18 prompts, each with responses that are good, mediocre, wrong, unhelpful.

    Responses are listed in that order.
    """
    text = resources.files("vexport").joinpath("data", BUILTIN_FILE).read_text(encoding="utf-8")
    return _parse_lines(text.splitlines(), f"vexport/data/{BUILTIN_FILE}")


def read_prompt_groups(path: str | Path) -> list[PromptGroup]:
    """Read JSONL prompt groups: `{"prompt": ..., "responses": [...]}` or `{"messages": [...], "responses": [...]}`."""
    path = Path(path)
    lines = read_lines(path, str(path), missing="no such prompt-group file")  # bounded, split on \n only
    return _parse_lines((line for _, line in lines), str(path))


def _parse_lines(lines: Iterable[str], source: str) -> list[PromptGroup]:
    """Parse JSONL lines (blank lines skipped); errors name `source` and the line number."""
    groups = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        groups.append(_parse_record(parse_json(line, where), where))
    if not groups:
        raise VexportError(f"{source}: no prompt groups (the file is empty)")
    return groups


def _parse_record(record: Any, where: str) -> PromptGroup:
    """Validate one JSON record and build its PromptGroup."""
    if not isinstance(record, dict):
        raise VexportError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise VexportError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if has_prompt:
        if not isinstance(record["prompt"], str):
            raise VexportError(f"{where}: 'prompt' must be a string")
        messages = ({"role": "user", "content": record["prompt"]},)
    else:
        messages = _parse_messages(record["messages"], where)
    return PromptGroup(messages=messages, responses=_parse_responses(record.get("responses"), where))


def _parse_messages(messages: Any, where: str) -> tuple[dict, ...]:
    """Validate a chat: a non-empty list of {role, content} objects that ends with a user turn."""
    parsed = checked_messages(messages, where)
    if parsed[-1]["role"] != "user":
        raise VexportError(f"{where}: the last message must have role 'user', got {parsed[-1]['role']!r}")
    return tuple(parsed)


class ChatError(VexportError):
    """Why a chat ``messages`` field is refused; ``reason`` is the text without the place it was read from."""

    def __init__(self, reason: str, where: str | None = None):
        super().__init__(reason, where)  # both in args, so the error pickles (Ray workers)
        self.reason, self.where = reason, where

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason


def checked_messages(messages: Any, where: str | None = None, roles: tuple[str, ...] | None = ROLES) -> list[dict]:
    """A chat ``messages`` field as a new list of {role, content} dicts (other keys dropped), or ChatError
    (its message prefixed by ``where`` when given): a non-empty list of objects, each with a string
    'content' and a role in ``roles``; with ``roles=None`` any string role, left to the chat template to
    judge. The one validator of the field, for the evaluation set, calibration files and scoring rows; what
    the chat must end with is each caller's rule."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list" + ("" if roles else " of {role, content} objects"), where)
    for index, message in enumerate(messages):
        if roles is None:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ChatError(f"messages[{index}] must be an object with string 'role' and 'content'", where)
            continue
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatError(f"messages[{index}] must be an object with a string 'content'", where)
        if message.get("role") not in roles:
            raise ChatError(f"messages[{index}] has role {message.get('role')!r}, expected one of {roles}", where)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _parse_responses(responses: Any, where: str) -> tuple[str, ...]:
    """Validate a non-empty list of response strings."""
    if responses is None:
        raise VexportError(f"{where}: missing 'responses'")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise VexportError(f"{where}: 'responses' must be a list of strings")
    if not responses:
        raise VexportError(f"{where}: 'responses' is empty")
    return tuple(responses)


@functools.cache
def _warn_no_chat_template(name: str) -> None:
    """Log, once per tokenizer name, that the Tulu format stands in for a missing chat template."""
    logger.warning("tokenizer %r has no chat template; rendering prompts in the Tulu 2 format", name)


def render(tokenizer: Any, messages: Sequence[dict], response: str) -> str:
    """The chat with the generation prompt, then `response`; the assistant turn is left open (no eos)."""
    template = None
    if not getattr(tokenizer, "chat_template", None):
        _warn_no_chat_template(str(getattr(tokenizer, "name_or_path", "")))
        template = TULU_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    return prompt + response


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids as `tokenizer(text)` gives them, without a second bos when `text` already starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special_tokens = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_groups(
    tokenizer: Any, groups: Sequence[PromptGroup], max_length: int | None = None
) -> list[EncodedSample]:
    """Render and encode every (group, response); a sample over `max_length` tokens is an error, never cut."""
    samples = []
    for g, group in enumerate(groups):
        for r, response in enumerate(group.responses):
            text = render(tokenizer, group.messages, response)
            if max_length is not None and len(text) > MAX_CHARS_PER_TOKEN * max_length:  # bound before tokenizing
                raise InputError(f"prompt group {g} response {r} is {len(text)} characters, more than "
                                 f"max_length={max_length} tokens can hold ({MAX_CHARS_PER_TOKEN} per token)")
            ids = encode(tokenizer, text)
            if max_length is not None and len(ids) > max_length:
                raise InputError(
                    f"prompt group {g} response {r} is {len(ids)} tokens, over max_length={max_length}"
                )
            samples.append(EncodedSample(group=g, response=r, text=text, input_ids=tuple(ids)))
    return samples


def long_context_samples(samples: Sequence[EncodedSample], config: Any) -> list[EncodedSample]:
    """Samples long enough to cross every position threshold of CONFIG (a sliding window, the pretraining length
    of a scaled rope; vexport.model.position_thresholds), each in a group of its own: PAST_THRESHOLD tokens past
    it, at most max_position_embeddings. The built-in set alone is shorter than such thresholds, so an export
    wrong only past them would pass. Each is the SAMPLES' token ids (and texts) concatenated until long enough."""
    from vexport.model import position_thresholds

    if not samples:
        return []
    limit = getattr(config, "max_position_embeddings", None)
    groups = max(s.group for s in samples) + 1
    out = []
    for k, threshold in enumerate(position_thresholds(config)):
        length = threshold + PAST_THRESHOLD if limit is None else min(threshold + PAST_THRESHOLD, limit)
        ids: list[int] = []
        texts: list[str] = []
        while len(ids) < length:
            sample = samples[len(texts) % len(samples)]
            ids.extend(sample.input_ids)
            texts.append(sample.text)
        out.append(EncodedSample(group=groups + k, response=0, text="".join(texts), input_ids=tuple(ids[:length])))
        logger.info("evaluation: a sample of %d tokens crosses the model's position threshold %d", length, threshold)
    return out
