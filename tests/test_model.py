"""vexport/model.py at unit level: resolve/check_model_name and the hub-id heuristic, load_config and
check_value_model (wrong model kinds, unsupported features), the rope and position helpers, weight discovery
(single files, shard indexes, pickle-only folders), index_tensors and read_safetensors_header against real
safetensors files damaged byte by byte, and open_model/ModelSource on the tiny value model.

Real folders and files only (tmp_path, the session's tiny_model_dir); nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, MistralConfig

from tests.helpers import copy_model, edit_config, make_pickle_only
from vexport.errors import CorruptFileError, NotAValueModelError, VexportError
from vexport.model import (ModelSource, attention_window, check_config_features, check_model_name, check_value_model,
                           find_weight_files, index_tensors, load_config, looks_like_hub_id, open_model,
                           position_thresholds, read_safetensors_header, resolve, rope_parameters, rope_type)
from vexport.safety import ContainmentError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def config_folder(tiny_model_dir: Path, tmp_path: Path, **changes) -> Path:
    """A folder holding only the tiny model's config.json, with CHANGES applied."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copyfile(tiny_model_dir / "config.json", folder / "config.json")
    if changes:
        edit_config(folder, **changes)
    return folder


def make_config(kind: str = "llama", **changes):
    """A small value-model config of the real transformers class (no folder)."""
    cls, arch = {"llama": (LlamaConfig, "LlamaForTokenClassification"),
                 "mistral": (MistralConfig, "MistralForTokenClassification")}[kind]
    fields = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 100, "max_position_embeddings": 512, "num_labels": 1,
              "architectures": [arch]}
    return cls(**{**fields, **changes})


def yarn(original: object) -> dict:
    return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original, "rope_theta": 10000.0}


def save(path: Path, **tensors: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data bytes."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def pack(path: Path, header, data: bytes, raw: bytes | None = None) -> Path:
    """Write a safetensors file from HEADER (or the RAW header bytes) and DATA."""
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def sharded(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model split into two shards named by model.safetensors.index.json."""
    copy_model(tiny_model_dir, folder)
    tensors = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    head = {name: tensors.pop(name) for name in ("score.weight", "score.bias", "model.norm.weight")}
    save(folder / "model-00001-of-00002.safetensors", **tensors)
    save(folder / "model-00002-of-00002.safetensors", **head)
    weight_map = {**{n: "model-00001-of-00002.safetensors" for n in tensors},
                  **{n: "model-00002-of-00002.safetensors" for n in head}}
    write_index(folder, weight_map)
    return folder


def write_index(folder: Path, weight_map, text: str | bytes | None = None) -> Path:
    path = folder / INDEX
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ------------------------------------------------------------------------------ resolve, check_model_name
def test_resolve_returns_a_local_folder(tiny_model_dir):
    assert resolve(tiny_model_dir) == tiny_model_dir
    assert resolve(str(tiny_model_dir)) == tiny_model_dir


def test_resolve_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    assert resolve("~/model") == tmp_path / "model"


def test_resolve_refuses_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(VexportError, match="model.safetensors is a file, not a model folder"):
        resolve(tmp_path / "model.safetensors")


def test_a_local_folder_named_like_a_hub_id_is_used_as_is(tmp_path, monkeypatch):
    """org/name that exists here is the folder: offline, a hub lookup would have been refused instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve("org/name") == Path("org/name")
    check_model_name("org/name")


def test_check_model_name_accepts_an_existing_folder_and_a_hub_id(tiny_model_dir, monkeypatch):
    """Nothing is downloaded: check_model_name only decides whether resolve() would look the name up."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_model_name(tiny_model_dir)
    check_model_name("org/does-not-exist-anywhere")


@pytest.mark.parametrize("name", ["./modle", "modle", "/no/such/model", "a/b/c"])
def test_check_model_name_refuses_path_like_names(name, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(VexportError, match=rf"^no such folder: {name} \(it does not exist, and it is not a hub id"):
        check_model_name(name)


@pytest.mark.parametrize("value, refused", [("1", True), ("true", True), (" YES ", True), ("on", True),
                                            ("0", False), ("", False), ("no", False)])
def test_hf_hub_offline_values(value, refused, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    if refused:
        with pytest.raises(VexportError, match=r"no such folder: org/name .*HF_HUB_OFFLINE is set"):
            check_model_name("org/name")
    else:
        check_model_name("org/name")


@pytest.mark.parametrize("text", ["org/name", "meta-llama/Llama-3.1-8B", "Org_1/x_y", "a/b.c", "1org/v2"])
def test_hub_ids(text):
    assert looks_like_hub_id(text)


@pytest.mark.parametrize("text", ["name", "org/name/extra", "/org/name", "./org/name", "~/name", "-org/name",
                                  "_org/name", "org/", "/name", "org//name", "org/na me", "org/a..b", "org/..",
                                  "org\\name", "org/name\\x", "", "C:/name"])
def test_not_hub_ids(text):
    assert not looks_like_hub_id(text)


def test_a_trailing_newline_is_not_a_hub_id():
    assert not looks_like_hub_id("org/name\n")


# ------------------------------------------------------------------------------------------- load_config
def test_load_config_reads_the_tiny_model(tiny_model_dir):
    config = load_config(tiny_model_dir)
    assert (config.model_type, config.num_labels, config.architectures) == ("llama", 1, ["LlamaForTokenClassification"])


@pytest.mark.parametrize("kind", ["absent", "folder"])
def test_a_folder_without_config_json_is_refused(tmp_path, kind):
    if kind == "folder":
        (tmp_path / "config.json").mkdir()
    with pytest.raises(VexportError, match="has no config.json: not a Hugging Face model folder"):
        load_config(tmp_path)


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe{}", b"", b'{"model_type": "llama",}'],
                         ids=["syntax", "not-utf8", "empty", "trailing-comma"])
def test_a_config_that_is_not_json_is_corrupt(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(CorruptFileError, match=r"config.json is not valid JSON \("):
        load_config(tmp_path)


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"vocab_size": ' + b"1" * 5000 + b"}"], ids=["deep", "huge-int"])
def test_a_config_json_that_breaks_the_parser_is_corrupt(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(CorruptFileError, match="config.json"):
        load_config(tmp_path)


@pytest.mark.parametrize("data", [{"model_type": "no-such-architecture"}, [], {"model_type": 3}],
                         ids=["unknown-type", "array", "type-not-str"])
def test_a_config_transformers_cannot_read_is_refused(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(VexportError, match="config.json is not a config transformers can read: ") as info:
        load_config(tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- check_value_model
def test_the_tiny_model_and_a_mistral_one_are_value_models(tiny_model_dir, tmp_path):
    check_value_model(load_config(tiny_model_dir), tiny_model_dir)
    folder = config_folder(tiny_model_dir, tmp_path, model_type="mistral",
                           architectures=["MistralForTokenClassification"], sliding_window=64)
    check_value_model(load_config(folder), folder)


@pytest.mark.parametrize("architectures, shown", [
    (["LlamaForCausalLM"], r"is a causal LM \(LlamaForCausalLM\) with no score head"),
    (["LlamaForSequenceClassification"], r"is a LlamaForSequenceClassification checkpoint"),
    (None, r"\(no architectures in config.json\)"),
    ([], r"\(no architectures in config.json\)"),
    (["LlamaForCausalLM", "LlamaForTokenClassification"], r"causal LM"),  # the first architecture decides
])
def test_other_model_kinds_are_not_value_models(tiny_model_dir, tmp_path, architectures, shown):
    folder = config_folder(tiny_model_dir, tmp_path, architectures=architectures)
    with pytest.raises(NotAValueModelError, match=shown + r".*expected a \*ForTokenClassification checkpoint"):
        check_value_model(load_config(folder), folder)


def test_an_unsupported_decoder_is_named(tiny_model_dir, tmp_path):
    folder = config_folder(tiny_model_dir, tmp_path, model_type="qwen2", architectures=["Qwen2ForTokenClassification"])
    with pytest.raises(NotAValueModelError, match=r"config-only: model_type 'qwen2' is not a supported Llama-family "
                                                  r"decoder \(supported: llama, mistral\)"):
        check_value_model(load_config(folder), folder)


@pytest.mark.parametrize("labels", [2, 3])
def test_num_labels_other_than_one_is_refused(tiny_model_dir, tmp_path, labels):
    id2label = {str(i): f"L{i}" for i in range(labels)}
    label2id = {v: int(k) for k, v in id2label.items()}
    folder = config_folder(tiny_model_dir, tmp_path, id2label=id2label, label2id=label2id)
    with pytest.raises(NotAValueModelError, match=rf"config-only has num_labels {labels}: a value model has exactly 1"):
        check_value_model(load_config(folder), folder)


def test_an_activation_other_than_silu_is_refused(tiny_model_dir, tmp_path):
    folder = config_folder(tiny_model_dir, tmp_path, hidden_act="gelu")
    with pytest.raises(NotAValueModelError, match=r"hidden_act 'gelu' is not supported \(only silu\)"):
        check_value_model(load_config(folder), folder)


# --------------------------------------------------------------------------------- check_config_features
@pytest.mark.parametrize("window", [0, -3])
def test_a_mistral_sliding_window_must_be_positive(tiny_model_dir, tmp_path, window):
    folder = config_folder(tiny_model_dir, tmp_path, model_type="mistral",
                           architectures=["MistralForTokenClassification"], sliding_window=window)
    with pytest.raises(NotAValueModelError, match=rf"config.json: sliding_window {window} is not a positive integer"):
        check_value_model(load_config(folder), folder)


def test_a_llama_sliding_window_is_ignored(tmp_path):
    """LlamaModel never applies sliding_window, so even a nonsense value is no reason to refuse."""
    check_config_features(make_config(sliding_window=-3), tmp_path)


def test_an_unknown_rope_type_lists_the_known_ones(tmp_path):
    config = make_config(rope_parameters={"rope_type": "x" * 100, "rope_theta": 10000.0})
    with pytest.raises(NotAValueModelError, match=r"config.json: rope_type 'x{40}' is not a rope type transformers "
                                                  r"knows \(default, .*yarn\)$"):
        check_config_features(config, tmp_path)


@pytest.mark.parametrize("rope", ["linear", "dynamic", "llama3", "yarn"])
def test_rope_types_transformers_knows_pass_intake(tmp_path, rope):
    """Intake accepts what transformers runs; the export refuses what its graph cannot express (elsewhere)."""
    params = {"linear": {"factor": 2.0}, "dynamic": {"factor": 2.0}, "yarn": yarn(128),
              "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128}}[rope]
    check_config_features(make_config(rope_parameters={"rope_theta": 10000.0, **params, "rope_type": rope}), tmp_path)


# ------------------------------------------------------------------------------------------ rope helpers
def test_rope_parameters_of_a_default_config():
    config = make_config()
    params = rope_parameters(config)
    assert params["rope_type"] == "default" and rope_type(config) == "default"
    params["rope_type"] = "yarn"  # a copy: the config is untouched
    assert rope_type(config) == "default"


def test_rope_parameters_of_a_config_without_them():
    config = make_config()
    config.rope_parameters = None
    assert rope_parameters(config) == {} and rope_type(config) == "default"


def test_rope_type_of_a_scaled_rope():
    assert rope_type(make_config(rope_parameters=yarn(128))) == "yarn"


@pytest.mark.parametrize("kind, window, expected", [
    ("llama", 100, None),  # LlamaModel ignores sliding_window
    ("mistral", None, None), ("mistral", 100, 100), ("mistral", 511, 511),
    ("mistral", 512, None), ("mistral", 4096, None),  # a window as long as the model's positions never limits
])
def test_attention_window(kind, window, expected):
    assert attention_window(make_config(kind, sliding_window=window)) == expected


@pytest.mark.parametrize("kind, changes, expected", [
    ("llama", {}, []),
    ("mistral", {"sliding_window": 100, "rope_parameters": yarn(256)}, [100, 256]),
    ("mistral", {"sliding_window": 256, "rope_parameters": yarn(256)}, [256]),  # one threshold, not two
    ("llama", {"rope_parameters": yarn(512)}, []),  # not below max_position_embeddings
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128,
                                   "rope_theta": 10000.0}}, []),  # dynamic rope scales from max positions on
    ("llama", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 128, "rope_theta": 10000.0}}, [128]),
])
def test_position_thresholds(kind, changes, expected):
    assert position_thresholds(make_config(kind, **changes)) == expected


@pytest.mark.parametrize("original", [128.0, True])  # values transformers itself accepts
def test_a_pretraining_length_that_is_no_whole_number_is_no_threshold(original):
    assert position_thresholds(make_config(rope_parameters=yarn(original))) == []


# ------------------------------------------------------------------------------------- find_weight_files
def test_a_single_safetensors_file(tiny_model_dir):
    assert find_weight_files(tiny_model_dir, allow_pickle=False) == ([tiny_model_dir / WEIGHTS], False)


def test_loose_shards_are_found_sorted(tmp_path):
    for name in ("b.safetensors", "a.safetensors"):
        save(tmp_path / name, w=torch.zeros(1))
    assert find_weight_files(tmp_path, False) == ([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], False)


def test_the_index_decides_which_shards_are_read(tiny_model_dir, tmp_path):
    """A stray *.safetensors beside an index is not a shard of the model."""
    folder = sharded(tiny_model_dir, tmp_path / "model")
    save(folder / "stray.safetensors", w=torch.zeros(1))
    files, is_pickle = find_weight_files(folder, False)
    assert files == [folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]
    assert not is_pickle


def test_safetensors_beside_pickle_files_win(tmp_path):
    save(tmp_path / WEIGHTS, w=torch.zeros(1))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert find_weight_files(tmp_path, False) == ([tmp_path / WEIGHTS], False)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, caplog, name):
    torch.save({"w": torch.zeros(1)}, tmp_path / name)
    with pytest.raises(VexportError, match=rf"weights only in pickle files \({name}\), which can run code.*"
                                           r"--allow-pickle"):
        find_weight_files(tmp_path, False)
    with caplog.at_level(logging.WARNING, logger="vexport.model"):
        assert find_weight_files(tmp_path, True) == ([tmp_path / name], True)
    assert any("loading pickle weights" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("files", [[], ["model.onnx", "config.json", "model.safetensors.txt"]])
def test_a_folder_without_weights_is_refused(tmp_path, files):
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(VexportError, match=r"has no weight files \(\*\.safetensors\)$"):
        find_weight_files(tmp_path, True)


# ------------------------------------------------------------------------------------------- shard index
def test_shards_named_by_an_index_are_listed_once(tmp_path):
    save(tmp_path / "sub" / "b.safetensors", w=torch.zeros(1))
    save(tmp_path / "a.safetensors", v=torch.zeros(1))
    write_index(tmp_path, {"w": "sub/b.safetensors", "v": "a.safetensors", "u": "a.safetensors"})
    assert find_weight_files(tmp_path, False)[0] == [tmp_path / "a.safetensors", tmp_path / "sub" / "b.safetensors"]


def test_a_missing_shard_is_named(tiny_model_dir, tmp_path):
    folder = sharded(tiny_model_dir, tmp_path / "model")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptFileError, match=r"model.safetensors.index.json names "
                                               r"'model-00002-of-00002.safetensors', which is missing$"):
        find_weight_files(folder, False)


def test_a_shard_that_is_a_folder_is_missing(tmp_path):
    (tmp_path / "a.safetensors").mkdir()
    write_index(tmp_path, {"w": "a.safetensors"})
    with pytest.raises(CorruptFileError, match="names 'a.safetensors', which is missing"):
        find_weight_files(tmp_path, False)


@pytest.mark.parametrize("text, error", [
    ("{not json", "JSONDecodeError"), (b"\xff\xfe", "UnicodeDecodeError"), ("[" * 100_000, "RecursionError"),
    ('{"metadata": {}}', "KeyError"), ("[]", "TypeError"), ('{"weight_map": ["a.safetensors"]}', "AttributeError"),
    ('{"weight_map": {"w": 1}}', "TypeError"), ('{"weight_map": {"w": ["a.safetensors"]}}', "TypeError"),
    ('{"weight_map": {"w": "a.safetensors", "v": 2}}', "TypeError"), ('{"weight_map": {"w": null}}', "TypeError"),
])
def test_an_index_of_the_wrong_shape_is_corrupt(tmp_path, text, error):
    save(tmp_path / "a.safetensors", w=torch.zeros(1))
    write_index(tmp_path, None, text)
    with pytest.raises(CorruptFileError, match=rf"model.safetensors.index.json is not a valid safetensors index "
                                               rf"\({error}\)$"):
        find_weight_files(tmp_path, False)


def test_an_index_with_a_huge_integer_is_corrupt(tmp_path):
    write_index(tmp_path, None, '{"weight_map": {"w": ' + "1" * 5000 + "}}")
    with pytest.raises(CorruptFileError, match="model.safetensors.index.json"):
        find_weight_files(tmp_path, False)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "/tmp/x.safetensors",
                                   ""])
def test_an_index_naming_a_shard_outside_is_refused_unopened(tmp_path, shard):
    folder = tmp_path / "model"
    save(tmp_path / "outside.safetensors", w=torch.zeros(1))
    write_index(folder, {"w": shard})
    with pytest.raises(ContainmentError, match=r"\(named in model.safetensors.index.json\)"):
        find_weight_files(folder, False)


def test_a_shard_symlink_leading_out_is_refused(tmp_path):
    folder = tmp_path / "model"
    save(tmp_path / "outside.safetensors", w=torch.zeros(1))
    write_index(folder, {"w": "a.safetensors"})
    (folder / "a.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(ContainmentError, match=r"a.safetensors: refusing it \(named in model.safetensors.index"):
        find_weight_files(folder, False)


# ------------------------------------------------------------------------------------------- index_tensors
def test_index_tensors_maps_every_tensor_to_its_shard(tmp_path):
    a = save(tmp_path / "a.safetensors", w=torch.zeros(2, 3), b=torch.zeros(3, dtype=torch.float16))
    b = save(tmp_path / "b.safetensors", n=torch.zeros(4, dtype=torch.bfloat16))
    assert index_tensors([a, b]) == {"w": (a, "F32", [2, 3]), "b": (a, "F16", [3]), "n": (b, "BF16", [4])}
    assert index_tensors([]) == {}


def test_index_tensors_names_the_corrupt_shard(tmp_path):
    a = save(tmp_path / "a.safetensors", w=torch.zeros(2))
    b = save(tmp_path / "b.safetensors", n=torch.zeros(4))
    b.write_bytes(b.read_bytes()[:-1])
    with pytest.raises(CorruptFileError, match=r"b.safetensors is truncated or padded"):
        index_tensors([a, b])


# ----------------------------------------------------------------------------------- read_safetensors_header
@pytest.fixture
def st_file(tmp_path) -> Path:
    """A real safetensors file: w F32 [2, 3] (24 bytes), then b F16 [4] (8 bytes)."""
    return save(tmp_path / WEIGHTS, w=torch.arange(6, dtype=torch.float32).reshape(2, 3),
                b=torch.ones(4, dtype=torch.float16))


def test_the_header_of_a_real_file(tmp_path):
    path = save(tmp_path / WEIGHTS, f32=torch.zeros(2, 3), f16=torch.zeros(4, dtype=torch.float16),
                bf16=torch.zeros(1, 1, 2, dtype=torch.bfloat16), i64=torch.zeros(3, dtype=torch.int64),
                i8=torch.zeros(5, dtype=torch.int8), u8=torch.zeros(7, dtype=torch.uint8),
                flag=torch.zeros(3, dtype=torch.bool), scalar=torch.tensor(1.0), empty=torch.zeros(0, 4))
    assert read_safetensors_header(path) == {
        "f32": ("F32", [2, 3]), "f16": ("F16", [4]), "bf16": ("BF16", [1, 1, 2]), "i64": ("I64", [3]),
        "i8": ("I8", [5]), "u8": ("U8", [7]), "flag": ("BOOL", [3]), "scalar": ("F32", []), "empty": ("F32", [0, 4])}


def test_metadata_is_not_a_tensor(st_file):
    header, data = split(st_file)
    header["__metadata__"] = {"format": "pt", "anything": "goes"}
    assert sorted(read_safetensors_header(pack(st_file, header, data))) == ["b", "w"]


def test_an_empty_safetensors_file_reads(tmp_path):
    """No tensors at all is a valid file (open_model then says there is no score head)."""
    assert read_safetensors_header(save(tmp_path / WEIGHTS)) == {}


@pytest.mark.parametrize("keep", [0, 1, 7])
def test_a_file_shorter_than_the_length_field(st_file, keep):
    st_file.write_bytes(st_file.read_bytes()[:keep])
    with pytest.raises(CorruptFileError, match=rf"model.safetensors is truncated or not a safetensors file "
                                               rf"\({keep} bytes\)$"):
        read_safetensors_header(st_file)


def test_a_header_longer_than_the_file(st_file):
    """The file cut inside its header: the length field promises more bytes than there are."""
    blob = st_file.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    st_file.write_bytes(blob[:8 + length // 2])
    with pytest.raises(CorruptFileError, match=rf"truncated or not a safetensors file \(header of {length} bytes\)"):
        read_safetensors_header(st_file)


def test_a_header_over_100_mib_is_refused_unread(tmp_path):
    """A length field of 100 MiB + 1 in a file that large (sparse): refused before the header is read."""
    path = tmp_path / WEIGHTS
    length = (100 << 20) + 1
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", length))
        fh.truncate(length + 1000)
    with pytest.raises(CorruptFileError, match=rf"\(header of {length} bytes\)"):
        read_safetensors_header(path)


@pytest.mark.parametrize("cut", [-1, -8, -24])
def test_truncated_data_is_refused(st_file, cut):
    st_file.write_bytes(st_file.read_bytes()[:cut])
    with pytest.raises(CorruptFileError, match=rf"model.safetensors is truncated or padded: its header needs 32 data "
                                               rf"bytes, the file has {32 + cut}$"):
        read_safetensors_header(st_file)


def test_padded_data_is_refused(st_file):
    st_file.write_bytes(st_file.read_bytes() + b"\0\0\0")
    with pytest.raises(CorruptFileError, match="truncated or padded: its header needs 32 data bytes, the file has 35"):
        read_safetensors_header(st_file)


@pytest.mark.parametrize("raw", [b"{not json}", b"\xff\xfe\xfd", b"[" * 100_000, b""], ids=["syntax", "not-utf8",
                                                                                         "deep", "empty"])
def test_a_header_that_is_not_json(st_file, raw):
    _, data = split(st_file)
    pack(st_file, None, data, raw=raw)
    with pytest.raises(CorruptFileError, match=r"model.safetensors is corrupt: .* header is not valid JSON$"):
        read_safetensors_header(st_file)


def test_a_flipped_header_byte(st_file):
    """One byte of the real header overwritten (the '{' that opens it)."""
    blob = bytearray(st_file.read_bytes())
    blob[8] = ord("x")
    st_file.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match="header is not valid JSON"):
        read_safetensors_header(st_file)


def test_a_header_with_a_huge_integer_is_corrupt(st_file):
    _, data = split(st_file)
    raw = b'{"w": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 32]}}'
    pack(st_file, None, data, raw=raw)
    with pytest.raises(CorruptFileError, match="model.safetensors is corrupt"):
        read_safetensors_header(st_file)


@pytest.mark.parametrize("header", [[], "w", 3, None])
def test_a_header_that_is_not_an_object(st_file, header):
    _, data = split(st_file)
    with pytest.raises(CorruptFileError, match="model.safetensors is corrupt: its safetensors header is not an object"):
        read_safetensors_header(pack(st_file, header, data))


def damage(path: Path, change) -> Path:
    """CHANGE(header) edits the real header of PATH in place; the data bytes stay."""
    header, data = split(path)
    change(header)
    return pack(path, header, data)


@pytest.mark.parametrize("change", [
    lambda h: h["w"].pop("dtype"), lambda h: h["w"].pop("shape"), lambda h: h["w"].pop("data_offsets"),
    lambda h: h.update(w="F32"), lambda h: h.update(w=[1, 2]), lambda h: h.update(w=None),
    lambda h: h["w"].update(data_offsets=[0, 24, 32]), lambda h: h["w"].update(data_offsets=[24]),
    lambda h: h["w"].update(data_offsets=24),
], ids=["no-dtype", "no-shape", "no-offsets", "entry-str", "entry-list", "entry-null", "three-offsets", "one-offset",
        "offsets-int"])
def test_a_bad_header_entry_is_named(st_file, change):
    with pytest.raises(CorruptFileError, match=r"model.safetensors is corrupt: bad header entry for 'w'$"):
        read_safetensors_header(damage(st_file, change))


@pytest.mark.parametrize("dtype, shown", [("F128", "'F128'"), ("f32", "'f32'"), (4, "'4'"), (None, "'None'"),
                                          ("Q" * 50, repr("Q" * 20))])
def test_an_unknown_dtype_is_named(st_file, dtype, shown):
    with pytest.raises(CorruptFileError, match=rf"'w' has unknown dtype {shown}$"):
        read_safetensors_header(damage(st_file, lambda h: h["w"].update(dtype=dtype)))


@pytest.mark.parametrize("change", [
    lambda h: h["w"].update(shape=[2, -3]), lambda h: h["w"].update(shape=[2.0, 3]),
    lambda h: h["w"].update(shape=[True, 3]), lambda h: h["w"].update(shape="2x3"),
    lambda h: h["w"].update(shape={"rows": 2}), lambda h: h["w"].update(shape=[[2, 3]]),
    lambda h: h["w"].update(data_offsets=[24, 0]), lambda h: h["w"].update(data_offsets=[-1, 23]),
    lambda h: h["w"].update(data_offsets=[0.0, 24.0]), lambda h: h["w"].update(data_offsets=[False, 24]),
], ids=["negative-dim", "float-dim", "bool-dim", "shape-str", "shape-dict", "nested-shape", "reversed-offsets",
        "negative-offset", "float-offsets", "bool-offset"])
def test_bad_shapes_and_offsets_are_named(st_file, change):
    with pytest.raises(CorruptFileError, match=r"corrupt: bad shape or data_offsets for 'w'$"):
        read_safetensors_header(damage(st_file, change))


@pytest.mark.parametrize("change, shown", [
    (lambda h: h["w"].update(shape=[2, 2]), "'w' has 24 bytes, expected 16"),
    (lambda h: h["w"].update(shape=[2, 3, 2]), "'w' has 24 bytes, expected 48"),
    (lambda h: h["w"].update(dtype="F16"), "'w' has 24 bytes, expected 12"),
    (lambda h: h["b"].update(dtype="F64"), "'b' has 8 bytes, expected 32"),
    (lambda h: h["w"].update(shape=[2**40, 2**40]), f"'w' has 24 bytes, expected {4 * 2**80}"),
])
def test_a_byte_count_that_disagrees_with_dtype_and_shape(st_file, change, shown):
    with pytest.raises(CorruptFileError, match=rf"model.safetensors is corrupt: {shown}$"):
        read_safetensors_header(damage(st_file, change))


def test_overlapping_tensors_are_refused(st_file):
    """b moved onto the bytes of w: the total still looks plausible, the tiling does not."""
    def overlap(header):
        header["b"]["data_offsets"] = [0, 8]
    with pytest.raises(CorruptFileError, match="its tensors overlap or leave a gap at byte 8"):
        read_safetensors_header(damage(st_file, overlap))


def test_a_gap_between_tensors_is_refused(tmp_path):
    """The data is one tensor of 8 bytes at offset 4: bytes 0..4 belong to no tensor."""
    path = pack(tmp_path / WEIGHTS, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(CorruptFileError, match="overlap or leave a gap at byte 0$"):
        read_safetensors_header(path)


def test_the_header_agrees_with_the_safetensors_library(st_file):
    """What read_safetensors_header accepts, safetensors reads: same names, dtypes and shapes."""
    tensors = load_file(st_file)
    header = read_safetensors_header(st_file)
    assert {name: list(t.shape) for name, t in tensors.items()} == {name: shape for name, (_, shape) in header.items()}
    assert tensors["w"].dtype == torch.float32 and header["w"][0] == "F32"


# ------------------------------------------------------------------------------------ open_model, ModelSource
def test_open_model_on_the_tiny_model(tiny_model_dir):
    source = open_model(str(tiny_model_dir))
    assert isinstance(source, ModelSource)
    assert source.model_id == str(tiny_model_dir) and source.path == tiny_model_dir
    assert source.weight_files == [tiny_model_dir / WEIGHTS] and source.pickle is False
    assert source.config.num_labels == 1
    assert source.tensors["score.weight"] == (tiny_model_dir / WEIGHTS, "F32", [1, 64])
    assert source.tensors["model.embed_tokens.weight"][2] == [1000, 64]
    assert source.score_has_bias


def test_read_tensor_reads_from_the_shard(tiny_model_dir, tmp_path):
    folder = sharded(tiny_model_dir, tmp_path / "model")
    source = open_model(folder)
    assert source.tensors["score.weight"][0] == folder / "model-00002-of-00002.safetensors"
    assert source.tensors["model.embed_tokens.weight"][0] == folder / "model-00001-of-00002.safetensors"
    expected = load_file(tiny_model_dir / WEIGHTS)
    for name in ("score.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(source.read_tensor(name), expected[name])


def test_a_model_without_score_bias_opens_and_loads_with_a_zero_bias(tiny_model_dir, tmp_path):
    """score.bias is optional (a checkpoint without one means zeros), for the header check and for load_torch."""
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    tensors = load_file(folder / WEIGHTS)
    del tensors["score.bias"]
    save(folder / WEIGHTS, **tensors)
    source = open_model(folder)
    assert not source.score_has_bias
    model = source.load_torch()
    assert not model.training
    assert torch.equal(model.score.weight.detach(), tensors["score.weight"])
    assert torch.equal(model.score.bias.detach(), torch.zeros(1))


def test_weights_without_a_score_head_are_not_a_value_model(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    tensors = load_file(folder / WEIGHTS)
    del tensors["score.weight"]
    save(folder / WEIGHTS, **tensors)
    with pytest.raises(NotAValueModelError, match=r"model has no score head \(score.weight\) in its weights"):
        open_model(folder)


def test_the_config_is_judged_before_any_weight_is_read(tiny_model_dir, tmp_path):
    """A causal-LM config.json over corrupt weights: the model kind is what the user is told."""
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    edit_config(folder, architectures=["LlamaForCausalLM"])
    (folder / WEIGHTS).write_bytes(b"\0" * 4)
    with pytest.raises(NotAValueModelError, match=r"is a causal LM \(LlamaForCausalLM\)"):
        open_model(folder)


def test_a_config_symlink_leading_out_is_refused_before_it_is_read(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    shutil.move(folder / "config.json", tmp_path / "config.json")
    (folder / "config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(ContainmentError, match=r"model/config.json: refusing it: it resolves to"):
        open_model(folder)


def test_pickle_weights_open_only_when_allowed(tiny_model_dir, tmp_path):
    folder = make_pickle_only(tiny_model_dir, tmp_path / "model")
    with pytest.raises(VexportError, match=r"pytorch_model.bin.*--allow-pickle"):
        open_model(folder)
    source = open_model(folder, allow_pickle=True)
    assert source.pickle and source.weight_files == [folder / "pytorch_model.bin"] and source.tensors == {}


def test_pickle_weights_keep_their_score_bias(tiny_model_dir, tmp_path):
    folder = make_pickle_only(tiny_model_dir, tmp_path / "model")
    assert "score.bias" in torch.load(folder / "pytorch_model.bin")
    assert open_model(folder, allow_pickle=True).score_has_bias
