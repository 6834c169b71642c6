"""Backend registry: which implementations of `came_step` exist, and which one runs on a device.

Each backend module implements the contract in README.md beside this file. They are imported lazily, so
a broken or missing optional dependency (triton, the compiled extension) only matters when that backend is
asked for, and then the error says why and how to get it.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")

_MODULES = {
    "torch": "came_kernels.backends.torch_backend",
    "triton": "came_kernels.backends.triton_backend",
    "cuda": "came_kernels.backends.cuda_backend",
}


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why and how to get it."""


def _module(name: str):
    return importlib.import_module(_MODULES[name])


# Availability cannot change within a process, and step() asks every call. A plain dict rather than
# functools.lru_cache: torch.compile traces a dict lookup, but not the import behind a cache miss (the
# optimizer resolves its backends when it is built, so a compiled step only ever hits).
_REASONS: dict = {}
_STEP_FNS: dict = {}


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend `name` can run on tensors on `device`, else a sentence saying why not."""
    key = (name, str(torch.device(device)))
    if key not in _REASONS:
        _REASONS[key] = _unavailable_reason(*key)
    return _REASONS[key]


def _unavailable_reason(name: str, device: str) -> Optional[str]:
    if name not in _MODULES:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    try:
        mod = _module(name)
    except Exception as e:  # report, never crash: the reason is the product here
        return f"importing {_MODULES[name]} failed: {type(e).__name__}: {e}"
    return mod.unavailable_reason(torch.device(device))


def available_backends(device="cpu") -> dict:
    """Map every backend name to None (usable on `device`) or the reason it is not."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def default_backend(device: torch.device, fused_only: bool = False) -> str:
    """The backend "auto" means on `device`.

    CUDA tensors: the compiled extension when it was built, else Triton. Both are fused (4 passes over each
    tensor, a handful of launches per step); the extension needs no JIT warm-up. CPU tensors: the torch
    backend, even when TRITON_INTERPRET=1 makes Triton runnable there, because the interpreter exists to
    check kernels, not to train.
    """
    device = torch.device(device)
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if unavailable_reason(name, device) is None:
                return name
    if fused_only:
        def why(n):
            r = unavailable_reason(n, device)
            if r is None:  # only Triton on CPU tensors under TRITON_INTERPRET=1 gets here
                return ("its kernels run on CPU tensors only through Triton's interpreter, which checks them but "
                        "is far too slow to train with (pass backend='triton' to use it anyway)")
            return r
        reasons = "; ".join(f"{n}: {why(n)}" for n in ("cuda", "triton"))
        raise BackendUnavailableError(
            f"fused=True needs a fused backend for {device.type} tensors, and none can train on them ({reasons}); "
            f"use the torch backend (fused=None or False) for {device.type} tensors")
    return "torch"


def get_step_fn(name: str, device: torch.device) -> Callable:
    """The `came_step` of backend `name`, or BackendUnavailableError saying why and how to get it."""
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={name!r} cannot run on {torch.device(device)} tensors: {reason}")
    if name not in _STEP_FNS:  # imported once (unavailable_reason did); a dict hit afterwards, also when compiled
        _STEP_FNS[name] = _module(name).came_step
    return _STEP_FNS[name]
