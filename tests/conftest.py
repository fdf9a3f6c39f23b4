"""Shared fixtures. Tiny value models are built once per session from a config: nothing is downloaded.

Under pytest-xdist (pyproject's addopts run 2 workers) each test file runs whole on one worker, so its module
fixtures are built once; every file that uses Ray runs on the same worker ("ray" group), so two local Ray
instances never compete for the 2 cores. Costly models (the trained SmolLM2 value model, the medium model of
the kill tests) are built once per run for all workers (`build_once`).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

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

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_TORCH_THREADS = torch.get_num_threads()

# a test file that imports Ray (or skips without it) runs in the "ray" group
_USES_RAY = re.compile(r"^\s*(?:import ray\b|from ray\b)|importorskip\(\s*['\"]ray['\"]", re.MULTILINE)


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """BUILD(folder) once per test run, shared by every xdist worker: the folder NAME in the run's base temp
    (the parent of the workers' own), behind a file lock. Tests must treat it as read-only."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way on another worker
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="module", autouse=True)  # before the file's own module fixtures
def _torch_threads(request):
    """With several xdist workers on the cores, one torch thread per worker, except in the Ray files: they are
    the longest unit of work, so they keep every thread (the scheduler shares the CPUs out by thread)."""
    if _WORKERS > 1:
        torch.set_num_threads(_TORCH_THREADS if _uses_ray(request.path) else 1)


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for one test file (2 CPUs, no dashboard), shut down after it; its GCS address."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_model_dir(tmp_path_factory):
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(tmp_path_factory.mktemp("models") / "tiny-gqa", seed=1, gqa=True)


@pytest.fixture(scope="session")
def medium_model_dir(tmp_path_factory):
    """tests/scoring_helpers.make_medium_model: slow enough that a kill lands while windows remain."""
    from tests.scoring_helpers import make_medium_model

    return build_once(tmp_path_factory, "medium", make_medium_model)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """The value model on the trained SmolLM2-135M backbone (vexport.trained; needs the `trained` extra)."""
    from vexport.trained import make_trained_value_model

    return build_once(tmp_path_factory, "smollm2-value", make_trained_value_model)


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _uses_ray(path: Path, seen: dict[Path, bool] = {}) -> bool:  # noqa: B006 - a cache
    if path not in seen:
        try:
            seen[path] = bool(_USES_RAY.search(path.read_text(encoding="utf-8")))
        except OSError:
            seen[path] = False
    return seen[path]


# the libraries vexport leans on: CI installs the newest releases in range, so a break caused by a new upstream
# release shows in the first lines of a log (transformers 5.25 brought Hugging Face's `kernels`, issue 27)
_LEANED_ON = ("torch", "transformers", "tokenizers", "kernels", "onnx", "onnxruntime", "triton", "ray", "fastapi",
              "uvicorn", "pyarrow")


def pytest_report_header(config):
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return "installed: " + ", ".join(f"{name} {installed(name)}" for name in _LEANED_ON)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup, grouped by file: each test file is one unit of work (its module fixtures are built once),
    and all the files that use Ray are one unit. (pytest 9 keeps node ids where xdist 3.8's xdist_group
    marks cannot add their suffix, so the groups are decided here, from the node ids.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):  # an xdist_group mark, where xdist can honour it
                return nodeid.split("@")[-1]
            return "ray" if _uses_ray(config.rootpath / _file(nodeid)) else _file(nodeid)

    config.option.loadscopereorder = False  # keep the collection order below: the slowest files first
    return FileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # xdist hands out the units in collection order: the Ray files first (the longest unit), then the files
        # with the most `slow` tests, so that no long unit is left to run alone at the end (a stable sort: the
        # same order on every worker)
        slow: dict[str, int] = {}
        for item in items:
            slow[_file(item.nodeid)] = slow.get(_file(item.nodeid), 0) + ("slow" in item.keywords)
        items.sort(key=lambda item: (not _uses_ray(item.path), -slow[_file(item.nodeid)]))
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
