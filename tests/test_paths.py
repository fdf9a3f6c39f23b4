"""vexport/paths.py: an output that is, holds or sits inside an input is refused, through links too."""

from __future__ import annotations

import pytest

from vexport.paths import OutputOverlapError, overlap, refuse_overlap


def test_overlap_kinds(tmp_path):
    model = tmp_path / "runs" / "model"
    model.mkdir(parents=True)
    (tmp_path / "link").symlink_to(model)
    assert overlap(model, model) == "is"
    assert overlap(tmp_path / "link", model) == "is"
    assert overlap(model / ".." / "model", model) == "is"
    assert overlap(tmp_path / "runs", model) == "contains"
    assert overlap(tmp_path, model) == "contains"
    assert overlap(model / "out", model) == "is inside"
    assert overlap(tmp_path / "runs" / "model-onnx", model) is None
    assert overlap(tmp_path / "runs" / "other", model) is None


def test_refuse_names_output_and_input(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    with pytest.raises(OutputOverlapError, match=r"--output .* contains the input .*m"):
        refuse_overlap(tmp_path, [model])
    refuse_overlap(tmp_path / "elsewhere", [model, None, "org/hub-id"])   # apart, absent, hub id: fine
