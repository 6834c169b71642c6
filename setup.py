"""Build script for came_kernels.

Switches (environment variables):
  CAME_KERNELS_BUILD_CUDA   unset: build the CUDA extension came_kernels._C when torch is a CUDA build and
                            nvcc is found; "0": never build it (CPU-only installs, CI); "1": build it or fail.
  CAME_KERNELS_BUILD_HOST   unset: build came_kernels._host (the fast path's per-step checks in C++, no CUDA;
                            csrc/host/) when torch is importable; "0": never; "1": build it or fail.
  CAME_KERNELS_CUDA_ARCH    compute capabilities to build for, e.g. "8.0;9.0" (default) or "9.0".
  MAX_JOBS                  parallel nvcc jobs (torch's ninja build reads it; default: number of cores).

The CUDA extension needs the torch it will run with, so a GPU build must not use an isolated build env:
    pip install -e . --no-build-isolation
Without it (or on a CPU-only machine) the package installs with the torch and Triton backends only and
one line says why the extension was skipped. The same goes for came_kernels._host, which needs only torch
and a C++ compiler: without it the per-step checks run in Python (the same checks, slower).
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    # pip shows this with -v; it is also printed by `python setup.py ...`.
    print(f"came_kernels setup: {msg}", file=sys.stderr)


def _cuda_extension():
    """Return ([ext], cmdclass) for came_kernels._C, or ([], {}) with a line saying why not."""
    want = os.environ.get("CAME_KERNELS_BUILD_CUDA", "").strip()
    if want == "0":
        _say("skipping the CUDA extension (CAME_KERNELS_BUILD_CUDA=0).")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        reason = (f"torch is not importable in the build environment ({e}); "
                  "use --no-build-isolation to build the CUDA extension")
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif cpp_extension.CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
        else:
            reason = None
    if reason is not None:
        if want == "1":
            raise RuntimeError(f"CAME_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension: {reason}. The torch and Triton backends are installed.")
        return [], {}

    archs = os.environ.get("CAME_KERNELS_CUDA_ARCH", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    gencode = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if a:
            gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    _say(f"building the CUDA extension came_kernels._C for sm {archs} from {len(sources)} sources")
    ext = cpp_extension.CUDAExtension(
        name="came_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std=: torch's cpp_extension adds the standard its headers need (c++20 since torch 2.10;
        # a forced -std=c++17 breaks torch 2.14's headers). Same flags as .ci/check_cuda.sh.
        extra_compile_args={
            "cxx": ["-O3"],
            # No --use_fast_math: rsqrt/division must stay IEEE-accurate for parity with the torch backend.
            "nvcc": ["-O3", "-lineinfo"] + gencode,
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _host_extension():
    """Return [ext] for came_kernels._host (C++, no CUDA), or [] with a line saying why not."""
    want = os.environ.get("CAME_KERNELS_BUILD_HOST", "").strip()
    if want == "0":
        _say("skipping came_kernels._host (CAME_KERNELS_BUILD_HOST=0).")
        return []
    try:
        from torch.utils import cpp_extension
    except ImportError as e:
        if want == "1":
            raise RuntimeError(f"CAME_KERNELS_BUILD_HOST=1 but torch is not importable: {e}") from None
        _say(f"skipping came_kernels._host: torch is not importable in the build environment ({e}); use "
             "--no-build-isolation to build it. The per-step checks run in Python.")
        return []
    _say("building came_kernels._host (the fast path's per-step checks)")
    return [cpp_extension.CppExtension(name="came_kernels._host", sources=["csrc/host/fast_checks.cpp"],
                                       extra_compile_args=["-O2"], py_limited_api=False, optional=want != "1")]


def _host_is_optional(cmdclass: dict) -> dict:
    """build_ext that lets came_kernels._host fail to build (no C++ compiler, say) with a line saying so,
    unless CAME_KERNELS_BUILD_HOST=1: the package works without it."""
    from torch.utils import cpp_extension
    base = cmdclass.get("build_ext") or cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # ninja's failures are RuntimeErrors, which setuptools' optional misses
                if ext.name != "came_kernels._host" or os.environ.get("CAME_KERNELS_BUILD_HOST") == "1":
                    raise
                _say(f"came_kernels._host did not build ({type(e).__name__}: {e}); the per-step checks run in "
                     "Python")

    return {"build_ext": BuildExt}


ext_modules, cmdclass = _cuda_extension()
host = _host_extension()
if host:
    ext_modules = ext_modules + host
    cmdclass = _host_is_optional(cmdclass)

setup(
    name="came_kernels",
    version="0.1.0",
    description="Fused CAME optimizer for PyTorch (torch, Triton and CUDA backends)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live in the top-level folder triton_kernels/ but install as
    # came_kernels.triton_kernels: a top-level `triton_kernels` would collide with the Triton project's own.
    packages=["came_kernels", "came_kernels.backends", "came_kernels.triton_kernels"],
    package_dir={"came_kernels.triton_kernels": "triton_kernels"},
    package_data={"came_kernels.backends": ["README.md"]},
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "came-pytorch==0.1.3", "numpy", "triton; platform_system == 'Linux'"],
        "bench": ["matplotlib", "tqdm", "came-pytorch==0.1.3", "numpy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
