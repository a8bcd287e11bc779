"""Metadata lives in pyproject.toml. This file only ships csrc/ inside the package, as
prefix_kernels/_csrc/, so that an installed wheel can JIT-build the CUDA kernels
(prefix_kernels/cuda/build.py looks there first, then at the checkout's csrc/)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC_SUFFIXES = {".h", ".cuh", ".cu", ".cpp", ".md"}


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "csrc"
        dst = Path(self.build_lib) / "prefix_kernels" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in CSRC_SUFFIXES:
                shutil.copy2(f, dst / f.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
