"""vexport/evalset.py: the built-in prompt groups, the JSONL reader, rendering and encoding."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoTokenizer

from vexport.errors import InputError, VexportError
from vexport.evalset import (
    TULU_CHAT_TEMPLATE,
    EncodedSample,
    PromptGroup,
    builtin_prompt_groups,
    encode,
    encode_groups,
    read_prompt_groups,
    render,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write(tmp_path, lines: list[str], name: str = "groups.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_builtin_set_is_varied_and_short(tokenizer):
    groups = builtin_prompt_groups()
    assert len(groups) >= 16
    assert len({g.prompt for g in groups}) == len(groups)
    for group in groups:
        assert len(group.responses) == 4 and len(set(group.responses)) == 4
        assert group.messages[-1]["role"] == "user"
        for response in group.responses:
            assert len(render(tokenizer, group.messages, response).split()) < 120
    assert any(m["role"] == "system" for g in groups for m in g.messages)
    assert any("```" in r for g in groups for r in g.responses)  # coding


def test_prompt_is_last_user_message():
    group = PromptGroup(
        messages=(
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"},
        ),
        responses=("a",),
    )
    assert group.prompt == "second"


def test_reads_both_jsonl_forms(tmp_path):
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    path = _write(
        tmp_path,
        [
            json.dumps({"prompt": "What is 2+2?", "responses": ["4", "5"]}),
            "",
            json.dumps({"messages": chat, "responses": ["Hello!"], "id": "extra keys are ignored"}),
        ],
    )
    first, second = read_prompt_groups(path)
    assert first == PromptGroup(messages=({"role": "user", "content": "What is 2+2?"},), responses=("4", "5"))
    assert second.messages == tuple(chat) and second.prompt == "Hi?" and second.responses == ("Hello!",)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"groups\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"groups\.jsonl:2: expected a JSON object"),
        ('{"responses": ["a"]}', r"groups\.jsonl:2: give exactly one of 'prompt' or 'messages'"),
        ('{"prompt": "p", "messages": [], "responses": ["a"]}', r":2: give exactly one"),
        ('{"prompt": "p"}', r"groups\.jsonl:2: missing 'responses'"),
        ('{"prompt": "p", "responses": []}', r"groups\.jsonl:2: 'responses' is empty"),
        ('{"prompt": "p", "responses": "a"}', r":2: 'responses' must be a list of strings"),
        ('{"prompt": "p", "responses": ["a", 3]}', r":2: 'responses' must be a list of strings"),
        ('{"prompt": 7, "responses": ["a"]}', r":2: 'prompt' must be a string"),
        ('{"messages": [], "responses": ["a"]}', r":2: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}], "responses": ["a"]}', r":2: messages\[0\] must be an object"),
        ('{"messages": [{"role": "bot", "content": "x"}], "responses": ["a"]}', r":2: messages\[0\] has role 'bot'"),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],'
            ' "responses": ["a"]}',
            r":2: the last message must have role 'user'",
        ),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"prompt": "fine", "responses": ["ok"]}), line])
    with pytest.raises(VexportError, match=message):
        read_prompt_groups(path)


def test_empty_and_missing_files(tmp_path):
    empty = _write(tmp_path, ["", "   "], name="empty.jsonl")
    with pytest.raises(VexportError, match=r"empty\.jsonl: no prompt groups"):
        read_prompt_groups(empty)
    with pytest.raises(VexportError, match=r"nope\.jsonl: no such prompt-group file"):
        read_prompt_groups(tmp_path / "nope.jsonl")


def test_render_uses_the_chat_template(tokenizer):
    messages = ({"role": "user", "content": "Hi"},)
    assert render(tokenizer, messages, "Hello") == "<|user|>\nHi\n<|assistant|>\nHello"


def test_render_falls_back_to_tulu_and_warns_once(tiny_model_dir, caplog):
    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    bare.name_or_path = "bare-tokenizer-for-this-test"
    messages = ({"role": "user", "content": "Hi"},)
    with caplog.at_level(logging.WARNING, logger="vexport.evalset"):
        assert render(bare, messages, "Yes") == "<|user|>\nHi\n<|assistant|>\nYes"
        assert render(bare, messages, "No") == "<|user|>\nHi\n<|assistant|>\nNo"
    warnings = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1


def test_encode_adds_bos_exactly_once(tokenizer):
    plain = encode(tokenizer, "Hello world")
    assert plain == tokenizer("Hello world")["input_ids"]
    assert plain[0] == tokenizer.bos_token_id
    assert encode(tokenizer, "<s>Hello world") == plain


def test_encode_with_a_template_that_writes_bos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{{ bos_token }}" + TULU_CHAT_TEMPLATE
    ids = encode(tok, render(tok, ({"role": "user", "content": "Hi"},), "Yo"))
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_encode_groups_indexes_every_response(tokenizer):
    groups = builtin_prompt_groups()[:3]
    samples = encode_groups(tokenizer, groups)
    assert [(s.group, s.response) for s in samples] == [(g, r) for g in range(3) for r in range(4)]
    first = samples[0]
    assert isinstance(first, EncodedSample) and isinstance(first.input_ids, tuple)
    assert first.text == render(tokenizer, groups[0].messages, groups[0].responses[0])
    assert list(first.input_ids) == encode(tokenizer, first.text)
    assert tokenizer.decode(first.input_ids, skip_special_tokens=True) == first.text


def test_encode_groups_rejects_long_samples_instead_of_cutting(tokenizer):
    groups = [PromptGroup(messages=({"role": "user", "content": "Hi"},), responses=("short", "word " * 50))]
    assert len(encode_groups(tokenizer, groups, max_length=200)) == 2
    with pytest.raises(InputError, match=r"prompt group 0 response 1 is \d+ tokens, over max_length=30"):
        encode_groups(tokenizer, groups, max_length=30)
