"""The checkout root on sys.path never shadows an installed distribution (issue 27).

`python -m pytest`, `python -c` and Ray workers started in the checkout put its root first on sys.path. A
top-level regular package or module there whose import name an installed distribution owns is found instead
of that distribution: the repository's old `kernels/__init__.py` hid Hugging Face's `kernels`, which
transformers 5.25 imports with its modelling code, and every test that touched transformers failed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def importable_at_root() -> dict[str, str]:
    """Top-level names the root makes importable as a package or module, with the file that provides each."""
    names = {}
    for entry in REPO.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            names[entry.name] = f"{entry.name}/__init__.py"
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            names[entry.name.split(".")[0]] = entry.name
    return names


# A distribution that ships its own test suite as a top-level `tests` package (a packaging slip: OpenRLHF 0.11.2,
# which the drop-in tests install, does) owns no real import name: there our tests/ must win, not lose.
TEST_SUITES = {"tests"}


def test_no_top_level_package_or_module_has_the_import_name_of_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    ours = {"vexport"}
    clashes = {name: (where, owners[name]) for name, where in importable_at_root().items()
               if name in owners and not set(owners[name]) <= ours and name not in TEST_SUITES}
    assert not clashes, f"these would shadow installed distributions from the checkout root: {clashes}"


def test_tests_is_a_regular_package_that_wins_over_an_installed_tests_package():
    assert "tests" in importable_at_root()
    probe = "import tests.helpers, sys; print(tests.helpers.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert where.stdout.strip() == str(REPO / "tests" / "helpers.py")


def test_with_the_root_first_on_sys_path_every_installed_name_resolves_outside_the_checkout():
    """A folder without __init__.py (kernels/) is a namespace portion: a regular package later on the path wins."""
    owners = importlib.metadata.packages_distributions()
    candidates = sorted({p.name.split(".")[0] for p in REPO.iterdir() if not p.name.startswith(".")} & set(owners)
                        - {"vexport"} - TEST_SUITES)
    probe = ("import importlib.util, json, sys; "
             f"print(json.dumps({{n: getattr(importlib.util.find_spec(n), 'origin', None) for n in {candidates!r}}}))")
    where = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    found = json.loads(where.stdout)
    # the checkout's own entry, not a virtual environment that may sit inside it (.ci/run makes .venv there)
    inside = {name: origin for name, origin in found.items()
              if origin is None or Path(origin).is_relative_to(REPO / name) or Path(origin).parent == REPO}
    assert not inside, f"found in the checkout instead of the installed distribution: {inside}"


def test_transformers_modelling_code_and_a_value_model_load_from_the_checkout_root(tiny_model_dir):
    """As `python -m pytest` and `python -c` have it: the root first on sys.path, transformers imported whole."""
    script = (
        "import sys, torch; assert sys.path[0] == '', sys.path[:2]\n"
        "import transformers.models.llama.modeling_llama\n"
        "import transformers.integrations.hub_kernels\n"
        "import vexport, vexport.kernels.reference as ref\n"
        f"model = vexport.load({str(tiny_model_dir)!r})\n"
        "ids = torch.tensor([[1, 5, 9, 13]])\n"
        "values = model.values(ids, torch.ones_like(ids))\n"
        "assert values.shape == (1, 4) and torch.isfinite(values).all()\n"
        "print(ref.__file__)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(REPO / "kernels")), run.stdout
