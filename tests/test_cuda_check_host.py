"""csrc/check.h, the extension's argument checks, proven on the CPU.

The checks build their messages without iostreams (see check.h: TORCH_CHECK's ostringstream can take the
process down where the extension and torch were built with different toolchains) and raise c10::Error, as
TORCH_CHECK does. Here check.h is compiled with g++ against torch's headers and libc10, and every argument
type the checks format is rendered; what the ops raise on a GPU is tested in test_cuda_backend.py.
"""
import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++ not on PATH, CXX unset): cannot build the host check test")
    out = tmp_path_factory.mktemp("check_host") / "check_host.so"
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cmd = ([CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}/csrc"]
           + [f"-I{p}" for p in cpp_extension.include_paths()]
           + [f"{ROOT}/tests/cuda_host/check_host.cpp", f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}",
              "-o", str(out)])
    subprocess.run(cmd, check=True)
    so = ctypes.CDLL(str(out))
    so.came_check_demo.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    return so


def _call(lib, which):
    buf = ctypes.create_string_buffer(2048)
    rc = lib.came_check_demo(which, buf, len(buf))
    return rc, buf.value.decode()


def test_a_failing_check_raises_c10_error_with_every_argument_rendered(lib):
    rc, msg = _call(lib, 0)
    assert rc == 1, msg
    assert msg.startswith("came_kernels: grads[3] is Double of shape [2, 3] on cuda:1 and cpu, got -5 7 0.25 true "
                          "[2, 3]"), msg


def test_a_passing_check_builds_no_message(lib):
    assert _call(lib, 1) == (0, "built 0")


def test_the_extension_checks_only_through_came_check():
    # TORCH_CHECK with formatted arguments is what check.h avoids; only check.h itself may use it.
    found = []
    for folder, _, names in os.walk(os.path.join(ROOT, "csrc")):  # csrc/host/ too
        for name in sorted(names):
            if name != "check.h":
                text = open(os.path.join(folder, name)).read()
                found += [f"{name}: {m}" for m in re.findall(r"\bTORCH_CHECK\w*\(", text)]
    assert not found, found
