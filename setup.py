"""Builds lmsqueeze._C from csrc/ against the installed torch.

C++ sources always (OpenMP; the AVX-512 paths carry their own target attributes and are chosen at
run time, so a wheel built on one x86 machine runs on another); CUDA sources only when torch has
CUDA and nvcc is on PATH. LMSQUEEZE_NO_EXT=1 builds no extension: every op then uses its reference.
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("LMSQUEEZE_NO_EXT", "0") == "1":
        print("lmsqueeze: LMSQUEEZE_NO_EXT=1, building no extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    define = []
    with_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        define.append(("LMSQUEEZE_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx + ["-DLMSQUEEZE_WITH_CUDA"], "nvcc": ["-O3", "-DLMSQUEEZE_WITH_CUDA", "--use_fast_math"]}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    ext = ext_cls(
        name="lmsqueeze._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
