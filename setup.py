"""Builds ``t3d_kernels._C``: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is
found (or FORCE_CUDA=1), as torchvision does. Install with ``pip install --no-build-isolation -e .`` so the
torch already installed is used (build isolation would download another torch)."""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extensions():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # at::parallel_for is a header template: with torch's OpenMP backend it only runs in parallel when the
    # extension itself is compiled with -fopenmp (libgomp.so.1 then resolves to the copy torch already loaded)
    cxx = ["-O3", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
    define_macros = []
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    if os.environ.get("T3D_NO_CUDA", "0") == "1":
        use_cuda = False
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )
    if use_cuda:
        define_macros.append(("WITH_CUDA", None))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        return [
            CUDAExtension("t3d_kernels._C", sources + _sources("csrc/cuda/*.cu"), define_macros=define_macros, **kwargs)
        ]
    return [CppExtension("t3d_kernels._C", sources, define_macros=define_macros, **kwargs)]


setup(
    # benchmarks/ stays where a checkout has it (``python -m benchmarks``) but installs under the project's own
    # name: a top-level ``benchmarks`` package would collide with any other project's
    packages=find_packages(include=["t3d_kernels", "t3d_kernels.*", "t3d", "t3d.*"]) + ["t3d_benchmarks"],
    package_dir={"t3d_benchmarks": "benchmarks"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
