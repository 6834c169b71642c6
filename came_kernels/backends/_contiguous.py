"""Shared by the fused backends: size checks before any address reaches a kernel, contiguous copies, lr and
GradScaler's flags as the device tensors the kernels read.

`check_sizes`: a kernel addresses every tensor by the param's shape, so a state tensor of another size (a
malformed checkpoint, a tensor swapped into `optimizer.state` by hand) would be read and written out of
bounds. The fused backends call it whenever they (re)build their device tables, i.e. whenever a tensor
address changes, so it costs nothing in steady state.

`amp_flags`: GradScaler's scale and inf flag as the one small device tensor every kernel reads.

`lr_tensor`: lr as the 1-element fp32 device tensor the kernels read (a float lr in one cached buffer).

`contiguous_lists`: the kernels index contiguous [B, M, N] views. A non-contiguous tensor (a channels_last
conv weight, a transposed view) runs on a contiguous copy that is written back after the step: a full-size
temporary for that tensor only. Contiguous tensors, the usual case, cost one is_contiguous() check each.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .torch_backend import QBLOCK, state_shapes

_NAMES = ("grads", "exp_avgs", "exp_avg_sq_rows", "exp_avg_sq_cols", "exp_avg_res_rows", "exp_avg_res_cols",
          "exp_avg_sqs")


def amp_flags(grad_scale, found_inf, device):
    """None without a GradScaler, else the fp32 device tensor [found_inf, 1/grad_scale] every kernel reads:
    a nonzero found_inf makes every kernel return before writing anything. 1/scale is computed as the torch
    backend and GradScaler.unscale_ do (in double, rounded to fp32); a few tiny device ops, no host sync."""
    if grad_scale is None and found_inf is None:
        return None
    inv = (torch.ones((), device=device) if grad_scale is None
           else grad_scale.reshape(()).to(device).double().reciprocal().float())
    found = torch.zeros((), device=device) if found_inf is None else found_inf.reshape(()).to(device, torch.float32)
    return torch.stack([found, inv])


def lr_tensor(cache: dict, lr, device: torch.device) -> Tensor:
    """lr as a 1-element fp32 tensor on `device`, read by the kernels on the device (no sync, and a new value
    is data: nothing recompiles). A float lr is written into a buffer cached in `cache` only when it changes
    (fill_ is an ordinary stream operation, no sync, no allocation per step); a tensor lr is used as it is
    when it already is such a tensor, else converted on the device."""
    if isinstance(lr, Tensor):
        if lr.device == device and lr.dtype == torch.float32 and lr.shape == (1,):
            return lr
        return lr.detach().to(device=device, dtype=torch.float32).reshape(1)
    memo = cache.get("lr")
    if memo is None or memo[0].device != device:
        memo = cache["lr"] = [torch.empty(1, dtype=torch.float32, device=device), None]
    if memo[1] != lr:
        memo[0].fill_(lr)
        memo[1] = lr
    return memo[0]


def check_bias_scales(backend: str, bias_scales: Tensor, params) -> None:
    """Raise ValueError unless `bias_scales` is what the kernels read: a contiguous fp32 [T, 2] tensor on the
    params' device, T = len(params). Shape and dtype only: no values are read (no host sync)."""
    want = (len(params), 2)
    device = params[0].device
    if (not isinstance(bias_scales, Tensor) or tuple(bias_scales.shape) != want
            or bias_scales.dtype != torch.float32 or bias_scales.device != device
            or not bias_scales.is_contiguous()):
        got = (f"{tuple(bias_scales.shape)} {bias_scales.dtype} on {bias_scales.device}"
               f"{'' if bias_scales.is_contiguous() else ', not contiguous'}"
               if isinstance(bias_scales, Tensor) else type(bias_scales).__name__)
        raise ValueError(f"backend={backend!r}: bias_scales must be a contiguous float32 tensor of shape {want} "
                         f"on {device}, got {got}; nothing was changed")


def check_rng(backend: str, rng, params) -> None:
    """Raise ValueError unless `rng` is what stochastic rounding reads: a contiguous int64 [T, 2] tensor
    (Philox key, step) on the params' device. Shape and dtype only (no host sync)."""
    want = (len(params), 2)
    device = params[0].device
    if (not isinstance(rng, Tensor) or tuple(rng.shape) != want or rng.dtype != torch.int64
            or rng.device != device or not rng.is_contiguous()):
        got = f"{tuple(rng.shape)} {rng.dtype} on {rng.device}" if isinstance(rng, Tensor) else type(rng).__name__
        raise ValueError(f"backend={backend!r}: stochastic rounding needs rng, a contiguous int64 tensor of shape "
                         f"{want} on {device}, got {got}; nothing was changed")


def check_sizes(backend: str, params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes=None,
                comps=None) -> None:
    """Raise ValueError unless every tensor has the shape the kernels will address it with (the contract:
    grads and m like the param; r, R shape[:-1] and c, C shape[:-2]+shape[-1:] for ndim >= 2, else v like the
    param and no row/column statistics; an int8 m's absmax [cdiv(numel, QBLOCK)] fp32, a Kahan
    compensation like the param, in bf16)."""
    for i, (p, m, a, k) in enumerate(zip(params, exp_avgs, absmaxes or [None] * len(params),
                                         comps or [None] * len(params))):
        nb = -(-p.numel() // QBLOCK)
        if m.dtype == torch.int8 and (a is None or tuple(a.shape) != (nb,) or a.dtype != torch.float32):
            got = None if a is None else f"{tuple(a.shape)} {a.dtype}"
            raise ValueError(f"backend={backend!r}: exp_avg_absmaxes[{i}] is {got}, expected float32 of shape "
                             f"({nb},) for the int8 momentum of a param of shape {tuple(p.shape)}; nothing was "
                             "changed")
        if k is not None and (k.shape != p.shape or k.dtype != torch.bfloat16):
            raise ValueError(f"backend={backend!r}: param_comps[{i}] is {tuple(k.shape)} {k.dtype}, expected "
                             f"bfloat16 of shape {tuple(p.shape)}; nothing was changed")
    for i, (p, *xs) in enumerate(zip(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs)):
        shape = tuple(p.shape)
        stats = state_shapes(shape)
        want = (shape, shape) + tuple(stats.get(k) for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                                                             "exp_avg_res_col", "exp_avg_sq"))
        for name, x, w in zip(_NAMES, xs, want):
            got = None if x is None else tuple(x.shape)
            if got != w:
                raise ValueError(f"backend={backend!r}: {name}[{i}] has shape {got}, expected {w} for a param of "
                                 f"shape {shape}; nothing was changed")

class CheckedGrads(list):
    """A step's grads as CAME's steady-state fast path hands them over (CAME._unchanged): their shapes and
    dtypes (and devices, where an address moved) were compared with those of the last fully validated
    step, and `ptrs` holds their data_ptr()s (a tuple, or int64 bytes from the C++ checks). A fused backend
    that gets them whole (not a subset) may take `ptrs` instead of reading a few hundred grads again.
    `contiguous` (set by the C++ checks, which read it with the rest): whether every grad is contiguous;
    when unset the backend checks it itself."""
    __slots__ = ("ptrs", "contiguous")


# Position of the grads in the contract's list order (params, grads, exp_avgs, ...): only read, never written.
_GRADS = 1


def contiguous_lists(lists: list) -> tuple[list, list[tuple[Tensor, Tensor]]]:
    """(lists with contiguous tensors, [(original, copy)] to copy back after the step)."""
    write_back = []
    out = []
    for k, lst in enumerate(lists):
        if any(x is not None and not x.is_contiguous() for x in lst):
            copies = [x if x is None or x.is_contiguous() else x.contiguous() for x in lst]
            if k != _GRADS:
                write_back += [(x, y) for x, y in zip(lst, copies) if y is not x]
            lst = copies
        out.append(lst)
    return out, write_back


def write_back_(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for orig, copy in pairs:
        orig.copy_(copy)
