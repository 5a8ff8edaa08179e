"""Builds the optional C++ (and CUDA) extension from csrc/; everything else is in pyproject.toml.

The extension `realflow.parallel._interval_ops` needs torch at build time, so install with
`pip install --no-build-isolation -e .` after torch (the Makefile does). Without torch, without
a compiler, or when compiling fails, the install still succeeds with no extension and realflow
uses the pure-torch fallback (realflow/parallel/ops.py). REALFLOW_NO_CSRC=1 skips the build.
The CUDA kernel is added when torch was built with CUDA and nvcc is found (CUDA_HOME).
"""

import os
import sys

from setuptools import setup

EXT_NAME = "realflow.parallel._interval_ops"


def _extensions():
    if os.environ.get("REALFLOW_NO_CSRC") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "realflow: torch is not importable at build time; skipping the csrc extension "
            "(install torch first and use pip install --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}

    class OptionalBuildExt(BuildExtension):
        """A failed compile leaves the extension out instead of failing the install."""

        def build_extensions(self):
            built = []
            for ext in list(self.extensions):
                self.extensions = [ext]
                try:
                    super().build_extensions()
                    built.append(ext)
                except Exception as e:  # noqa: BLE001 - any compiler failure: no extension
                    print(
                        f"realflow: building {ext.name} failed ({e}); realflow will use the "
                        "pure-torch fallback",
                        file=sys.stderr,
                    )
            self.extensions = built  # editable installs copy only what was built

    args = {"cxx": ["-O3"]}
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext = CUDAExtension(
            EXT_NAME,
            ["csrc/interval_ops.cpp", "csrc/interval_ops_cuda.cu"],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={**args, "nvcc": ["-O3"]},
        )
    else:
        ext = CppExtension(EXT_NAME, ["csrc/interval_ops.cpp"], extra_compile_args=args)
    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
