"""Shared fixtures. Tiny value models are built once per session from a config: nothing is downloaded."""

from __future__ import annotations

import os

# Triton kernels run on the CPU under the interpreter when there is no GPU; this must be set before
# anything imports triton.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_model_dir(tmp_path_factory):
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(tmp_path_factory.mktemp("models") / "tiny-gqa", seed=1, gqa=True)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
