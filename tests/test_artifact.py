"""Output folders appear whole or not at all."""

from __future__ import annotations

import pytest

from vexport.artifact import staging_dir
from vexport.errors import OutputExistsError

ARTIFACT_MANIFEST = '{"manifest_version": 1, "format": "onnx"}'  # what makes a folder replaceable by --force


def test_success_renames_into_place(tmp_path):
    with staging_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing_and_keeps_old_output(tmp_path, error):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "out" / "manifest.json").write_text(ARTIFACT_MANIFEST)
    with pytest.raises(error):
        with staging_dir(tmp_path / "out", force=True) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 10)
            raise error()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "old.txt").read_text() == "old"


def test_existing_output_refused_before_work(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        with staging_dir(tmp_path / "out"):
            pytest.fail("the block must not run")


def test_force_replaces(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "out" / "manifest.json").write_text(ARTIFACT_MANIFEST)
    with staging_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
