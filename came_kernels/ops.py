"""The fused step as a PyTorch custom op, so torch.compile can see what it mutates.

The fused backends write params and states through addresses kept in device tables, which neither dynamo
nor functionalization can follow. Under torch.compile, `functional.came` therefore calls the fused backends
through one opaque op, `came_kernels::fused_step`, whose schema names every list it mutates (params,
momentum and statistics) and whose fake kernel does nothing (the op returns nothing and changes no shape).
Outside torch.compile the backends are called directly: an op dispatch per group would only add host time.

The torch backend is never wrapped: it is plain tensor code, so torch.compile traces and fuses it.

Backend caches (device tables): in eager mode the optimizer owns one per param group. Inside a compiled
graph there is no Python object to carry it, so the op keeps its own, keyed by the backend, the device, the
parameters' structure and their addresses (which do not move during training; if they do, the backend
rebuilds its tables, as it does for a moved grad). The few most recent keys are kept (_cache_for).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

import torch
from torch import Tensor

from .backends import get_step_fn

__all__ = ["fused_step", "call_fused_step"]

_MAX_CACHES = 16   # param sets (by their structure) with caches
_PER_SET = 2       # caches per structure: by the params' addresses
_caches: "OrderedDict[tuple, OrderedDict]" = OrderedDict()


def _cache_for(backend: str, params: List[Tensor]) -> dict:
    """The backend cache of these params: by their structure, then by their addresses. Without Inductor's
    reinplacing (backend="aot_eager", say), the compiled graph hands the op fresh copies of the mutated
    tensors at every step; a backend cache keeps its tensors alive, so copies of a whole model's params and
    states must not pile up under new addresses: at most _PER_SET caches live per structure."""
    skey = (backend, str(params[0].device), params[0].dtype, len(params), tuple(params[0].shape),
            tuple(params[-1].shape))
    key = tuple(p.data_ptr() for p in params)
    entries = _caches.pop(skey, None)
    if entries is None:
        entries = OrderedDict()
        while len(_caches) >= _MAX_CACHES:
            _caches.popitem(last=False)
    cache = entries.pop(key, None)
    if cache is None:
        cache = {}
        while len(entries) >= _PER_SET:
            entries.popitem(last=False)
    entries[key] = cache
    _caches[skey] = entries
    return cache


def _spread(params: List[Tensor], packed: List[Tensor], factored: bool) -> List[Optional[Tensor]]:
    """Back to the backend contract's aligned lists: packed[k] belongs to the k-th param that is factored
    (or not), every other entry is None."""
    it = iter(packed)
    return [next(it) if (p.dim() >= 2) == factored else None for p in params]


# The statistics travel packed, without the contract's None entries: a mutated list may not hold None
# (auto_functionalize fails on it), so the row and column lists hold those of factored tensors only and
# `exp_avg_sqs` those of the others, each in param order.
@torch.library.custom_op(
    "came_kernels::fused_step",
    mutates_args=("params", "exp_avgs", "exp_avg_sq_rows", "exp_avg_sq_cols", "exp_avg_res_rows",
                  "exp_avg_res_cols", "exp_avg_sqs"),
)
def fused_step(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sq_rows: List[Tensor],
    exp_avg_sq_cols: List[Tensor],
    exp_avg_res_rows: List[Tensor],
    exp_avg_res_cols: List[Tensor],
    exp_avg_sqs: List[Tensor],
    lr: Optional[Tensor],
    lr_value: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    weight_decay: float,
    maximize: bool,
    backend: str,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    bias_scales: Optional[Tensor] = None,
) -> None:
    """One CAME step of one (device, dtype) group on fused backend `backend` (the backend contract's
    `came_step`, statistics packed as above); lr is the 0-d tensor `lr` when given, else `lr_value`."""
    if not params:
        return
    if backend == "cuda" and params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        # (torch.compile's mode="reduce-overhead" captures compiled steps.) The extension checks the grads
        # and uploads their addresses on the host at every step: a replayed graph would skip all of it.
        raise RuntimeError("came_kernels: backend='cuda' cannot run inside a CUDA graph; use backend='triton' "
                           "(with capturable=True) to capture the optimizer step")
    step_fn = get_step_fn(backend, params[0].device)
    step_fn(params, grads, exp_avgs, _spread(params, exp_avg_sq_rows, True),
            _spread(params, exp_avg_sq_cols, True), _spread(params, exp_avg_res_rows, True),
            _spread(params, exp_avg_res_cols, True), _spread(params, exp_avg_sqs, False),
            lr=lr_value if lr is None else lr, beta1=beta1, beta2=beta2, beta3=beta3, eps1=eps1, eps2=eps2,
            clip_threshold=clip_threshold, weight_decay=weight_decay, maximize=maximize,
            cache=_cache_for(backend, params), **_optional(grad_scale=grad_scale, found_inf=found_inf,
                                                            bias_scales=bias_scales))


def _optional(**kwargs) -> dict:
    """The keyword arguments that are set: a backend that lacks a feature is never passed its None."""
    return {k: v for k, v in kwargs.items() if v is not None}


@fused_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_res_rows, exp_avg_res_cols,
      exp_avg_sqs, lr, lr_value, beta1, beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize,
      backend, grad_scale=None, found_inf=None, bias_scales=None) -> None:
    return None


def call_fused_step(lists, lr, backend: str, grad_scale=None, found_inf=None, bias_scales=None,
                    **hyper) -> None:
    """`fused_step` on the backend contract's aligned lists (with their None entries)."""
    params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs = lists
    pack = lambda xs: [x for x in xs if x is not None]  # noqa: E731
    is_t = isinstance(lr, Tensor)
    fused_step(params, grads, exp_avgs, pack(rows), pack(cols), pack(res_rows), pack(res_cols), pack(sqs),
               lr if is_t else None, 0.0 if is_t else float(lr), backend=backend, grad_scale=grad_scale,
               found_inf=found_inf, bias_scales=bias_scales, **hyper)
