"""Triton kernels (``value_head``, ``int4_matmul``) with their torch references (``reference``).

Their sources live in the repository's top-level ``kernels/`` folder, which is deliberately not a Python
package: with an ``__init__.py`` there, ``import kernels`` from the checkout root (``python -m pytest``,
``python -c``, Ray workers started there) would find it instead of Hugging Face's ``kernels`` distribution,
which transformers imports. A wheel carries the modules in this folder (setup.py's ``build_py`` copies them
in); a checkout, or an editable install of one, reaches them through ``__path__`` below.
"""

from pathlib import Path

_HERE = Path(__file__).parent
_CHECKOUT = _HERE.parent.parent / "kernels"
if not (_HERE / "reference.py").exists() and (_CHECKOUT / "reference.py").exists():
    __path__.append(str(_CHECKOUT))
