"""Property-based tests over every reader of outside data: whatever the bytes, the reader ends in a VexportError
(or, for scoring rows, a recorded bad row), never another exception, a hang or unbounded memory.

Every example has a deadline; the whole module runs in well under 2 minutes on 2 CPU cores. The longer
fuzzing runs are scripts/fuzz_readers.py (atheris), with the same targets (tests/fuzz_targets.py).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vexport.backends.onnxrt  # noqa: F401  imported up front: a deadline measures the reader, not an import
import vexport.cli  # noqa: F401
import vexport.runtime  # noqa: F401
import vexport.scoring.inputs  # noqa: F401
import vexport.scoring.rows  # noqa: F401
from tests import fuzz_targets as targets
from vexport.errors import VexportError

# 5 s per example: the readers take milliseconds, the margin is for 2 CPU cores shared with other work
FUZZ = settings(max_examples=120, deadline=5000, suppress_health_check=[HealthCheck.too_slow], database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# the byte strings that broke parsers elsewhere: deep nesting, integers over the digit limit, bad UTF-8, BOMs
nasty = st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b"\xff\xfe\xfd", b"\xef\xbb\xbf{}",
                         b"\x00", b"", b"\n\n\n", b'"\xe9"', b'{"prompt": "a\xe2\x80\xa8b"}'])
raw_bytes = st.binary(max_size=2000) | nasty
json_lines = st.lists(json_values.map(lambda v: json.dumps(v).encode()) | raw_bytes, max_size=5).map(b"\n".join)


def _ends_well(call) -> None:
    """CALL returns or raises a VexportError; anything else fails the test."""
    try:
        call()
    except VexportError as exc:
        assert "\n" not in str(exc), str(exc)


# -------------------------------------------------------------------------------------------- manifest
@FUZZ
@given(data=raw_bytes | json_values.map(lambda v: json.dumps(v).encode()))
def test_manifest_bytes(tmp_path_factory, data):
    _ends_well(lambda: targets.manifest(tmp_path_factory.getbasetemp(), data))


@FUZZ
@given(key=st.sampled_from(targets.MANIFEST_KEYS), value=json_values, drop=st.booleans())
def test_manifest_fields(tmp_path_factory, key, value, drop):
    document = targets.valid_manifest()
    if drop:
        document.pop(key, None)
    else:
        document[key] = value
    _ends_well(lambda: targets.manifest(tmp_path_factory.getbasetemp(), json.dumps(document).encode()))


# -------------------------------------------------------------------------------- prompts, calibration
@FUZZ
@given(data=json_lines | raw_bytes)
def test_prompt_groups(tmp_path_factory, data):
    _ends_well(lambda: targets.prompt_groups(tmp_path_factory.getbasetemp(), data))


@FUZZ
@given(data=json_lines | raw_bytes)
def test_calibration_file(tmp_path_factory, data):
    _ends_well(lambda: targets.calibration(tmp_path_factory.getbasetemp(), data))


@settings(max_examples=5, deadline=5000, database=None)
@given(size=st.sampled_from([(64 << 20) + 1, 80 << 20]))
def test_huge_line_is_refused_unread(tmp_path_factory, size):
    from vexport.evalset import read_prompt_groups

    path = tmp_path_factory.getbasetemp() / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.truncate(size)  # sparse: a line of NUL bytes, never held whole
    with pytest.raises(VexportError, match="longer than"):
        read_prompt_groups(path)


# ------------------------------------------------------------------------------------ safetensors header
header_entries = st.dictionaries(
    st.text(max_size=6),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I8", "U8", "BF16", "X9", 3]),
                           "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
                           "data_offsets": st.lists(st.integers(-4, 64), min_size=2, max_size=2) | json_values}),
    max_size=3,
)


@FUZZ
@given(header=header_entries, data=st.binary(max_size=64), lie=st.none() | st.integers(0, 2**64 - 1))
def test_safetensors_header(tmp_path_factory, header, data, lie):
    body = json.dumps(header).encode()
    blob = struct.pack("<Q", len(body) if lie is None else lie) + body + data
    _ends_well(lambda: targets.safetensors(tmp_path_factory.getbasetemp(), blob))


@FUZZ
@given(blob=raw_bytes)
def test_safetensors_raw_bytes(tmp_path_factory, blob):
    _ends_well(lambda: targets.safetensors(tmp_path_factory.getbasetemp(), blob))


@FUZZ
@given(weight_map=json_values | st.dictionaries(st.text(max_size=5), st.text(max_size=12), max_size=3))
def test_safetensors_index(tmp_path_factory, weight_map):
    _ends_well(lambda: targets.shard_index(tmp_path_factory.getbasetemp(), json.dumps({"weight_map": weight_map})))


# ------------------------------------------------------------------------------------------ GPTQ tensors
dims = st.lists(st.integers(0, 9), min_size=0, max_size=3)


@FUZZ
@given(shapes=st.tuples(dims, dims, dims, dims), dtypes=st.tuples(*[st.sampled_from([torch.int32, torch.int64,
       torch.float16, torch.float32])] * 4), g_values=st.integers(-3, 12))
def test_gptq_tensors(shapes, dtypes, g_values):
    tensors = {name: torch.randint(-100, 100, shape).to(dtype)
               for name, shape, dtype in zip(("qweight", "qzeros", "scales", "g_idx"), shapes, dtypes)}
    if tensors["g_idx"].numel():
        tensors["g_idx"] = tensors["g_idx"].clamp(max=g_values)
    _ends_well(lambda: targets.gptq(tensors))


@FUZZ
@given(out_f=st.sampled_from([8, 16]), in_words=st.integers(1, 3), groups=st.integers(1, 3),
       g_shift=st.integers(-2, 2))
def test_gptq_consistent_shapes_with_bad_g_idx(out_f, in_words, groups, g_shift):
    in_f = 8 * in_words
    tensors = {"qweight": torch.randint(-2**31, 2**31 - 1, (in_words, out_f), dtype=torch.int32),
               "qzeros": torch.randint(-2**31, 2**31 - 1, (groups, out_f // 8), dtype=torch.int32),
               "scales": torch.rand(groups, out_f).half(),
               "g_idx": (torch.arange(in_f, dtype=torch.int32) % groups) + g_shift}
    _ends_well(lambda: targets.gptq(tensors))


# ---------------------------------------------------------------------------------------- ONNX graph
@FUZZ
@given(blob=raw_bytes)
def test_onnx_graph_bytes(tmp_path_factory, blob):
    _ends_well(lambda: targets.onnx_graph(tmp_path_factory.getbasetemp(), blob))


# --------------------------------------------------------------------------------------- scoring rows
# Lines the fuzzer once crashed the reader with (json.loads raised RecursionError / ValueError, a lone
# surrogate broke the UTF-8 writer): each must now be a rejected row with a reason.
SCORING_FOUND_CRASHES = (b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b'{"text": "a\\ud800b"}')


@FUZZ
@given(line=json_values.map(lambda v: json.dumps(v).encode()) | raw_bytes)
def test_scoring_row(tiny_model_dir, line):
    targets.scoring_row(targets.tokenizer(tiny_model_dir), line)


@pytest.mark.parametrize("line", SCORING_FOUND_CRASHES,
                         ids=["deep_array", "deep_object", "huge_integer", "lone_surrogate"])
def test_scoring_row_found_crashes_are_rejected(tiny_model_dir, line):
    from vexport.scoring.rows import RowEncoder

    (out,) = RowEncoder(targets.tokenizer(tiny_model_dir), 64).encode([line])
    assert isinstance(out, str) and out.encode("utf-8"), out


@FUZZ
@given(data=json_lines | raw_bytes, suffix=st.sampled_from([".jsonl", ".parquet"]))
def test_scoring_input_file(tmp_path_factory, data, suffix):
    _ends_well(lambda: targets.scoring_input(tmp_path_factory.getbasetemp(), data, suffix))


def test_scoring_input_deep_line_with_id(tmp_path):
    """A line nested 5000 deep that names "id": indexing does not recurse into it (no RecursionError) and finds
    no id column, and the reader hands the line back whole, for the row encoder to reject."""
    from vexport.scoring.inputs import index_input, read_windows

    line = b"[" * 5000 + b'"id"\n'
    (tmp_path / "input.jsonl").write_bytes(line)
    plan = index_input(tmp_path / "input.jsonl", part_rows=2)
    assert plan.id_kind is None and [f.num_rows for f in plan.files] == [1]
    windows = list(read_windows(plan, plan.windows(), line_limit=1 << 16))
    assert [lines for _, lines in windows] == [[line]]
