"""Builds densenet_efficient._C against the torch already installed.

CUDA sources (csrc/cuda/*.cu) are compiled when torch is a CUDA build and nvcc
is found; DENSENET_EFFICIENT_CUDA=1 forces them on (failing loudly if that is
impossible), DENSENET_EFFICIENT_CUDA=0 forces a CPU-only build.
"""

import glob
import json
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    setting = os.environ.get("DENSENET_EFFICIENT_CUDA", "auto").lower()
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if setting in ("1", "on", "true"):
        if not cuda_possible:
            raise RuntimeError(
                "DENSENET_EFFICIENT_CUDA=1 but CUDA cannot be compiled: "
                f"torch.version.cuda={torch.version.cuda!r}, "
                f"CUDA_HOME={cpp_extension.CUDA_HOME!r}"
            )
        return True
    if setting in ("0", "off", "false"):
        return False
    if setting != "auto":
        raise RuntimeError(f"DENSENET_EFFICIENT_CUDA must be 0, 1 or auto, got {setting!r}")
    return cuda_possible


def _cuda_library_includes():
    """The CUDA library headers (cuBLAS, cuSPARSE, ...) that ATen's CUDA
    context header includes, where pip installed them next to torch: a CUDA
    toolkit may ship nvcc without them."""
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    return sorted(glob.glob(os.path.join(nvidia, "*", "include")))


def _extension():
    # No fused multiply-adds (the kernels round as ATen does, and as the CUDA
    # kernels do); -fno-trapping-math lets the half/bfloat16 conversions'
    # selects vectorise (nothing here reads floating-point exception flags).
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    if _want_cuda() and cuda_sources:
        return cpp_extension.CUDAExtension(
            "densenet_efficient._C",
            sources + cuda_sources,
            include_dirs=_cuda_library_includes(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "densenet_efficient._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


BUILD_INFO = "_build_info.json"


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, which also writes what the extension was built
    against next to it (densenet_efficient/build_info.py reads it): the torch
    version, whether CUDA kernels were compiled, and for which architectures."""

    def run(self):
        super().run()  # builds, and copies in place for editable installs
        for ext in self.extensions:
            cuda = any(source.endswith(".cu") for source in ext.sources)
            flags = cpp_extension._get_cuda_arch_flags() if cuda else []
            info = {
                "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "cuda_kernels": cuda,
                "cuda_architectures": sorted({flag.split("code=")[-1] for flag in flags if "code=" in flag}),
            }
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_INFO)
            with open(path, "w") as f:
                json.dump(info, f, indent=1)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
