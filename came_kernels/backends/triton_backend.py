"""The Triton backend: `came_step` on the fused multi-tensor kernels of `came_kernels.triton_kernels`.

Same contract as the torch backend (backends/README.md). One call runs, for one (device, dtype) group:

    sq_stats      _sq_stats_kernel + _sq_finalize_kernel          g^2 statistics and the clip's sums
    clip_stats    [_clip_stats_kernel +] _clip_finalize_kernel    RMS clip divisor per tensor
    momentum_res  _momentum_res_kernel + _res_finalize_kernel     momentum, confidence statistics
    param_step    _param_step_kernel                              the parameter update

6 launches for the whole group (one more when some matrix has rows of 4097-8192 elements: phase 1's widest
in-register body runs alone; one more when some has rows wider than NPAD_MAX, or for sharded tensors: then
_clip_stats_kernel reads their g again), on the params' GPU whatever the current device is, about 28 B of
traffic per fp32 parameter, no host sync (lr is read on the device), deterministic (fixed-order sums). The device
tables are built once per parameter set and kept in the `cache` dict the optimizer passes; only the grad
addresses are re-uploaded when grads move.

On CPU tensors the kernels run through Triton's interpreter, which must be switched on with
TRITON_INTERPRET=1 before triton is imported: that is how CI tests them without a GPU.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
import os
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _fastpath
from ._contiguous import (CheckedGrads, amp_flags, check_bias_scales, check_rng, check_sizes, contiguous_lists,
                          lr_tensor, write_back_)

__all__ = ["came_step", "unavailable_reason"]

# Tests set this to fill the workspace and stats with NaN before every step, so an element no kernel wrote
# shows up as NaN in the result instead of reading a stale value.
POISON_SCRATCH = False

_import_error: Optional[BaseException] = None
try:
    import triton  # noqa: F401  (the import error, if any, is the reason to report)
    from came_kernels import triton_kernels as _tk
except Exception as e:  # ImportError, or a triton that cannot initialize
    _tk = None
    _import_error = e


def unavailable_reason(device: torch.device) -> Optional[str]:
    if _tk is None:
        return (f"triton could not be imported ({type(_import_error).__name__}: {_import_error}); "
                "install it with `pip install triton` (Linux)")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no GPU or driver)"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set: Triton would interpret, not compile, for CUDA tensors"
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported (it checks the kernels; use backend='torch' to train on the CPU)")
    return f"Triton kernels run on CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), got {device.type}"


def _device_guard(device: torch.device):
    """Make the params' GPU the current one around the launches: Triton launches on the current CUDA device
    (and its current stream), not on the device of the pointers it is given. A no-op for CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capturing(device: torch.device) -> bool:
    """Whether this step is being captured into a CUDA graph (tests replace this to check the rules of the
    capture path on a CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _plan_for_capture(plan, key, write_back):
    """The cached tables, which a step under CUDA graph capture must find ready: building them copies from
    host memory, which a graph cannot replay."""
    if write_back:
        raise RuntimeError("CAME(capturable=True): a non-contiguous param, grad or state cannot be captured in a "
                           "CUDA graph (it runs on a copy made every step); make it contiguous")
    if plan is None:
        raise RuntimeError("CAME(capturable=True): run one step eagerly before capturing it in a CUDA graph "
                           "(the device tables are built then, as torch's capturable optimizers need a warm-up)")
    if plan.key != key:
        raise RuntimeError("CAME(capturable=True): params or optimizer states moved since the last eager step; "
                           "run one eager step with them before capturing")
    return plan


def _fused(requested: bool) -> bool:
    """Plan.fused for a step that asks for `requested` (see triton_kernels.multi_tensor.CLIP_IN_PHASE1)."""
    return requested and _tk.multi_tensor.CLIP_IN_PHASE1


def _steady(cache: dict, given: tuple, grads: list) -> Optional[dict]:
    """The cached plan, when it certainly still applies: host time is the budget of a fused step, and for a
    few hundred tensors the full checks of `_prepare` cost about as much as the GPU work of a small model.

    It applies when the lists other than the grads are the very tuples of the step that cached it
    (functional.came hands the same ones in steady state), no tensor in them has moved (data_ptr: catches
    `p.data = ...`), no param was restrided, and the grads are contiguous (their addresses are compared in
    Plan.update_grads). Never while a CUDA graph is being captured (see _prepare). The addresses and strides
    are read in one C++ call per list where came_kernels._host is built (see came_kernels._fastpath)."""
    st = cache.get("steady")
    if st is None or not all(map(operator.is_, st["given"], given)):
        return None  # (only tuples are remembered: a list could have been changed in place)
    if _fastpath.ptrs(st["tensors"]) != st["ptrs"] or _fastpath.strides(st["params"]) != st["strides"]:
        return None
    if not (getattr(grads, "contiguous", False) or all(map(Tensor.is_contiguous, grads))) \
            or _capturing(st["device"]):
        return None
    return st


def _prepare(cache: dict, given: tuple, grads: list, extra=None, pack: bool = True, fused: bool = True):
    """(plan, keep, grads, device, write_back) with every check: empty tensors dropped (keep: the indices
    kept, None when all are), contiguous copies where needed, the sizes checked and the tables (re)built
    when any address changed; the CUDA graph capture rules applied. plan is None when nothing is left."""
    params = given[0]
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return None, None, grads, None, []
    lists = [params, grads] + list(given[1:]) + list(extra or ([None] * len(params), [None] * len(params)))
    if len(keep) != len(params):
        lists = [[lst[i] for i in keep] for lst in lists]
    else:
        keep = None
    device = lists[0][0].device

    lists, write_back = contiguous_lists(lists)  # see _contiguous.py
    params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes, comps = lists

    plan = cache.get("plan")
    key = None if write_back else _tk.multi_tensor.plan_key(params, exp_avgs, rows, cols, res_rows, res_cols, sqs,
                                                            absmaxes, comps)
    if _capturing(device):
        plan = _plan_for_capture(plan, key, write_back)
        plan.write_grads_in_graph(grads)
        # The graph keeps the addresses of the tables and of every tensor: keep them all alive with the
        # cache, so that replaying it never writes freed memory (see CAME's capturable).
        cache.setdefault("captured", []).append((plan, [x for lst in lists for x in lst if x is not None]))
        return plan, keep, grads, device, write_back
    if write_back or plan is None or plan.key != key or plan.pack != pack or plan.fused != _fused(fused):
        check_sizes("triton", params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes, comps)
        if plan is not None and cache.get("captured"):
            warnings.warn("CAME: params or optimizer states were replaced after a CUDA graph captured this "
                          "optimizer's step; replaying that graph would update the old tensors, not these: "
                          "capture the step again", RuntimeWarning, stacklevel=5)
        plan = _tk.build_plan(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes, comps,
                              pack=pack, fused=fused)
        if not write_back:  # copies are new every step: caching their addresses would be wrong
            cache["plan"] = plan
    else:
        plan.update_grads(grads)
    if not write_back and extra is None and all(isinstance(lst, tuple) for lst in given):
        tensors = [x for lst in (params, exp_avgs, rows, cols, res_rows, res_cols, sqs) for x in lst if x is not None]
        cache["steady"] = dict(given=given, keep=keep, plan=plan, device=device, params=params, tensors=tensors,
                               ptrs=_fastpath.ptrs(tensors), strides=_fastpath.strides(params))
    return plan, keep, grads, device, write_back


def came_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sq_rows: list[Optional[Tensor]],
    exp_avg_sq_cols: list[Optional[Tensor]],
    exp_avg_res_rows: list[Optional[Tensor]],
    exp_avg_res_cols: list[Optional[Tensor]],
    exp_avg_sqs: list[Optional[Tensor]],
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    weight_decay: float,
    maximize: bool,
    cache: Optional[dict] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    bias_scales: Optional[Tensor] = None,
    exp_avg_absmaxes: Optional[list[Optional[Tensor]]] = None,
    param_comps: Optional[list[Optional[Tensor]]] = None,
    param_rounding: str = "nearest",
    rng: Optional[Tensor] = None,
    shards=None,
) -> None:
    """One CAME step for one (device, dtype) group of fp32/bf16/fp16 tensors (see backends/README.md).
    grad_scale/found_inf (GradScaler): the kernels unscale g and skip every write on found_inf.
    bias_scales: the bias correction's [T, 2] (s_u, s_m) per tensor (torch_backend.bias_scales), or None.
    Low-precision state (opt-in): bf16 or int8 exp_avgs (with exp_avg_absmaxes), param_rounding (with
    param_comps for "kahan"), rng: int64 [T, 2] (Philox key, step) per tensor (see the torch backend).
    shards: None, or (came_kernels.distributed) the local shards of DTensor params are given, and
    `shards.bind(keep, device, amp)` returns what the finalize kernels need to sum their statistics across
    processes (see triton_kernels.multi_tensor.finalize); it is called even when this process holds nothing
    of any tensor, since every process must join each collective."""
    if _tk is None:
        raise RuntimeError(unavailable_reason(params[0].device if params else "cpu"))
    cache = {} if cache is None else cache
    if param_rounding not in ("nearest", "stochastic", "kahan"):
        raise ValueError(f"backend='triton': unknown param_rounding {param_rounding!r}")
    stochastic = param_rounding == "stochastic" and bool(params) and params[0].dtype == torch.bfloat16
    kahan = param_rounding == "kahan" and bool(params) and params[0].dtype == torch.bfloat16
    extra = None  # the low-precision state's lists (int8 absmaxes, Kahan compensations), when there is any
    if exp_avg_absmaxes is not None and any(map(operator.is_not, exp_avg_absmaxes, itertools.repeat(None))) or kahan:
        extra = (exp_avg_absmaxes or [None] * len(params), (param_comps if kahan else None) or [None] * len(params))
    given = (params, exp_avgs, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_res_rows, exp_avg_res_cols, exp_avg_sqs)
    steady = None if extra is not None else _steady(cache, given, grads)
    # A bf16 or int8 momentum: the plan of these very tensors knows (Plan.lowbit), else a look at each.
    low = stochastic or (steady["plan"].lowbit if steady is not None
                         else any(m.dtype != torch.float32 for m in exp_avgs))
    if low:
        check_rng("triton", rng, params)
    # Small matrices packed several per block (multi_tensor.PACK_ELEMS): not for the low-precision bodies, nor for
    # shards (their finalize kernels export column sums, which packed blocks do not write).
    pack = not (low or kahan) and shards is None
    fused = shards is None  # phase 1 sums the clip statistic; shards reduce it with phase 2's all_reduce
    if steady is not None and (steady["plan"].pack != pack or steady["plan"].fused != _fused(fused)):
        steady = None
    if steady is not None:  # the common case: see _steady
        keep, plan = steady["keep"], steady["plan"]
        grads = grads if keep is None else [grads[i] for i in keep]
        device = steady["device"]
        write_back = []
        # Grads from CAME's fast path come with their addresses, and dtypes and sizes checked against a
        # validated step; _steady has seen them contiguous.
        plan.update_grads(grads, grads.ptrs if keep is None and type(grads) is CheckedGrads else None)
    else:
        plan, keep, grads, device, write_back = _prepare(cache, given, grads, extra, pack, fused)
        if plan is None:
            if shards is not None and params:
                shards.bind([], params[0].device, amp_flags(grad_scale, found_inf, params[0].device)).no_tensors()
            return
    if bias_scales is not None:
        check_bias_scales("triton", bias_scales, params)
        if keep is not None:  # rows follow the tensors the kernels see (device ops, no index upload)
            bias_scales = torch.stack([bias_scales[i] for i in keep])
    if low and keep is not None:
        rng = torch.stack([rng[i] for i in keep])

    with _device_guard(device):
        ws = torch.empty(plan.ws_floats, dtype=torch.float32, device=device)
        stats = torch.empty(plan.stats_floats, dtype=torch.float32, device=device)
        wsd = torch.empty(plan.w_doubles, dtype=torch.float64, device=device) if plan.fused else None
        if POISON_SCRATCH:
            ws.fill_(float("nan"))
            stats.fill_(float("nan"))
            if wsd is not None:
                wsd.fill_(float("nan"))
        amp = amp_flags(grad_scale, found_inf, device)
        qmax = qold = None
        if plan.lowbit:  # int8 momenta's new absmax (int32 bits, gathered by atomic max) and old absmax
            qmax = torch.zeros(max(plan.q_blocks, 1), dtype=torch.int32, device=device)
            qold = torch.empty(max(plan.q_blocks, 1), dtype=torch.float32, device=device)
            if POISON_SCRATCH:
                qold.fill_(float("nan"))
        if shards is not None:
            shards = shards.bind(range(len(params)) if keep is None else keep, device, amp)

        _tk.sq_stats(plan, ws, stats, beta2=beta2, eps1=eps1, amp=amp, shards=shards, wsd=wsd)
        _tk.clip_stats(plan, ws, stats, clip_threshold=clip_threshold, amp=amp, bias_scales=bias_scales,
                       shards=shards, wsd=wsd)
        _tk.momentum_res(plan, ws, stats, beta1=beta1, beta3=beta3, eps2=eps2, maximize=maximize, amp=amp,
                         shards=shards, rng=rng, qmax=qmax, qold=qold)
        _tk.param_step(plan, stats, lr_tensor(cache, lr, device), weight_decay=weight_decay, amp=amp,
                       bias_scales=bias_scales, beta1=beta1, maximize=maximize, rounding=param_rounding, rng=rng,
                       qmax=qmax, qold=qold)

    write_back_(write_back)
