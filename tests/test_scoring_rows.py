"""vexport/scoring/rows.py: what a row is scored as, and why a row is rejected."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.scoring_helpers import reference_ids
from vexport.errors import VexportError
from vexport.scoring.rows import EncodedRow, RowEncoder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _encode(tokenizer, record, **kwargs):
    line = record if isinstance(record, (bytes, type(None))) else json.dumps(record).encode()
    [out] = RowEncoder(tokenizer, **{"max_length": 512, **kwargs}).encode([line])
    return out


def test_text_is_tokenized_exactly_as_the_tokenizer_does(tokenizer):
    text = "<s> The cat sat on the mat."  # even a leading bos: tokenizer(text) as is
    out = _encode(tokenizer, {"text": text})
    assert out.ids == tokenizer(text)["input_ids"] and out.ids[:2] == [tokenizer.bos_token_id] * 2


def test_prompt_and_response_render_a_user_turn_and_an_open_assistant_turn(tokenizer):
    out = _encode(tokenizer, {"prompt": "What is 12 times 7?", "response": "84"})
    expected = tokenizer("<|user|>\nWhat is 12 times 7?\n<|assistant|>\n84")["input_ids"]
    assert out.ids == expected and tokenizer.eos_token_id not in out.ids
    eos = _encode(tokenizer, {"prompt": "What is 12 times 7?", "response": "84"}, append_eos=True)
    assert eos.ids == expected + [tokenizer.eos_token_id]
    assert _encode(tokenizer, {"text": "84"}, append_eos=True).ids == tokenizer("84")["input_ids"]  # text: as is


def test_a_chat_ending_with_the_assistant_scores_like_prompt_and_response(tokenizer):
    pair = {"prompt": "Hi there", "response": "Hello!"}
    chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    assert _encode(tokenizer, chat).ids == _encode(tokenizer, pair).ids == reference_ids(tokenizer, pair)
    open_turn = _encode(tokenizer, {"messages": [{"role": "user", "content": "Hi there"}]})
    assert open_turn.ids == tokenizer("<|user|>\nHi there\n<|assistant|>\n")["input_ids"]


def test_ids_are_carried_through(tokenizer):
    assert _encode(tokenizer, {"text": "a", "id": "x7"}, id_kind="str").id == "x7"
    assert _encode(tokenizer, {"text": "a", "id": 7}, id_kind="int").id == 7
    assert _encode(tokenizer, {"text": "a"}, id_kind="int").id is None


@pytest.mark.parametrize("record, reason", [
    (None, "line over"),
    (b"   \n", "blank line"),
    (b"{not json\n", "not valid JSON"),
    (b'{"text": "\xff"}\n', "not valid UTF-8"),
    ([1, 2], "expected a JSON object, got list"),
    ({"id": 1}, "missing fields"),
    ({"text": None}, "missing fields"),
    ({"text": ""}, "empty text"),
    ({"text": " \n "}, "empty text"),
    ({"text": 3}, "'text' must be a string, got int"),
    ({"text": "a", "prompt": "b"}, "'text' together with 'prompt'"),
    ({"prompt": "a"}, "missing field 'response'"),
    ({"response": "a"}, "missing field 'prompt'"),
    ({"prompt": "", "response": "a"}, "empty prompt"),
    ({"prompt": "a", "response": 5}, "'response' must be a string"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "only an assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "chat template failed: unknown role: robot"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "b"}, "'messages' together with"),
    (b'{"text": "a\\ud800b"}', "text is not valid Unicode"),
    (b'{"prompt": "\\udfff", "response": "b"}', "the chat is not valid Unicode"),
    (b'{"messages": [{"role": "\\ud800", "content": "b"}]}', "chat template failed: unknown role: \\ud800"),
    (b"[" * 100_000, "not valid JSON (RecursionError"),
    (b'{"a":' * 50_000, "not valid JSON (RecursionError"),
    (b"1" * 5000, "not valid JSON (ValueError"),
    (b'{"text": 1' + b"0" * 5000 + b"}", "not valid JSON (ValueError"),
])
def test_bad_rows_are_rejected_with_a_reason(tokenizer, record, reason):
    out = _encode(tokenizer, record)
    assert isinstance(out, str) and reason in out, out


@pytest.mark.parametrize("record, kind, reason", [
    ({"text": "a", "id": 3}, None, "first rows of the input have none"),
    ({"text": "a", "id": "x"}, "int", "is not an integer"),
    ({"text": "a", "id": True}, "int", "is not an integer"),
    ({"text": "a", "id": 3}, "str", "is not a string"),
    (b'{"text": "a", "id": "\\ud800"}', "str", "id is not valid Unicode"),
])
def test_an_id_of_the_wrong_type_is_rejected(tokenizer, record, kind, reason):
    out = _encode(tokenizer, record, id_kind=kind)
    assert isinstance(out, str) and reason in out, out


def test_long_rows_are_rejected_never_truncated(tokenizer):
    text = "The cat sat on the mat. " * 10
    n = len(tokenizer(text)["input_ids"])
    assert _encode(tokenizer, {"text": text}, max_length=n).ids == tokenizer(text)["input_ids"]
    assert _encode(tokenizer, {"text": text}, max_length=n - 1) == f"{n} tokens, over --max-length {n - 1}"
    capped = _encode(tokenizer, {"text": "x" * (64 * 4 + 1)}, max_length=4)  # rejected before tokenizing
    assert "257 characters, over the 256-character cap" in capped


def test_a_window_keeps_row_order_with_rejections_in_place(tokenizer):
    lines = [json.dumps(r).encode() for r in ({"text": "a b"}, {"nope": 1}, {"prompt": "q", "response": "r"})]
    out = RowEncoder(tokenizer, 512).encode(lines)
    assert isinstance(out[0], EncodedRow) and isinstance(out[1], str) and isinstance(out[2], EncodedRow)
    assert out[2].ids == reference_ids(tokenizer, {"prompt": "q", "response": "r"})


def test_append_eos_needs_an_eos_token(tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(VexportError, match="--append-eos"):
        RowEncoder(NoEos(), 16, append_eos=True)
