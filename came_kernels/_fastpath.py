"""The per-step checks of the steady-state fast path, one call per list.

A fused step keeps device tables between steps (CAME._unchanged, triton_backend._steady), so every step
compares what they address with the last fully validated step: the grads' types, dtypes, devices, shapes,
contiguity and addresses, the addresses (and the params' strides) of the params and state, and the
optimizer's state dicts by identity (CAME._state_unchanged). In Python that is one C-level call per tensor
and fact, about 0.1 us each: 0.25 ms a step for 200 params. The extension `came_kernels._host`
(csrc/host/fast_checks.cpp, built wherever torch is importable at build time) reads the same facts in one
call per list; without it these functions return what the Python getters return. Either way a result is
compared with a result of the same function for the same tensors (a tuple and bytes never compare equal:
the table is then uploaded again, which is only slower).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

try:
    from . import _host as _native
except ImportError:  # not built (an install with build isolation, or no C++ compiler): the Python getters
    _native = None
if _native is not None and _native.torch_version != torch.__version__.split("+")[0]:
    # It reads torch's tensors through torch's inline header code: another torch's layout would be misread.
    warnings.warn(f"came_kernels._host was built against torch {_native.torch_version}, not this torch "
                  f"{torch.__version__}: the fast path's checks run in Python until it is rebuilt "
                  "(pip install --no-build-isolation --no-deps -e .)", RuntimeWarning, stacklevel=2)
    _native = None


def native() -> bool:
    """Whether the checks run in C++ (came_kernels._host is built)."""
    return _native is not None


def grads(params: Sequence[Tensor]) -> Optional[tuple]:
    """(grads, kinds, ptrs, contiguous) of the params (csrc/host/fast_checks.cpp), or None when the extension
    is not built or some param or grad is not a plain strided tensor: then the caller's Python path decides.
    grads: the grads that are not None, in order; kinds: bytes, equal between two calls exactly when the
    same params have grads of the same dtype, device and shape; ptrs: bytes of their addresses;
    contiguous: whether all of them are contiguous."""
    return None if _native is None else _native.grads(params)


def ptrs(tensors: Sequence[Tensor]):
    """The tensors' data_ptr()s, as bytes (C++) or a tuple of ints."""
    out = None if _native is None else _native.ptrs(tensors)
    return tuple(map(Tensor.data_ptr, tensors)) if out is None else out


def strides(tensors: Sequence[Tensor]):
    """The tensors' strides, as bytes (C++: ndim, then the strides, per tensor) or a tuple of tuples."""
    out = None if _native is None else _native.strides(tensors)
    return tuple(map(Tensor.stride, tensors)) if out is None else out


def same_state(state: dict, keys: list, values: list) -> Optional[bool]:
    """Whether `state` (param -> dict) holds the params `keys` in order, each with the very entries of the
    dict in `values` (csrc/host/fast_checks.cpp); None when the extension is not built."""
    return None if _native is None else _native.same_state(state, keys, values)
