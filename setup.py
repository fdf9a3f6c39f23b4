"""Package discovery and one build step (the metadata lives in pyproject.toml).

Every package under ``vexport/`` is found, not listed, so a new subpackage ships in the wheel without an edit
here. The Triton kernels sit in the top-level ``kernels/`` folder, which is not a package (see
``vexport/kernels/__init__.py``); ``build_py`` copies its modules into ``vexport/kernels`` of the build.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

KERNELS = Path(__file__).parent / "kernels"


class BuildWithKernels(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reaches kernels/ through vexport.kernels.__path__
            return
        target = Path(self.build_lib, "vexport", "kernels")
        self.mkpath(str(target))
        for module in sorted(KERNELS.glob("*.py")):
            self.copy_file(str(module), str(target / module.name))


setup(packages=find_packages(include=["vexport", "vexport.*"]), cmdclass={"build_py": BuildWithKernels})
