"""vexport.scoring.score with the local engine: output schema, values, batch independence, resume and refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tests.helpers import copy_model, edit_config
from tests.scoring_helpers import bad_rows, mixed_rows, reference_ids, write_jsonl, write_parquet
from vexport.errors import OutputExistsError, VexportError
from vexport.runtime import load
from vexport.scoring import read_errors, read_scores, score

ROWS = mixed_rows(120, seed=3, max_words=60, bad_every=20)
BAD = bad_rows(ROWS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("scoring") / "rows.jsonl", ROWS)


@pytest.fixture(scope="module")
def scored(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    summary = score(tiny_model_dir, data, out, per_token=True, part_rows=32, batch_tokens=2048)
    return out, summary


def _reference(model_dir, append_eos: bool) -> dict:
    """Every good row's per-token values from vexport.load(...).values(), each row alone and unpadded."""
    model, tokenizer = load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    return {i: model.values([reference_ids(tokenizer, r, append_eos=append_eos and "text" not in r)])[0].numpy()
            for i, r in enumerate(ROWS) if i not in BAD}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return _reference(tiny_model_dir, append_eos=False)


@pytest.fixture(scope="module")
def reference_eos(tiny_model_dir):
    """As `reference`, with chat rows ending in the end-of-sequence token (text rows are scored as is)."""
    return _reference(tiny_model_dir, append_eos=True)


def test_output_schema_and_rows(scored):
    out, _ = scored
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts][:2] == ["part-000000000000-000000000032.parquet",
                                           "part-000000000032-000000000064.parquet"]
    schema = pq.read_schema(parts[0])
    assert schema.names == ["row", "id", "value", "num_tokens", "values"]
    assert [schema.field(n).type for n in schema.names] == [pa.int64(), pa.string(), pa.float32(), pa.int32(),
                                                             pa.list_(pa.float32())]
    table = read_scores(out)
    assert table["row"].to_pylist() == [i for i in range(len(ROWS)) if i not in BAD]
    assert table["id"].to_pylist() == [ROWS[i]["id"] for i in table["row"].to_pylist()]
    assert not list(out.glob(".*"))  # no temporary files left


def test_values_match_the_loaded_model_row_by_row(scored, reference):
    table = read_scores(scored[0]).to_pylist()
    for record in table:
        expected = reference[record["row"]]
        assert record["num_tokens"] == len(expected) == len(record["values"])
        np.testing.assert_allclose(record["values"], expected, rtol=1e-5, atol=1e-5)
        assert record["value"] == pytest.approx(float(expected[-1]), rel=1e-5, abs=1e-5)


def test_errors_and_summary(scored, tiny_model_dir):
    out, summary = scored
    assert [e["row"] for e in read_errors(out)] == sorted(BAD)
    for error in read_errors(out):
        assert error["reason"].startswith(BAD[error["row"]]), error
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["rows_read"] == len(ROWS) and summary["rows_rejected"] == len(BAD)
    assert summary["rows_scored"] == len(ROWS) - len(BAD) and summary["complete"]
    assert summary["tokens"] == sum(read_scores(out)["num_tokens"].to_pylist())
    assert 0 <= summary["padding_fraction"] < 0.5
    assert summary["engine"] == "local" and summary["workers"] == 1
    assert summary["this_run"]["tokens_per_s"] > 0 and summary["this_run"]["rows"] == len(ROWS)
    weights = summary["model"]["source"]["weights"]["model.safetensors"]
    assert summary["model"]["format"] == "torch" and len(weights["sha256"]) == 64


@pytest.fixture(scope="module")
def eos_pad_model(tiny_model_dir, tmp_path_factory):
    """The same model, its tokenizer padding with the end-of-sequence token."""
    folder = copy_model(tiny_model_dir, tmp_path_factory.mktemp("eos-pad") / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    edit_config(folder, pad_token_id=AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id == AutoTokenizer.from_pretrained(folder).eos_token_id
    return folder


@pytest.mark.parametrize("name, model, kwargs", [
    ("alone", "tiny", {"batch_tokens": 1}),
    ("mixed right", "tiny", {"batch_tokens": 100_000}),
    ("mixed left", "tiny", {"batch_tokens": 100_000, "padding_side": "left"}),
    ("fixed 16 in order", "tiny", {"fixed_batch_rows": 16}),
    ("pad is eos", "eos", {"batch_tokens": 100_000}),
    ("pad is eos, left", "eos", {"batch_tokens": 100_000, "padding_side": "left"}),
])
def test_a_rows_value_does_not_depend_on_its_batch(name, model, kwargs, tiny_model_dir, eos_pad_model, tmp_path,
                                                     data, reference_eos):
    """Chat rows end in eos (--append-eos), so a pad token equal to eos would show if it were taken for padding."""
    folder = tiny_model_dir if model == "tiny" else eos_pad_model
    score(folder, data, tmp_path / "out", part_rows=60, per_token=True, append_eos=True, **kwargs)
    table = read_scores(tmp_path / "out").to_pylist()
    assert [r["row"] for r in table] == sorted(reference_eos)
    for record in table:
        expected = reference_eos[record["row"]]
        np.testing.assert_allclose(record["values"], expected, rtol=1e-5, atol=1e-5, err_msg=name)
        assert record["value"] == pytest.approx(float(expected[-1]), rel=1e-5, abs=1e-5)


def test_token_budget_batches_pad_less_than_fixed_batches(tiny_model_dir, data, tmp_path):
    budget = score(tiny_model_dir, data, tmp_path / "a", part_rows=120, batch_tokens=1024)
    fixed = score(tiny_model_dir, data, tmp_path / "b", part_rows=120, fixed_batch_rows=16)
    assert budget["padding_fraction"] < 0.1 and fixed["padding_fraction"] > 3 * budget["padding_fraction"]
    assert budget["tokens"] == fixed["tokens"]


def test_parquet_and_folder_inputs_score_like_jsonl(tiny_model_dir, scored, tmp_path):
    write_parquet(tmp_path / "in" / "0.parquet", ROWS[:50], row_group_size=16)
    write_jsonl(tmp_path / "in" / "1.jsonl", ROWS[50:])
    summary = score(tiny_model_dir, tmp_path / "in", tmp_path / "out", part_rows=32, per_token=True)
    assert summary["rows_read"] == len(ROWS) and len(summary["input"]["files"]) == 2
    got, expected = read_scores(tmp_path / "out"), read_scores(scored[0])
    assert got["row"].to_pylist() == expected["row"].to_pylist()
    assert got["id"].to_pylist() == expected["id"].to_pylist()
    np.testing.assert_allclose(got["value"].to_numpy(), expected["value"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert [e["row"] for e in read_errors(tmp_path / "out")] == sorted(BAD)


def test_resume_scores_only_the_missing_parts_and_repairs_errors(tiny_model_dir, data, scored, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scored[0], out)
    for name in ("part-000000000032-000000000064.parquet", "part-000000000096-000000000120.parquet"):
        (out / name).unlink()
    (out / ".part-000000000000-000000000032.parquet.dead.tmp").write_bytes(b"half a part")
    with open(out / "errors.jsonl", "a") as fh:
        fh.write('{"row": 99, "rea')  # a torn line, as a kill in the middle of an append leaves it
    summary = score(tiny_model_dir, data, out, per_token=True, part_rows=32, batch_tokens=2048, resume=True)
    assert summary["this_run"]["rows"] == 32 + 24 and summary["this_run"]["parts_already_done"] == 2
    assert read_scores(out)["row"].to_pylist() == read_scores(scored[0])["row"].to_pylist()
    assert read_errors(out) == read_errors(scored[0])
    assert not list(out.glob(".*"))
    again = score(tiny_model_dir, data, out, per_token=True, part_rows=32, resume=True)
    assert again["this_run"]["rows"] == 0 and again["rows_scored"] == summary["rows_scored"]


def test_resume_refuses_another_input_model_or_options(tiny_model_dir, tiny_gqa_model_dir, data, scored, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scored[0], out)
    other = write_jsonl(tmp_path / "other.jsonl", ROWS[:-1])
    with pytest.raises(VexportError, match="--resume: .* different input"):
        score(tiny_model_dir, other, out, per_token=True, part_rows=32, resume=True)
    with pytest.raises(VexportError, match="--resume: .* different model"):
        score(tiny_gqa_model_dir, data, out, per_token=True, part_rows=32, resume=True)
    with pytest.raises(VexportError, match="different options .*per_token True then, False now"):
        score(tiny_model_dir, data, out, part_rows=32, resume=True)
    with pytest.raises(OutputExistsError, match="not empty .*--resume .*--force"):
        score(tiny_model_dir, data, out, per_token=True, part_rows=32)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="no run.json"):
        score(tiny_model_dir, data, tmp_path / "foreign", resume=True)
    replaced = score(tiny_model_dir, other, out, part_rows=64, force=True)
    assert replaced["rows_read"] == len(ROWS) - 1 and len(list(out.glob("part-*"))) == 2


def test_strict_stops_at_the_first_bad_row(tiny_model_dir, data, tmp_path):
    first = min(BAD)
    with pytest.raises(VexportError, match=rf"--strict: .*rows.jsonl:{first + 1} \(row {first}\): missing fields"):
        score(tiny_model_dir, data, tmp_path / "out", part_rows=8, strict=True)
    assert len(list((tmp_path / "out").glob("part-*"))) == first // 8  # the windows before it are kept


def test_max_length_rejects_long_rows_and_is_capped_by_the_model(tiny_model_dir, data, tmp_path):
    summary = score(tiny_model_dir, data, tmp_path / "out", max_length=20)
    long_rows = [e for e in read_errors(tmp_path / "out") if "over --max-length 20" in e["reason"]]
    assert long_rows and summary["rows_rejected"] == len(BAD) + len(long_rows)
    assert max(read_scores(tmp_path / "out")["num_tokens"].to_pylist()) <= 20
    with pytest.raises(VexportError, match="--max-length 513 is over the model's max_position_embeddings"):
        score(tiny_model_dir, data, tmp_path / "other", max_length=513)


def test_an_onnx_artifact_is_scored_with_its_manifest_in_the_summary(tiny_model_dir, data, scored, tmp_path):
    from vexport.export.onnx import export_onnx

    artifact = export_onnx(tiny_model_dir, tmp_path / "onnx")
    summary = score(artifact, data, tmp_path / "out", part_rows=64)
    assert summary["model"]["format"] == "onnx" and summary["model"]["manifest"]["format"] == "onnx"
    got, expected = read_scores(tmp_path / "out"), read_scores(scored[0])
    np.testing.assert_allclose(got["value"].to_numpy(), expected["value"].to_numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "spark"}, "--engine must be one of local, ray"),
    ({"batch_tokens": 0}, "--batch-tokens must be at least 1"),
    ({"workers": 2}, "--workers and --ray-address are for --engine ray"),
    ({"part_rows": 0}, "--part-rows must be at least 1"),
])
def test_bad_arguments(tiny_model_dir, data, tmp_path, kwargs, message):
    with pytest.raises(VexportError, match=message):
        score(tiny_model_dir, data, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_output_inside_the_input_folder_is_refused(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", ROWS[:3])
    with pytest.raises(VexportError, match="is inside the input"):
        score(tiny_model_dir, tmp_path / "in", tmp_path / "in" / "scores")
