"""Functional CAME: one entry point, `came()`, that groups tensors and dispatches to a backend.

Like torch.optim.adam.adam(): every backend takes the same lists and keyword-only hyperparameters, so
any backend can be swapped for another or tested against another. Which backend runs is decided here,
in `resolve_backend`, and nowhere else.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
from torch import Tensor

from . import distributed as _distributed
from .backends import BackendUnavailableError, default_backend, get_step_fn, unavailable_reason
from .backends._contiguous import lr_tensor
from .backends.torch_backend import bias_scales, matrix_shape, rng_keys

__all__ = ["came", "resolve_backend", "FUSED_DTYPES"]

# Storage dtypes the fused kernels read and write; fp64 and mixed param/grad dtypes use the torch backend.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(backend: str, device: torch.device, param_dtype: torch.dtype, grad_dtype: torch.dtype,
                    fused: Optional[bool] = None, dtensor: bool = False) -> str:
    """The backend that runs a (device, param dtype, grad dtype) group, or BackendUnavailableError.

    DTensor params (FSDP2, tensor parallel; `dtensor=True`) run through came_kernels.distributed, which sums
    the statistics that span shards between phases, on the local shards with the torch backend's math or
    the Triton kernels (the name returned); the CUDA extension does not take shards yet."""
    fusable = param_dtype in FUSED_DTYPES and grad_dtype == param_dtype
    if fused is False and backend == "auto":  # as the optimizer's docstring says: the torch backend
        backend = "torch"
    if dtensor:
        if backend == "cuda":
            raise BackendUnavailableError(
                "backend='cuda' does not take DTensor params (FSDP2's fully_shard, tensor parallel) yet: use "
                "backend='triton' or 'auto' (the Triton kernels on the local shards) or 'torch'")
        if backend == "torch":
            return "torch"
        if backend == "auto" and not fused:  # the Triton kernels where they train, as for plain params
            fast = fusable and device.type == "cuda" and unavailable_reason("triton", device) is None
            return "triton" if fast else "torch"
        what = f"backend={backend!r}" if backend != "auto" else "fused=True"
        if not fusable:
            raise BackendUnavailableError(
                f"{what} takes fp32/bf16/fp16 params with grads of the same dtype, got param dtype {param_dtype} "
                f"and grad dtype {grad_dtype}; use backend='torch' (or 'auto') for these")
        if backend == "auto" and device.type != "cuda":
            default_backend(device, fused_only=True)  # raises, saying why (no fused training on CPU tensors)
        get_step_fn("triton", device)  # raises with the reason when it cannot run here
        return "triton"
    if backend == "auto":
        if fused and not fusable:
            raise BackendUnavailableError(
                f"fused=True: the fused kernels take fp32/bf16/fp16 params with grads of the same dtype, got "
                f"param dtype {param_dtype} and grad dtype {grad_dtype}; use fused=None for the torch backend")
        name = default_backend(device, fused_only=bool(fused))
        return name if fusable else "torch"
    if backend != "torch" and not fusable:
        raise BackendUnavailableError(
            f"backend={backend!r} takes fp32/bf16/fp16 params with grads of the same dtype, got param dtype "
            f"{param_dtype} and grad dtype {grad_dtype}; use backend='torch' (or 'auto') for these")
    get_step_fn(backend, device)  # raises with the reason when it cannot run here
    return backend


def came(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sq_rows: list[Optional[Tensor]],
    exp_avg_sq_cols: list[Optional[Tensor]],
    exp_avg_res_rows: list[Optional[Tensor]],
    exp_avg_res_cols: list[Optional[Tensor]],
    exp_avg_sqs: list[Optional[Tensor]],
    state_steps: Optional[list[Tensor]] = None,
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    weight_decay: float,
    maximize: bool = False,
    backend: str = "auto",
    fused: Optional[bool] = None,
    cache: Optional[dict] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    bias_correction: frozenset = frozenset(),
    capturable: bool = False,
    factor_conv: bool = False,
    exp_avg_absmaxes: Optional[list[Optional[Tensor]]] = None,
    param_comps: Optional[list[Optional[Tensor]]] = None,
    param_rounding: str = "nearest",
    seed: int = 0,
    rng_ids: Optional[list[int]] = None,
) -> None:
    """Functional form of `came_kernels.CAME.step` (see its docstring for the algorithm).

    The lists are aligned: entry i of every list belongs to params[i]; the row/column statistics are None
    for tensors with ndim < 2 and `exp_avg_sqs` is None for the others. Inputs are assumed validated (the
    optimizer class does that before any state exists). `cache` is a dict the caller keeps between calls;
    fused backends keep their device tables there. `grad_scale`, `found_inf`: GradScaler's (see
    CAME.step); a step with found_inf set changes nothing, step counters included. `bias_correction`: the
    set of terms of torch_backend.BIAS_TERMS to correct (empty: none, as came-pytorch); it reads
    `state_steps` on the device. `capturable`: the step may be captured in a CUDA graph (see CAME): fused
    steps run on Triton, whose tables can be pointed at new grads inside a graph. `factor_conv`: params with
    ndim >= 3 are stepped as [shape[0], numel/shape[0]] matrices, their statistics having the shapes of
    torch_backend.state_shapes(shape, factor_conv=True).

    Low-precision state (opt-in, see CAME's momentum_dtype and param_rounding): exp_avgs[i] may be bf16, or
    int8 codes with their per-block absmax in exp_avg_absmaxes[i]; bf16 params are stored with
    `param_rounding` ("nearest", "stochastic", or "kahan" with param_comps[i]). Stochastic rounding draws
    Philox bits keyed by `seed` and rng_ids[i] (default: i), with the step from `state_steps` (on the device).
    """
    hyper = dict(beta1=beta1, beta2=beta2, beta3=beta3, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold,
                 weight_decay=weight_decay, maximize=maximize)
    amp = {}
    if grad_scale is not None or found_inf is not None:
        amp = dict(grad_scale=grad_scale, found_inf=found_inf)
    cache = {} if cache is None else cache
    lists = (params, grads, exp_avgs, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_res_rows, exp_avg_res_cols,
             exp_avg_sqs)
    if bias_correction and not state_steps:
        raise ValueError("came(): bias_correction needs state_steps (the step counters it reads)")
    lowbit = _lowbit_options(params, exp_avgs, param_rounding, cache)
    if lowbit:
        if exp_avg_absmaxes is None:
            exp_avg_absmaxes = [None] * len(params)
        if param_comps is None:
            param_comps = [None] * len(params)
        if any((m.dtype == torch.int8) != (a is not None) for m, a in zip(exp_avgs, exp_avg_absmaxes)):
            raise ValueError("came(): exp_avg_absmaxes[i] must be given exactly for the int8 exp_avgs[i]")
        if param_rounding == "kahan" and any((p.dtype == torch.bfloat16) != (k is not None)
                                             for p, k in zip(params, param_comps)):
            raise ValueError("came(): param_rounding='kahan' needs param_comps[i] (bf16, the param's shape) for "
                             "every bf16 param, and None for the others")
        if not state_steps:
            raise ValueError("came(): momentum_dtype/param_rounding other than fp32/nearest need state_steps "
                             "(stochastic rounding reads the step on the device)")

    # Group once by what a fused kernel must share: device and dtypes. The torch backend takes the lot
    # for a device in one call (it buckets internally), so it is grouped by device only. The optimizer
    # passes the same tuple of params every step in steady state (see CAME._unchanged): then the grouping
    # and the slices of every list but the grads are reused from `cache`. Tuples, because a list could be
    # changed in place between calls.
    # DTensor params (FSDP2, tensor parallel) form their own group, run by came_kernels.distributed.
    memo = cache.get("grouping")
    rebuilt = not (memo is not None and memo[0] is params and isinstance(params, tuple)
                   and memo[1] == (backend, fused))
    if not rebuilt:
        groups, sliced, whole = memo[2], memo[3], memo[4]
    else:
        by_dtype: dict = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            by_dtype.setdefault((p.device, p.dtype, g.dtype, _distributed.is_dtensor(p)), []).append(i)
        groups = {}
        for (device, p_dtype, g_dtype, dtensor), idx in by_dtype.items():  # resolve once per group
            name = resolve_backend(backend, device, p_dtype, g_dtype, fused, dtensor)
            if dtensor:  # the math on the shards: "torch", or "triton" (one kernel group per dtype)
                key = ("distributed", device, name) + ((p_dtype, g_dtype) if name == "triton" else ())
            else:
                key = (name, device) if name == "torch" else (name, device, p_dtype, g_dtype)
            groups.setdefault(key, []).extend(idx)
        # Tuples: a fused backend may recognise the very same (immutable) lists next step and skip its
        # checks (see triton_backend._steady).
        sliced = {key: [None if j == 1 else tuple(lst[i] for i in idx) for j, lst in enumerate(lists)]
                  for key, idx in groups.items()}
        whole = [key for key, idx in groups.items() if idx == list(range(len(params)))]  # takes `grads` as it is
        if isinstance(params, tuple):
            cache["grouping"] = (params, (backend, fused), groups, sliced, whole)

    # Anything that can refuse this step does so before the first change (the step counters included).
    runs = []
    for key in groups:
        name = key[0]
        if capturable and name == "cuda":
            # The extension checks its tensors and uploads moved grads' addresses on the host: a graph cannot
            # replay that.
            if backend != "auto" or unavailable_reason("triton", key[1]) is not None:
                raise NotImplementedError("capturable=True cannot run on backend='cuda'; use backend='triton' "
                                          "(or 'auto')")
            name = "triton"
        if capturable and found_inf is not None and name == "torch" and key[1].type == "cuda":
            raise NotImplementedError("capturable=True with GradScaler needs a fused backend (the torch backend "
                                      "reads found_inf on the host, which a CUDA graph cannot replay); use "
                                      "backend='triton' or 'auto'")
        if lowbit and name != "torch" and torch.compiler.is_compiling():
            raise NotImplementedError(f"{lowbit} under torch.compile needs backend='torch' for now (the fused "
                                      "step's custom op does not take the low-precision state yet)")
        if lowbit and name == "distributed":
            raise NotImplementedError(f"{lowbit} does not take DTensor params (FSDP2, tensor parallel) yet; use "
                                      "the default momentum_dtype and param_rounding for them")
        if name == "distributed" and capturable:
            raise NotImplementedError("capturable=True does not take DTensor params (FSDP2, tensor parallel): "
                                      "their step all-reduces statistics between phases; use capturable=False")
        if name == "distributed" and factor_conv and any(params[i].ndim >= 3 for i in groups[key]):
            raise NotImplementedError("factor_conv=True does not take DTensor params with ndim >= 3 yet; put "
                                      "them in a param group without factor_conv")
        if name == "distributed":  # placements: the grads' every step, the state's when its lists are new
            _distributed.check_grads(sliced[key][0], [grads[i] for i in groups[key]])
            if rebuilt:
                _distributed.check_states(sliced[key][0], *sliced[key][2:])
        runs.append((name, (name,) + key[1:], key))

    if found_inf is not None:
        for name, cache_key, key in runs:
            if name == "distributed":  # every process must skip, or none (see distributed.agree_found_inf)
                found_inf = _distributed.agree_found_inf(found_inf, sliced[key][0], cache.setdefault(cache_key, {}))
                amp["found_inf"] = found_inf

    if state_steps:
        torch._foreach_add_(state_steps, 1)
        if found_inf is not None:  # as torch's fused Adam: counted, then taken back on the device, no sync
            per_device: dict = {}
            torch._foreach_sub_(state_steps, [per_device.setdefault(
                s.device, found_inf.reshape(()).to(s.device, torch.float32)) for s in state_steps])

    compiling = torch.compiler.is_compiling()
    for name, cache_key, key in runs:
        idx = groups[key]
        device = key[1]
        group_lr = lr
        if isinstance(lr, Tensor) and lr.device != device:
            # A CPU lr (what schedulers keep) is read on the host: no device is involved, so no sync, and
            # the backends write floats into a cached device buffer. A copy of it from pageable host memory
            # would stall the host every step. An lr on another GPU is copied. Compiled, it is copied
            # inside the graph (a host read would break it).
            group_lr = lr.item() if lr.device.type == "cpu" and not compiling else lr.to(device=device)
        if name in ("cuda", "triton") and not compiling:  # the device lr the kernels read, once per device
            group_lr = lr_tensor(cache.setdefault(("lr", device), {}), group_lr, device)
        sub = list(sliced[key])
        # this step's grads (they may have moved): all of them, in order, when one group holds every tensor
        sub[1] = grads if key in whole else [grads[i] for i in idx]
        write_back = []
        if factor_conv:  # params, grads, exp_avgs as matrices; the statistics already have their shapes
            views = cache.setdefault(("matrix_views",) + cache_key, {})
            sub[0] = _matrix_views(sub[0], write_back, views, "params")
            sub[2] = _matrix_views(sub[2], write_back, views, "exp_avgs")
            sub[1] = [_as_matrix(x, None) if x.ndim >= 3 else x for x in sub[1]]
        extra = {k: None if v is None else v.to(device) for k, v in amp.items()}
        if bias_correction:  # two scalars per tensor from its step counter, on the device (no sync)
            extra["bias_scales"] = bias_scales(
                [state_steps[i] for i in idx], [params[i].ndim >= 2 for i in idx], bias_correction,
                beta1=beta1, beta2=beta2, beta3=beta3, cache=None if compiling else cache,
                dtype=torch.float64 if name in ("torch", "distributed") and any(
                    params[i].dtype == torch.float64 for i in idx) else torch.float32).to(device)
        step_fn = None
        if name == "distributed":
            # Compiled, the torch math on the shards (traced; the Triton path issues collectives between
            # launches that the compiler cannot see through).
            step_fn = functools.partial(_distributed.came_step, backend="torch" if compiling else key[2])
        if lowbit:
            comps = [param_comps[i] for i in idx]
            if factor_conv:  # the Kahan compensation is addressed like its param: as the matrix
                comps = [_as_matrix(k, write_back) if k is not None and k.ndim >= 3 else k for k in comps]
            extra.update(exp_avg_absmaxes=[exp_avg_absmaxes[i] for i in idx],
                         param_comps=comps, param_rounding=param_rounding,
                         rng=_rng_table(cache, seed, rng_ids, idx, state_steps, device))
        if not compiling:
            if step_fn is None:  # checked once per parameter set (resolve_backend did), then taken from the cache
                step_fn = cache.get(("step_fn", name, device)) if not rebuilt else None
                if step_fn is None:
                    step_fn = cache[("step_fn", name, device)] = get_step_fn(name, device)
            step_fn(*sub, lr=group_lr, cache=cache.setdefault(cache_key, {}), **hyper, **extra)
        elif name in ("torch", "distributed"):  # traced by the compiler; it keeps nothing in the cache
            (step_fn or get_step_fn(name, device))(*sub, lr=group_lr, cache=None, **hyper, **extra)
        else:  # opaque to the compiler, with its mutations declared (see ops.py)
            from .ops import call_fused_step
            call_fused_step(sub, group_lr, name, **hyper, **extra)
        for x, copy in write_back:
            x.copy_(copy.view(x.shape))


def _lowbit_options(params, exp_avgs, param_rounding: str, cache: dict) -> str:
    """'' for the default storage, else the options in use ("momentum_dtype", "param_rounding") as words for
    an error message. Host checks of dtypes only (remembered for the same tuple of exp_avgs)."""
    memo = cache.get("lowbit")
    if memo is not None and memo[0] is exp_avgs and memo[1] == param_rounding:
        return memo[2]
    what = []
    if any(m.dtype in (torch.bfloat16, torch.int8) for m in exp_avgs):
        what.append("momentum_dtype='bf16'/'int8'")
    if param_rounding != "nearest" and any(p.dtype == torch.bfloat16 for p in params):
        what.append(f"param_rounding={param_rounding!r}")
    out = " and ".join(what)
    if isinstance(exp_avgs, tuple):
        cache["lowbit"] = (exp_avgs, param_rounding, out)
    return out


def _rng_table(cache: dict, seed: int, rng_ids, idx, state_steps, device) -> Tensor:
    """int64 [len(idx), 2]: (Philox key, step) per tensor of a group. The keys (seed, tensor id) are uploaded
    once per parameter set; the steps are converted from the step counters on the device (no sync, and a
    growing t is data: nothing recompiles)."""
    ids = [rng_ids[i] if rng_ids is not None else i for i in idx]
    memo_key = ("rng_keys", device, seed, tuple(ids))
    keys = cache.get(memo_key) if not torch.compiler.is_compiling() else None
    if keys is None:
        keys = torch.tensor(rng_keys(seed, ids), dtype=torch.int64).to(device)
        if not torch.compiler.is_compiling():
            cache[memo_key] = keys
    steps = torch.stack([state_steps[i] for i in idx]).to(device=device, dtype=torch.int64)
    return torch.stack([keys, steps], dim=1)


def _matrix_views(xs: tuple, write_back: list, memo: dict, name: str):
    """The entries of xs with ndim >= 3 as matrices (_as_matrix). In steady state the same tuple of views as
    last step, so that a fused backend recognises its lists and skips its checks (triton_backend._steady):
    reused while xs is the same tuple and each such tensor is still contiguous at the view's address with
    its shape (a `p.data = ...` swap gives new views)."""
    last = memo.get(name)
    conv = [x for x in xs if x.ndim >= 3]
    if last is not None and last[0] is xs and all(
            x.is_contiguous() and x.data_ptr() == v.data_ptr() and x.shape == s for x, (v, s) in zip(conv, last[2])):
        return last[1]
    views = tuple(_as_matrix(x, write_back) if x.ndim >= 3 else x for x in xs)
    if write_back or not isinstance(xs, tuple):  # copies are new every step: nothing to reuse
        memo.pop(name, None)
    else:
        memo[name] = (xs, views, [(v, x.shape) for x, v in zip(xs, views) if x.ndim >= 3])
    return views


def _as_matrix(x: Tensor, write_back: Optional[list]) -> Tensor:
    """x as its [shape[0], rest] matrix (factor_conv): a view when x is contiguous; else a copy, which is
    written back after the step when `write_back` is a list (a channels_last conv weight, say)."""
    shape = matrix_shape(x.shape)
    if x.is_contiguous():
        return x.view(shape)
    copy = x.reshape(shape)
    if write_back is not None:
        write_back.append((x, copy))
    return copy
