"""The CUDA backend: `came_step` on the compiled extension `came_kernels._C` (sources in csrc/).

Same contract as the torch backend (backends/README.md); the math lives in csrc/<phase>.cu, one file per
phase with the stems of triton_kernels/, and is checked against torch_backend.py by tests/test_cuda_backend.py.
One call per (device, dtype) group runs the four phases: three phase kernels and three small finalize
kernels, plus phase 2's kernel only for matrices wider than 8192 columns (phase 1 gathers the clip's sum for
the others: g is read once there), and phase 1 as two kernels when the group has both matrices of at most
8192 columns (their own register-path kernel) and other tensors: 6 to 8 launches whatever the tensor
count, about 28 B of traffic per fp32 parameter, a workspace of at most 64 MiB, no host sync (lr is read on
the device), deterministic (fixed-order sums).

Host side: the extension keeps a plan per list of tensors (`came_plan_create`: every tensor checked, the
launch table built and uploaded once); each step (`came_plan_step`) checks in C++ only what can change
between steps (the grads, and that no param or state moved) and re-uploads the table only when grads moved.
The plan is found by the tensors' identity (the same tuples, or lists of the same objects); the
low-precision state's plans (`came_plan_create_lowbit`) keep its per-step buffers too. Non-contiguous tensors
take `came_step` / `came_step_lowbit`, which check and upload at every call.

GradScaler (grad_scale/found_inf): the kernels read [found_inf, 1/scale] from one small device tensor
(`_contiguous.amp_flags`, as the Triton backend), multiply g by 1/scale wherever they read it and return
before writing anything when found_inf is set. Bias correction (bias_scales, [T, 2] fp32 on the device):
s_u goes into the clip divisor, s_m into the update (csrc/clip_stats.cu, csrc/param_step.cu).
Low-precision state (bf16/int8 momenta, param_rounding of bf16 params): `came_plan_create_lowbit` (or
`came_step_lowbit`), the same step with the int8 absmaxes, the Kahan compensations and the rng table (Philox
key, step per tensor) passed on; the default state's kernels are compiled as before.

Import is lazy: a missing or broken extension only matters when backend="cuda" is asked for, and then
`unavailable_reason` keeps the original import error and says how to build the extension.
"""
from __future__ import annotations

import operator
import weakref
from typing import Optional, Union

import torch
from torch import Tensor

from ._contiguous import amp_flags, check_bias_scales, check_rng, contiguous_lists, lr_tensor, write_back_

__all__ = ["came_step", "unavailable_reason"]

_BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` on a machine with nvcc and a CUDA build "
               "of torch (CAME_KERNELS_BUILD_CUDA=1 makes setup.py fail loudly instead of skipping it)")

_ext = None          # the imported came_kernels._C, once loaded
_import_error = None  # the exception from the first failed import, kept for the message


def _load():
    global _ext, _import_error
    if _ext is None and _import_error is None:
        try:
            from came_kernels import _C  # registers torch.ops.came_kernels.*
            _ext = _C
        except Exception as e:  # ImportError, or OSError for a library built against another torch
            _import_error = e
        else:
            _register_fakes()
    return _ext


def _register_fakes() -> None:
    """Fake (meta) kernels for the extension's ops, so torch.compile can trace a call to them without running
    it: they return nothing and change no shape (their schemas declare what they mutate)."""
    for op in ("came_step", "came_step_lowbit", "sq_stats", "clip_stats", "momentum_res", "param_step"):
        torch.library.register_fake(f"came_kernels::{op}")(lambda *args, **kwargs: None)
    # The plan ops are called only outside traced code (eagerly, or inside came_kernels::fused_step).


def _ops():
    """torch.ops.came_kernels (tests replace this to check the glue's choices on a CPU)."""
    return torch.ops.came_kernels


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the extension is importable and `device` is a usable CUDA device, else why not. Never raises."""
    try:
        device = torch.device(device)
        if device.type != "cuda":  # first: building the extension would not help these tensors
            return f"the CUDA extension runs on CUDA tensors only, got {device.type} tensors"
        if _load() is None:
            return (f"came_kernels._C could not be imported ({type(_import_error).__name__}: {_import_error}); "
                    + _BUILD_HINT)
        if not torch.cuda.is_available():
            return "came_kernels._C is built but torch.cuda.is_available() is False (no GPU or driver)"
        return None
    except Exception as e:  # the contract: report, never raise
        return f"checking the CUDA backend failed: {type(e).__name__}: {e}"


def _check_amp_tensors(grad_scale, found_inf) -> None:
    """ValueError naming the argument unless GradScaler's scale and flag have one element each (the op then
    checks the [found_inf, 1/scale] tensor built from them)."""
    for name, x in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if x is not None and (not isinstance(x, Tensor) or x.numel() != 1):
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"backend='cuda': {name} must be a 1-element tensor (GradScaler's), got {got}; "
                             "nothing was changed")


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
) -> None:
    """One CAME step for one (device, dtype) group of fp32/bf16/fp16 tensors (see backends/README.md).
    grad_scale/found_inf (GradScaler): the kernels unscale g and skip every write on found_inf.
    bias_scales: the bias correction's [T, 2] (s_u, s_m) per tensor (torch_backend.bias_scales), or None.
    Low-precision state (opt-in): bf16 or int8 exp_avgs (with exp_avg_absmaxes), param_rounding (with
    param_comps for "kahan"), rng: int64 [T, 2] (Philox key, step) per tensor (see the torch backend)."""
    if not params:
        return
    if _load() is None:
        raise RuntimeError(unavailable_reason(params[0].device))
    device = params[0].device
    cache = {} if cache is None else cache
    # Before anything changes. Rows of bias_scales follow the lists as given: the op maps each non-empty
    # tensor to its row, so empty tensors need no restacking here.
    _check_amp_tensors(grad_scale, found_inf)
    if bias_scales is not None:
        check_bias_scales("cuda", bias_scales, params)
    if param_rounding not in _ROUNDINGS:
        raise ValueError(f"backend='cuda': unknown param_rounding {param_rounding!r}")
    rounding = _ROUNDINGS[param_rounding] if params[0].dtype == torch.bfloat16 else 0
    hyper = (lr_tensor(cache, lr, device), float(beta1), float(beta2), float(beta3), float(eps1), float(eps2),
             float(clip_threshold), float(weight_decay), bool(maximize), amp_flags(grad_scale, found_inf, device),
             bias_scales)
    ops = _ops()

    # Steady state: the plan of these very tensors checks in C++ that none of them moved and that the grads
    # fit, and runs the step. The same tensors: the same tuples (what functional.came passes in steady state),
    # else lists holding the same objects (compared one by one: what torch.compile's custom op passes).
    given = (params, exp_avgs, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_res_rows, exp_avg_res_cols, exp_avg_sqs)
    n = len(params)
    plan = cache.get("plan")
    if plan is not None and plan.rounding == rounding and (all(map(operator.is_, plan.given, given))
                                                           or _same_tensors(plan.given, given)):
        if plan.extra is None:
            status = ops.came_plan_step(plan.handle, grads, *hyper)
        elif _same_tensors(plan.extra, _extra(n, exp_avg_absmaxes, param_comps, rounding)):
            check_rng("cuda", rng, params)
            status = ops.came_plan_step(plan.handle, grads, *hyper, rng)
        else:
            status = _PLAN_STALE
        if status == _PLAN_RAN:
            return
        if status == _PLAN_STALE:
            plan = None
    elif plan is not None:
        plan = None

    low = rounding != 0 or any(m.dtype != torch.float32 for m in exp_avgs)
    lists = [params, grads, exp_avgs, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_res_rows, exp_avg_res_cols,
             exp_avg_sqs]
    if low:
        check_rng("cuda", rng, params)
        lists += [list(x) for x in _extra(n, exp_avg_absmaxes, param_comps, rounding)]
    lists, write_back = contiguous_lists(lists)  # see _contiguous.py
    step_args = (*hyper, rng) if low else hyper

    if not write_back:  # a plan: every tensor checked once (named errors, nothing changed), the table uploaded
        if plan is None:
            cache.pop("plan", None)
            handle = (ops.came_plan_create_lowbit(*lists[:8], lists[8], lists[9], rounding, rng) if low
                      else ops.came_plan_create(*lists))
            plan = cache["plan"] = _Plan(handle, tuple(map(tuple, given)), rounding,
                                         tuple(map(tuple, lists[8:])) if low else None)
        if ops.came_plan_step(plan.handle, lists[1], *step_args) == _PLAN_RAN:
            return
    # Copies, or grads the plan does not take (checked here, with their names): the op that checks every call.
    if low:
        ops.came_step_lowbit(*lists[:8], lists[8], lists[9], rounding, rng, *hyper)
    else:
        ops.came_step(*lists, *hyper)
    write_back_(write_back)


def _extra(n: int, exp_avg_absmaxes, param_comps, rounding: int) -> tuple:
    """The low-precision state's lists as the ops take them: the int8 momenta's absmaxes, the Kahan
    compensations (None entries where a tensor has none)."""
    return (tuple(exp_avg_absmaxes) if exp_avg_absmaxes is not None else (None,) * n,
            tuple(param_comps) if rounding == 2 and param_comps is not None else (None,) * n)


def _same_tensors(a: tuple, b: tuple) -> bool:
    """Whether the lists of b hold the very objects of those of a, in order."""
    return all(len(x) == len(y) and all(map(operator.is_, x, y)) for x, y in zip(a, b))


# came_plan_step's answers (csrc/ops.cpp): the step ran; the plan's params or states changed (make a new
# plan); the grads are not what the plan takes as they are (non-contiguous, or not like their params).
_PLAN_RAN, _PLAN_STALE, _PLAN_GRADS = 0, 1, 2


class _Plan:
    """A handle of the extension's plan for the lists `given` (and, for the low-precision state, `extra`: see
    _extra; None otherwise) at param rounding `rounding`, freed with this object (when the optimizer's cache
    goes). The plan holds references to its params and states, not to grads."""
    __slots__ = ("handle", "given", "rounding", "extra", "__weakref__")

    def __init__(self, handle: int, given: tuple, rounding: int, extra: Optional[tuple]):
        self.handle = handle
        self.given = given
        self.rounding = rounding
        self.extra = extra
        weakref.finalize(self, _free_plan, handle)


def _free_plan(handle: int) -> None:
    try:
        _ops().came_plan_free(handle)
    except Exception:  # at interpreter exit the op may be gone; the process frees everything anyway
        pass


_ROUNDINGS = {"nearest": 0, "stochastic": 1, "kahan": 2}  # csrc/came_math.cuh's kRound*
