"""Package discovery (the metadata lives in pyproject.toml).

Every package under ``vexport/`` is found, not listed, so a new subpackage ships in the wheel without an edit
here; ``kernels/`` sits at the top of the repository and installs as ``vexport.kernels``.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["vexport", "vexport.*"]), "vexport.kernels"])
