"""Calibration text for quantization: chat-rendered conversations cut into fixed-length token windows.

A value model scores chat-rendered text, so GPTQ is calibrated on chat-rendered text too. The built-in
corpus is offline and deterministic for a given Python version, and held apart from the evaluation set
(`vexport.evalset`):

- a few dozen hand-written conversations (`vexport/data/calibration_chats.jsonl`),
- the Python language reference topics shipped in the standard library (`pydoc_data.topics`), each topic
  a chat that explains it,
- docstrings of well-known standard library modules, read from their source with `ast` (nothing is
  imported or run), each module a few chats about its functions and classes.

A user file (`--calibration FILE.jsonl`) replaces the built-in corpus. Each line is one of
`{"text": ...}` (used as is), `{"prompt": ..., "response": ...}` or `{"messages": [...]}` (a whole chat;
its last assistant turn is the response).
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import itertools
import json
import logging
import random
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from vexport.errors import InputError, VexportError
from vexport.evalset import checked_messages, render
from vexport.jsonl import parse_json, read_lines

__all__ = [
    "BUILTIN_FILE",
    "CalibrationText",
    "Conversation",
    "calibration_digest",
    "calibration_samples",
    "calibration_texts",
    "read_calibration_file",
    "render_calibration",
]

logger = logging.getLogger(__name__)

BUILTIN_FILE = "calibration_chats.jsonl"
MIN_SEQ_LEN = 8
CHUNK_CHARS = 2000  # an assistant answer longer than this is split at paragraph boundaries
CHAT_CHARS = 4000  # turns are packed into one multi-turn chat up to about this many characters
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") add little

# Standard library modules whose docstrings become chats: (name shown in the prompt, module whose source is read).
DOCSTRING_MODULES: tuple[tuple[str, str], ...] = tuple((name, name) for name in (
    "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "code",
    "codecs", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "doctest", "email.message", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "json", "locale", "logging", "mailbox", "mimetypes", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "platform", "pprint", "pydoc", "queue", "random", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "turtle", "typing",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "zipfile",
)) + (("asyncio", "asyncio.events"), ("asyncio", "asyncio.tasks"), ("concurrent.futures", "concurrent.futures._base"),
      ("decimal", "_pydecimal"), ("io", "_pyio"), ("unittest", "unittest.case"))

TOPIC_PROMPTS = ("Explain {} in Python.", "How does {} work in Python?", "Can you describe {} in Python?",
                 "What should I know about {} in Python?")
FUNCTION_PROMPTS = ("What does `{}` do?", "How do I use `{}`?", "Explain `{}` from the Python standard library.",
                    "What is `{}` for?")
SYSTEM_PROMPTS = (None, "You are a helpful assistant.", None, "You are an expert Python programmer. Answer clearly.")


@dataclass(frozen=True)
class Conversation:
    """A chat before the response (ending in a user turn) and the assistant's response to it.

    It renders as the value model scores text: `evalset.render(tokenizer, messages, response)`.
    """

    messages: tuple[dict, ...]
    response: str


# One calibration item: a conversation, or plain text used as is.
CalibrationText = Conversation | str


def calibration_texts(path: str | Path | None = None) -> list[CalibrationText]:
    """The built-in calibration corpus, or the items of the user's JSONL file at `path` (`--calibration`)."""
    if path is None:
        return list(_builtin_corpus())
    return read_calibration_file(path)


def read_calibration_file(path: str | Path) -> list[CalibrationText]:
    """Read a calibration JSONL file; errors name `--calibration`, the file and the line."""
    path = Path(path)
    source = f"--calibration {path}"
    items = _parse_lines((line for _, line in read_lines(path, source)), source)  # bounded lines
    if not items:
        raise VexportError(f"{source}: no calibration text (the file is empty)")
    return items


def render_calibration(tokenizer: Any, item: CalibrationText) -> str:
    """The text of one calibration item: a conversation through the model's chat template, plain text as is."""
    if isinstance(item, str):
        return item
    return render(tokenizer, item.messages, item.response)


def calibration_digest(items: Iterable[CalibrationText]) -> str:
    """A SHA-256 of the calibration items, to record which text a quantized model was calibrated on."""
    digest = hashlib.sha256()
    for item in items:
        record = item if isinstance(item, str) else {"messages": list(item.messages), "response": item.response}
        digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    return "sha256:" + digest.hexdigest()


def calibration_samples(
    tokenizer: Any,
    *,
    path: str | Path | None = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    max_length: int | None = None,
) -> torch.Tensor:
    """`samples` windows of exactly `seq_len` token ids, int64 [samples, seq_len], deterministic by `seed`.

    Every item is rendered with the model's chat template and encoded as `tokenizer(text)` encodes it (one
    bos); the items are shuffled with `random.Random(seed)`, their token streams concatenated and cut into
    windows (a window may start mid-conversation). Too little text is cycled again in a fresh order, with a
    warning that windows repeat text. `max_length` (the model's max_position_embeddings) bounds `seq_len`.
    """
    _check_sizes(samples, seq_len, max_length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"the calibration seed must be a whole number, got {seed!r}")  # None would be random
    items = calibration_texts(path)
    needed = samples * seq_len
    ids = list(itertools.islice(_token_stream(tokenizer, items, seed, needed), needed))
    logger.info("calibration: %d windows of %d tokens from %d %s items (seed %d)",
                samples, seq_len, len(items), "built-in" if path is None else str(path), seed)
    return torch.tensor(ids, dtype=torch.long).view(samples, seq_len)


def _check_sizes(samples: int, seq_len: int, max_length: int | None) -> None:
    """Reject window counts and lengths that cannot work, naming the flag."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"--samples must be a whole number >= 1, got {samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise InputError(f"--seq-len must be a whole number >= {MIN_SEQ_LEN}, got {seq_len!r}")
    if max_length is not None and seq_len > max_length:
        raise InputError(
            f"--seq-len {seq_len} is longer than the model's maximum length "
            f"(max_position_embeddings = {max_length})"
        )


def _token_stream(tokenizer: Any, items: Sequence[CalibrationText], seed: int, needed: int) -> Iterator[int]:
    """Token ids of the items in a seeded random order, reshuffled after each pass; encoded lazily, once."""
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}
    for passes in itertools.count(1):
        order = list(range(len(items)))
        rng.shuffle(order)
        for index in order:
            if index not in encoded:
                encoded[index] = _encode(tokenizer, _render_item(tokenizer, items, index))
            yield from encoded[index]
        total = sum(len(ids) for ids in encoded.values())
        if total == 0:
            raise VexportError("the calibration text encodes to no tokens")
        if passes == 1:
            logger.warning("the calibration text has only %d tokens, fewer than --samples x --seq-len = %d: "
                           "windows repeat text (add text with --calibration, or lower --samples)", total, needed)


def _render_item(tokenizer: Any, items: Sequence[CalibrationText], index: int) -> str:
    """`render_calibration`, with a chat template that refuses the conversation reported as bad input."""
    try:
        return render_calibration(tokenizer, items[index])
    except TemplateError as exc:
        raise VexportError(
            f"the model's chat template cannot render calibration conversation {index} ({exc}); "
            "give text it accepts with --calibration FILE.jsonl"
        ) from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """`evalset.encode` (one bos), without the too-long warning: calibration text is cut into windows."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special_tokens = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


# ---------------------------------------------------------------------------------------------- JSONL items


def _parse_lines(lines: Iterable[str], source: str) -> list[CalibrationText]:
    """Parse JSONL lines (blank lines skipped); errors name `source` and the line number."""
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        items.append(_parse_record(parse_json(line, where), where))
    return items


def _parse_record(record: Any, where: str) -> CalibrationText:
    """One record: `{"text"}`, `{"prompt", "response"}` or `{"messages"}`; other keys are ignored."""
    if not isinstance(record, dict):
        raise VexportError(f"{where}: expected a JSON object, got {type(record).__name__}")
    forms = [key for key in ("text", "prompt", "messages") if key in record]
    if len(forms) != 1:
        raise VexportError(f"{where}: give exactly one of 'text', 'prompt' (with 'response') or 'messages'")
    if forms[0] == "text":
        return _non_empty_string(record, "text", where)
    if forms[0] == "prompt":
        prompt = _non_empty_string(record, "prompt", where)
        if not isinstance(record.get("response"), str):
            raise VexportError(f"{where}: 'prompt' needs a string 'response'")
        return Conversation(messages=({"role": "user", "content": prompt},), response=record["response"])
    return _parse_chat(record["messages"], where)


def _non_empty_string(record: dict, key: str, where: str) -> str:
    """`record[key]`, which must be a string with some non-space text."""
    value = record[key]
    if not isinstance(value, str):
        raise VexportError(f"{where}: '{key}' must be a string")
    if not value.strip():
        raise VexportError(f"{where}: '{key}' is empty")
    return value


def _parse_chat(messages: Any, where: str) -> Conversation:
    """A whole chat; a final assistant turn becomes the response (else the response is empty)."""
    parsed = checked_messages(messages, where)
    response = parsed.pop()["content"] if parsed[-1]["role"] == "assistant" else ""
    if not parsed or parsed[-1]["role"] != "user":
        raise VexportError(f"{where}: 'messages' must end with a user turn, or a user turn then an assistant turn")
    return Conversation(messages=tuple(parsed), response=response)


# ------------------------------------------------------------------------------------------ built-in corpus


@functools.cache
def _builtin_corpus() -> tuple[CalibrationText, ...]:
    """Hand-written chats, then the language reference topics, then standard library docstrings."""
    text = resources.files("vexport").joinpath("data", BUILTIN_FILE).read_text(encoding="utf-8")
    handwritten = _parse_lines(text.split("\n"), f"vexport/data/{BUILTIN_FILE}")
    corpus = (*handwritten, *_topic_conversations(), *_docstring_conversations())
    logger.debug("built-in calibration corpus: %d conversations (%d hand-written)", len(corpus), len(handwritten))
    return corpus


def _topic_conversations() -> list[Conversation]:
    """Each language reference topic of `pydoc_data.topics` (a data module) as chats that explain it."""
    from pydoc_data.topics import topics

    conversations = []
    for index, key in enumerate(sorted(topics)):
        title, body = _title_and_body(topics[key], default=key)
        chunks = _chunks(body, CHUNK_CHARS)
        turns = [(TOPIC_PROMPTS[index % len(TOPIC_PROMPTS)].format(title), chunks[0])]
        turns += [(f"Continue explaining {title}.", chunk) for chunk in chunks[1:]]
        conversations += _pack_turns(turns, SYSTEM_PROMPTS[index % len(SYSTEM_PROMPTS)])
    return conversations


def _title_and_body(text: str, default: str) -> tuple[str, str]:
    """Split a reST section into its title (underlined by the next line) and the rest."""
    lines = text.strip("\n").split("\n")
    if len(lines) > 2 and lines[1] and set(lines[1]) <= set("*=-~^"):
        title = lines[0].strip()
        title = "the" + title[3:] if title.startswith("The ") else title
        return title, "\n".join(lines[2:]).strip("\n")
    return f"'{default}'", text.strip("\n")


def _chunks(text: str, limit: int) -> list[str]:
    """Split `text` at paragraph (else line) boundaries into pieces of about `limit` characters at most."""
    pieces = []  # (separator before it, piece): a paragraph too long on its own is split into its lines
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n") if len(paragraph) > limit else [paragraph]
        pieces += [("\n\n" if i == 0 else "\n", line) for i, line in enumerate(lines)]
    chunks, current = [], ""
    for separator, piece in pieces:
        if current and len(current) + len(separator) + len(piece) > limit:
            chunks.append(current)
            current = ""
        current = f"{current}{separator}{piece}" if current else piece
    return [*chunks, current] if current else chunks or [text]


def _pack_turns(turns: Sequence[tuple[str, str]], system: str | None) -> list[Conversation]:
    """(question, answer) turns packed in order into multi-turn chats of about `CHAT_CHARS` characters."""
    head = ({"role": "system", "content": system},) if system else ()
    conversations, messages, size = [], [], 0
    for question, answer in turns:
        if messages and size + len(question) + len(answer) > CHAT_CHARS:
            conversations.append(Conversation(messages=head + tuple(messages[:-1]), response=messages[-1]["content"]))
            messages, size = [], 0
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        size += len(question) + len(answer)
    if messages:
        conversations.append(Conversation(messages=head + tuple(messages[:-1]), response=messages[-1]["content"]))
    return conversations


def _docstring_conversations() -> list[Conversation]:
    """Chats about the standard library modules in `DOCSTRING_MODULES`, from their docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    conversations = []
    for index, (name, module) in enumerate(DOCSTRING_MODULES):
        tree = _parse_module(stdlib, module)
        if tree is not None:
            conversations += _pack_turns(_module_turns(name, tree), SYSTEM_PROMPTS[index % len(SYSTEM_PROMPTS)])
    return conversations


def _parse_module(stdlib: Path, module: str) -> ast.Module | None:
    """The syntax tree of a standard library module's source, or None when it is missing or unreadable."""
    relative = Path(*module.split("."))
    for path in (stdlib / relative.with_suffix(".py"), stdlib / relative / "__init__.py"):
        if path.is_file():
            try:
                return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
                logger.debug("calibration: skipping %s (%s)", path, exc)
                return None
    logger.debug("calibration: no source for the standard library module %s", module)
    return None


def _module_turns(name: str, tree: ast.Module) -> list[tuple[str, str]]:
    """(question, answer) turns: the module docstring, then each public function, class and method."""
    turns = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) >= MIN_DOC_CHARS:
        turns.append((f"What is the Python `{name}` module for?", doc))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            turns += _class_turns(name, node)
        elif _is_public_function(node):
            turns += _function_turns(f"{name}.{node.name}", node, len(turns))
    return turns


def _class_turns(module: str, node: ast.ClassDef) -> list[tuple[str, str]]:
    """A turn for the class, then one for each public method with a docstring."""
    qualified = f"{module}.{node.name}"
    turns = []
    doc = ast.get_docstring(node)
    if doc and len(doc) >= MIN_DOC_CHARS:
        bases = ", ".join(ast.unparse(base) for base in node.bases)
        turns.append((f"What is the `{qualified}` class?", f"`class {node.name}({bases})`\n\n{doc}"))
    for child in node.body:
        if _is_public_function(child):
            turns += _function_turns(f"{qualified}.{child.name}", child, len(turns), method=True)
    return turns


def _function_turns(qualified: str, node: ast.AST, index: int, method: bool = False) -> list[tuple[str, str]]:
    """One turn for a function with a long enough docstring: its signature, then the docstring."""
    doc = ast.get_docstring(node)
    if not doc or len(doc) < MIN_DOC_CHARS:
        return []
    arguments = node.args
    if method and arguments.args and arguments.args[0].arg in ("self", "cls"):
        arguments = copy.copy(arguments)  # shallow: the tree itself is left as it is
        arguments.args = arguments.args[1:]
    question = FUNCTION_PROMPTS[index % len(FUNCTION_PROMPTS)].format(qualified)
    return [(question, f"`{node.name}({ast.unparse(arguments)})`\n\n{doc}")]


def _is_public_function(node: ast.AST) -> bool:
    """A function or async function whose name does not start with an underscore."""
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_")
