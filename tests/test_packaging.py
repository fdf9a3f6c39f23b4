"""What users install is a wheel: it must hold every subpackage, and the installed `vexport` command must run.

The wheel is built from this checkout, installed without `-e` into a fresh virtual environment, and the
`vexport` console script of that environment exports, checks and scores a tiny model. The fresh environment
borrows the third-party dependencies of the test environment through a path file (installing torch and
transformers again would take minutes); vexport itself comes only from the wheel, which the test proves by
where `import vexport` resolves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def source_packages() -> set[str]:
    """Every folder under vexport/ with an __init__.py, named as it installs."""
    found = {".".join(("vexport", *p.parent.relative_to(REPO / "vexport").parts))
             for p in (REPO / "vexport").rglob("__init__.py")}
    return {name for name in found if "__pycache__" not in name}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # from a copy without build outputs: a stale build/lib would hide a package that the wheel leaves out
    source = tmp_path_factory.mktemp("source") / "vexport"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "artifacts", ".whl", ".gl"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("vexport-*.whl")
    return path


def test_wheel_holds_every_subpackage_and_the_data_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = source_packages() - shipped
    assert not missing, f"packages with an __init__.py that the wheel leaves out: {sorted(missing)}"
    kernels = {Path(n).name for n in names if n.startswith("vexport/kernels/")}
    assert {p.name for p in (REPO / "kernels").glob("*.py")} <= kernels, kernels  # copied in by setup.py
    data = {Path(n).name for n in names if n.startswith("vexport/data/")}
    assert {p.name for p in (REPO / "vexport" / "data").iterdir() if p.is_file()} <= data
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no -e), dependencies borrowed from this environment."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=300)
    return venv


def clean_env() -> dict[str, str]:
    """This environment without what would put a source checkout on the installed interpreter's path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run_installed(venv: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "vexport"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**clean_env(), "COLUMNS": "200", "NO_COLOR": "1"}, timeout=600)


def test_the_installed_command_exports_checks_and_scores(installed, tiny_model_dir, tmp_path):
    python = installed / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import vexport, vexport.scoring, vexport.kernels; "
                            "print(vexport.__file__)"], capture_output=True, text=True, cwd=tmp_path, check=True,
                           env=clean_env())
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout  # the wheel, not the checkout

    exported = run_installed(installed, "export", tiny_model_dir, "--format", "onnx", "--output", tmp_path / "onnx",
                             cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    checked = run_installed(installed, "check", tmp_path / "onnx", "--reference", tiny_model_dir, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": f"row {i} " * (i + 1)}) + "\n" for i in range(6)))
    scored = run_installed(installed, "score", tmp_path / "onnx", "--input", rows, "--output", tmp_path / "scores",
                           cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert "scored 6 rows" in scored.stdout
