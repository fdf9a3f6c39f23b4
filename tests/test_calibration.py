"""vexport/calibration.py: the built-in corpus, user JSONL files and the token windows GPTQ calibrates on."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from vexport.calibration import (
    BUILTIN_FILE,
    DOCSTRING_MODULES,
    Conversation,
    calibration_digest,
    calibration_samples,
    calibration_texts,
    render_calibration,
)
from vexport.errors import InputError, VexportError
from vexport.evalset import builtin_prompt_groups, encode

DEFAULT_TOKENS = 128 * 512  # the export defaults: --samples 128 --seq-len 512


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def builtin_rendered(tokenizer):
    return [render_calibration(tokenizer, item) for item in calibration_texts()]


def _write(tmp_path, records: list, name: str = "calib.jsonl"):
    """A JSONL file: dicts and lists are dumped as JSON, strings written as they are."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _contents(item) -> list[str]:
    return [item] if isinstance(item, str) else [m["content"] for m in item.messages] + [item.response]


def _word_runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_windows_have_the_shape_dtype_and_vocabulary(tokenizer):
    windows = calibration_samples(tokenizer, samples=6, seq_len=40)
    assert windows.shape == (6, 40) and windows.dtype == torch.long
    assert int(windows.min()) >= 0 and int(windows.max()) < len(tokenizer)
    assert len(set(windows.flatten().tolist())) > 50  # real text, not a constant fill


def test_windows_are_deterministic_by_seed(tokenizer):
    first = calibration_samples(tokenizer, samples=4, seq_len=64, seed=3)
    again = calibration_samples(tokenizer, samples=4, seq_len=64, seed=3)
    other = calibration_samples(tokenizer, samples=4, seq_len=64, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_default_windows_come_from_distinct_text(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="vexport.calibration"):
        windows = calibration_samples(tokenizer, max_length=512)
    assert windows.shape == (128, 512)
    assert "repeat" not in caplog.text
    assert len({tuple(row) for row in windows.tolist()}) == 128


def test_builtin_corpus_is_large_enough(tokenizer, builtin_rendered):
    tokens = sum(len(encode(tokenizer, text)) for text in builtin_rendered)
    print(f"built-in calibration corpus: {len(builtin_rendered)} conversations, "
          f"{sum(map(len, builtin_rendered))} characters, {tokens} tokens (tiny tokenizer, {len(tokenizer)} ids)")
    assert len(builtin_rendered) >= 300
    assert tokens >= 2 * DEFAULT_TOKENS


def test_builtin_corpus_has_all_three_sources():
    items = calibration_texts()
    assert all(isinstance(item, Conversation) for item in items)
    handwritten = calibration_texts(_builtin_path())
    assert items[:len(handwritten)] == handwritten and len(handwritten) >= 40
    prompts = [m["content"] for item in items for m in item.messages if m["role"] == "user"]
    assert sum(p.endswith("in Python.") or p.endswith("in Python?") for p in prompts) >= 50  # language topics
    assert sum("`" in p for p in prompts) >= 500  # standard library functions and classes
    assert len(set(prompts)) > 0.9 * len(prompts)


def test_builtin_corpus_imports_no_module_it_describes():
    # In a fresh interpreter, so that no other test's imports count: docstrings are read with `ast`.
    code = ("import sys; from vexport.calibration import calibration_texts; before = set(sys.modules); "
            "calibration_texts(); print(' '.join(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    described = {name for name, _ in DOCSTRING_MODULES} | {module for _, module in DOCSTRING_MODULES}
    new_modules = set(result.stdout.split())
    assert "pydoc_data.topics" in new_modules  # the one data module the corpus imports
    assert not new_modules & described


def test_builtin_corpus_is_disjoint_from_the_evaluation_set(builtin_rendered):
    calibration = "\n".join(builtin_rendered)
    calibration_runs = _word_runs(calibration)
    for group in builtin_prompt_groups():
        for text in [m["content"] for m in group.messages] + list(group.responses):
            assert text not in calibration, text
            assert not _word_runs(text) & calibration_runs, text


def test_builtin_text_is_chat_rendered(builtin_rendered):
    for text in builtin_rendered:
        user, assistant = text.find("<|user|>\n"), text.find("<|assistant|>\n")
        assert 0 <= user < assistant, text[:200]
        assert text.rfind("<|user|>\n") < text.rfind("<|assistant|>\n")


def test_user_file_in_all_three_forms(tmp_path, tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Teal."}]
    path = _write(tmp_path, [{"text": "Plain text, used as is."}, "",
                             {"prompt": "Name a fruit.", "response": "A pear.", "id": 7},
                             {"messages": chat}, {"messages": chat[:2]}])
    plain, single, whole, open_chat = calibration_texts(path)
    assert plain == "Plain text, used as is." and render_calibration(tokenizer, plain) == plain
    assert single == Conversation(({"role": "user", "content": "Name a fruit."},), "A pear.")
    assert whole == Conversation(tuple(chat[:4]), "Teal.")
    assert open_chat == Conversation(tuple(chat[:2]), "")
    rendered = render_calibration(tokenizer, whole)
    assert rendered == "<|system|>\nBe brief.\n<|user|>\nHi there?\n<|assistant|>\nHello.</s>\n" \
                       "<|user|>\nName a colour.\n<|assistant|>\nTeal."


def test_windows_concatenate_every_item_once_with_one_bos(tmp_path, tokenizer):
    texts = ["<s>Starts with its own bos.", "Alpha beta gamma delta.", "The cat watches the river."]
    path = _write(tmp_path, [{"text": t} for t in texts])
    encoded = [encode(tokenizer, t) for t in texts]
    total = sum(map(len, encoded))
    assert sum(ids[:2] == [tokenizer.bos_token_id] * 2 for ids in encoded) == 0
    windows = calibration_samples(tokenizer, path=path, samples=1, seq_len=total)
    flat = windows.flatten().tolist()
    orders = [[a, b, c] for a in range(3) for b in range(3) for c in range(3) if len({a, b, c}) == 3]
    assert any(flat == sum((encoded[i] for i in order), []) for order in orders)


def test_a_chat_template_that_refuses_a_conversation_is_bad_input(tiny_model_dir):
    strict = AutoTokenizer.from_pretrained(tiny_model_dir)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    with pytest.raises(VexportError, match=r"chat template cannot render .*no system role.*--calibration"):
        calibration_samples(strict, samples=64, seq_len=512)


def test_too_little_text_repeats_with_a_warning(tmp_path, tokenizer, caplog):
    path = _write(tmp_path, [{"prompt": "Count to three.", "response": "One, two, three."}])
    with caplog.at_level(logging.WARNING, logger="vexport.calibration"):
        windows = calibration_samples(tokenizer, path=path, samples=5, seq_len=64)
    assert windows.shape == (5, 64)
    assert "repeat" in caplog.text
    single = encode(tokenizer, render_calibration(tokenizer, calibration_texts(path)[0]))
    assert windows.flatten().tolist()[:len(single)] == single


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no calibration text"),
        (["", "   "], "no calibration text"),
        (['{"text": "fine"}', "{not json"], ":2: not valid JSON"),
        (['["a list"]'], ":1: expected a JSON object"),
        (['{"text": "a", "prompt": "b", "response": "c"}'], ":1: give exactly one of"),
        (['{"answer": "no known key"}'], ":1: give exactly one of"),
        (['{"text": "   "}'], ":1: 'text' is empty"),
        (['{"text": 5}'], ":1: 'text' must be a string"),
        (['{"prompt": "Hi"}'], ":1: 'prompt' needs a string 'response'"),
        (['{"messages": []}'], ":1: 'messages' must be a non-empty list"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], ":1: messages[0] has role 'robot'"),
        (['{"messages": [{"role": "user"}]}'], ":1: messages[0] must be an object with a string 'content'"),
        (['{"messages": [{"role": "assistant", "content": "x"}]}'], ":1: 'messages' must end with a user turn"),
    ],
)
def test_bad_user_files_name_the_file_and_line(tmp_path, tokenizer, lines, message):
    path = _write(tmp_path, lines)
    with pytest.raises(VexportError) as info:
        calibration_samples(tokenizer, path=path, samples=1, seq_len=8)
    assert str(info.value).startswith(f"--calibration {path}")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(VexportError, match=r"^--calibration .*nope\.jsonl: no such file$"):
        calibration_texts(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(VexportError, match=r"^--calibration .*latin1\.jsonl: cannot read the file"):
        calibration_texts(tmp_path / "latin1.jsonl")


def test_json_strings_may_hold_unicode_line_separators(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two\x85three"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert calibration_texts(path) == ["one\u2028two\x85three"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 0}, "--samples must be a whole number >= 1, got 0"),
        ({"samples": 2.5}, "--samples must be a whole number >= 1, got 2.5"),
        ({"seq_len": 7}, "--seq-len must be a whole number >= 8, got 7"),
        ({"seq_len": 1024, "max_length": 512}, "--seq-len 1024 is longer than the model's maximum length"),
        ({"seed": None}, "the calibration seed must be a whole number, got None"),
    ],
)
def test_bad_sizes_name_the_flag(tokenizer, kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        calibration_samples(tokenizer, **kwargs)


def test_seq_len_equal_to_max_length_is_allowed(tokenizer):
    assert calibration_samples(tokenizer, samples=1, seq_len=16, max_length=16).shape == (1, 16)


def test_digest_tells_corpora_apart(tmp_path):
    path = _write(tmp_path, [{"prompt": "Name a fruit.", "response": "A pear."}])
    assert calibration_digest(calibration_texts()) == calibration_digest(calibration_texts())
    assert calibration_digest(calibration_texts(path)) != calibration_digest(calibration_texts())
    assert calibration_digest(calibration_texts(path)).startswith("sha256:")


def _builtin_path():
    from importlib import resources

    return resources.files("vexport").joinpath("data", BUILTIN_FILE)
