"""Build hook: the CUDA kernel sources in ``native/`` ship inside the wheel, as ``kvtier/_kernels/*.cu``.

``kvtier.native`` looks for a kernel there first (an installed wheel has no ``native/`` beside the package)
and then in the source tree's ``native/`` (an editable install, a checkout on ``PYTHONPATH``). Everything
else about the package is in ``pyproject.toml``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_DIRECTORY = Path(__file__).resolve().parent / "native"


class BuildWithKernels(build_py):
    """``build_py`` that also copies ``native/*.cu`` into the built package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "kvtier" / "_kernels"
        self.mkpath(str(target))
        for source in sorted(KERNEL_DIRECTORY.glob("*.cu")):
            self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildWithKernels})
