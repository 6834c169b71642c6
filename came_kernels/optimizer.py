"""`came_kernels.CAME`: the optimizer class. It validates, keeps state and hands tensors to `functional.came`.

It knows no kernels: which backend runs is decided in `functional.resolve_backend`.
"""
from __future__ import annotations

import itertools
import math
import numbers
import operator
import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.overrides import TorchFunctionMode

from . import _fastpath
from . import distributed as _distributed
from .backends import BACKENDS, BackendUnavailableError
from .backends._contiguous import CheckedGrads
from .backends.torch_backend import (BIAS_TERMS, MOMENTUM_DTYPES, PARAM_ROUNDINGS, QBLOCK, dequantize_blockwise,
                                     math_dtype, momentum_state, quantize_blockwise, sr_bf16, state_shapes)
from .functional import came, resolve_backend

__all__ = ["CAME"]

_DEFAULT_BETA3 = 0.9999
# Read by map() over a few hundred grads per step in the fast path: C-level getters, no Python frames.
_grad, _dtype, _layout, _device = (operator.attrgetter(a) for a in ("grad", "dtype", "layout", "device"))
# State that came-pytorch 0.1.3 keeps but never reads (the RMS of the parameter, recomputed every step).
_UNUSED_CAME_PYTORCH_KEYS = ("RMS",)
_STATS_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "exp_avg_sq")
# The momentum's keys, one of two layouts (torch_backend.momentum_state): "exp_avg" (fp32 or bf16), or int8
# codes "exp_avg_q" with "exp_avg_absmax"; and the Kahan compensation of bf16 params (param_rounding="kahan").
_MOMENTUM_KEYS = ("exp_avg", "exp_avg_q", "exp_avg_absmax")
_COMP_KEY = "param_comp"
# Group entries that say how this process runs, not what was trained: never taken from a checkpoint.
_RUNTIME_KEYS = ("backend", "fused", "foreach", "capturable", "differentiable")
# Group entries that say how the state is stored: kept from the constructor, the checkpoint's state is
# converted to them on load (an fp32 momentum quantized into an int8 optimizer, and back).
_STORAGE_KEYS = ("momentum_dtype", "param_rounding")
# Group entries a checkpoint must have (came-pytorch's; the keyword-only ones get defaults).
_REQUIRED_GROUP_KEYS = ("params", "lr", "eps", "clip_threshold", "betas", "weight_decay")



class _IdentityOnly(TorchFunctionMode):
    """Within it, `tensor == other` is False instead of an elementwise comparison, so that lists and dicts
    holding tensors compare by identity: list and dict equality test `is` first (in C), and only call
    __eq__ for objects that differ, which then costs no device work and no host sync (a 1-element tensor
    would otherwise be read and compared by value)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is Tensor.__eq__:
            return False
        return func(*args, **(kwargs or {}))


_IDENTITY_ONLY = _IdentityOnly()


class CAME(Optimizer):
    r"""CAME: Confidence-guided Adaptive Memory Efficient Optimization (Luo et al., ACL 2023, arXiv 2307.02047).

    The exact update of came-pytorch 0.1.3, with fused GPU backends. Adam-like training with Adafactor-like
    memory: one full-size state (the momentum) plus row and column statistics for every tensor with two or
    more dims (leading dims are a batch of matrices; the last two dims are factored).

    .. math::
       \begin{aligned}
       &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \beta_3, \epsilon_1, \epsilon_2,
            d \text{ (clip\_threshold)}, \lambda \text{ (weight decay)}, \theta_0 \text{ (params)} \\
       &\textbf{initialize}: m_0, r_0, c_0, R_0, C_0, v_0 \leftarrow 0 \\
       &\textbf{for}\ t = 1, 2, \ldots \\
       &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \quad (-\nabla \text{ if maximize}) \\
       &\quad \textbf{if}\ \theta \text{ is a matrix } (M \times N): \\
       &\qquad r_t \leftarrow \beta_2 r_{t-1} + (1-\beta_2)\,\mathrm{mean}_N(g_t^2 + \epsilon_1), \quad
               c_t \leftarrow \beta_2 c_{t-1} + (1-\beta_2)\,\mathrm{mean}_M(g_t^2 + \epsilon_1) \\
       &\qquad u_t \leftarrow g_t \,/\, \sqrt{ r_t c_t^\top / \mathrm{mean}(r_t) } \\
       &\quad \textbf{else}: \quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)(g_t^2 + \epsilon_1), \quad
               u_t \leftarrow g_t / \sqrt{v_t} \\
       &\quad \hat u_t \leftarrow u_t / \max(1, \mathrm{RMS}(u_t)/d) \\
       &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1)\,\hat u_t \\
       &\quad \textbf{if}\ \theta \text{ is a matrix}: \\
       &\qquad U_t \leftarrow (\hat u_t - m_t)^2 + \epsilon_2 \\
       &\qquad R_t \leftarrow \beta_3 R_{t-1} + (1-\beta_3)\,\mathrm{mean}_N(U_t), \quad
               C_t \leftarrow \beta_3 C_{t-1} + (1-\beta_3)\,\mathrm{mean}_M(U_t) \\
       &\qquad s_t \leftarrow m_t \,/\, \sqrt{ R_t C_t^\top / \mathrm{mean}(R_t) } \\
       &\quad \textbf{else}: \quad s_t \leftarrow m_t \\
       &\quad \theta_t \leftarrow \theta_{t-1} - \gamma\lambda\theta_{t-1} - \gamma s_t \\
       &\textbf{return}\ \theta_t
       \end{aligned}

    There is no bias correction. Statistics and momentum are fp32 whatever the parameter dtype (fp64 for
    fp64 params), and all arithmetic is fp32.

    DTensor params (FSDP2's fully_shard, HSDP, tensor parallel) get the same update: each process steps its
    shard (on CUDA through the Triton kernels) and the statistics that span shards are all-reduced
    (came_kernels.distributed; the state is DTensors, for torch.distributed.checkpoint). FSDP1's flat
    parameters cannot be factored (a warning says so).

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float or Tensor): learning rate, > 0; required here or in every param group. A tensor lr
            (0-d, or one element, taken as 0-d) is read on the device: no host sync, and no recompiles
            under torch.compile when a scheduler changes it. Its value is checked when the group is added.
        eps (tuple[float, float]): (eps1, eps2), added to g^2 and to the confidence residual
            (default: (1e-30, 1e-16)). A single float is rejected: CAME has two epsilons, and neither plays
            the role of Adam's eps.
        clip_threshold (float): d, the largest RMS the normalized update may have (default: 1.0).
        betas (tuple): (beta1, beta2, beta3): momentum, g^2 statistics and confidence statistics
            (default: (0.9, 0.999, 0.9999)). An AdamW-style pair (beta1, beta2) is accepted and gets
            beta3 = 0.9999.
        weight_decay (float): decoupled weight decay, as in AdamW (default: 0).
        bias_correction (bool or tuple of str, keyword-only): divide statistics by their EMA weight sums
            1 - beta^t, as Adam does (default: False, the exact came-pytorch 0.1.3 update, which has none).
            True corrects every term; a tuple picks terms among "exp_avg" (the momentum, in the update
            only), "exp_avg_sq" (the column statistic of g^2, or v) and "exp_avg_res" (the column
            confidence statistic). Read from the step counters on the device: no sync, no recompile.
        factor_conv (bool, keyword-only): factor params with ndim >= 3 (conv weights [out, in, *kernel]) as
            one [out, in*prod(kernel)] matrix (default: False: came-pytorch factors the last two dims, so a
            1x1 conv keeps row statistics as large as its weight). Changes the state's shapes: it is saved
            with the param group. Meant for conv weights; a 3-D param that is a batch of matrices (stacked
            experts, say) should be put in a param group without it.
        momentum_dtype (str, keyword-only): how the momentum is stored between steps (default: "fp32", the
            exact came-pytorch update). "bf16": bf16, rounded stochastically (2 B/param); "int8": int8 codes
            with one fp32 absmax per block of 256 elements, rounded stochastically (1.02 B/param). Tensors with
            ndim < 2 or fewer than 4096 elements keep an fp32 momentum. The math stays fp32. Kept from the
            constructor on load_state_dict: a checkpoint's momentum is converted to this storage.
        param_rounding (str, keyword-only): how bf16 params are stored (default: "nearest": fp32 math,
            rounded once to nearest). "stochastic": rounded stochastically (no memory), so updates below half
            a bf16 ulp move the param on average; "kahan": a bf16 compensation buffer (state "param_comp",
            +2 B/param) keeps what rounding lost and adds it back next step. fp32/fp64 params are stored
            exactly either way; fp16 params take "nearest" only.
        seed (int, keyword-only): seed of the stochastic rounding (default: 0), in [0, 2^32). The random bits
            are Philox4x32-10 of (seed, param index, step, element index): reproducible, and the same in
            every backend. Saved with the param group.
        maximize (bool, keyword-only): maximize the objective (default: False).
        backend (str, keyword-only): "auto", "torch", "triton" or "cuda" (default: "auto": the CUDA extension
            for CUDA tensors when it was built, else Triton on CUDA, else torch). Requesting a backend that
            cannot run raises an error that says why and how to get it.
        foreach (bool, optional, keyword-only): accepted for AdamW compatibility; the torch backend always
            groups small tensors with torch._foreach_* ops. Cannot be True together with fused=True.
        fused (bool, optional, keyword-only): True requires a fused backend (CUDA extension or Triton) and
            picks the fastest available; False means the torch backend (default: None, see `backend`).
        capturable (bool, keyword-only): allow step() to be captured in a CUDA graph (default: False). The
            step then runs entirely on the device: step counters there, lr a float (fixed in the graph) or a
            tensor on the params' device (what a scheduler writes into is what replays read). Run one
            step eagerly before capturing: the fused backends build their device tables then. The Triton
            backend is used for fused steps ("auto"); the CUDA extension, which uploads its table from host
            memory at every call, and GradScaler with the torch backend cannot be captured.
        differentiable (bool, keyword-only): not supported; must be False.

    Example (instead of ``torch.optim.AdamW``)::

        opt = came_kernels.CAME(model.parameters(), lr=2e-4, weight_decay=0.01)
    """

    # GradScaler sets `grad_scale` and `found_inf` on the optimizer and calls step() without unscaling the
    # grads first: step() divides by the scale and skips the update when an inf/NaN was found, on the
    # device, without a host sync (as torch.optim.AdamW(fused=True)).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, Tensor, None] = None,
        eps: tuple = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        *,
        bias_correction: Union[bool, tuple] = False,
        factor_conv: bool = False,
        momentum_dtype: str = "fp32",
        param_rounding: str = "nearest",
        seed: int = 0,
        maximize: bool = False,
        backend: str = "auto",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        if fused and foreach:
            raise ValueError("CAME: fused=True and foreach=True cannot be set together")
        if fused and backend == "torch":
            raise ValueError("CAME: fused=True asks for a fused backend, but backend='torch' was given")
        if fused is False and backend in ("triton", "cuda"):
            raise ValueError(f"CAME: fused=False contradicts backend={backend!r}, which is a fused backend")
        if capturable and backend == "cuda":
            raise ValueError("CAME: capturable=True cannot use backend='cuda': the CUDA extension uploads its "
                             "tensor table from host memory at every step, which a CUDA graph cannot replay; use "
                             "backend='triton' or 'auto'")
        if differentiable:
            raise ValueError("CAME: differentiable=True is not supported; use differentiable=False")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, betas=betas, weight_decay=weight_decay,
                        bias_correction=bias_correction, factor_conv=factor_conv, momentum_dtype=momentum_dtype,
                        param_rounding=param_rounding, seed=seed, maximize=maximize, backend=backend,
                        foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
        # lr=None is allowed when every param group brings its own (add_param_group checks that).
        _check_group(defaults, "defaults", lr_optional=True)
        # Backend scratch (device tables, workspaces), one dict per param group (add_param_group appends);
        # never saved. Made with the group, not in step(): a compiled step must not see it change shape.
        self._caches: list = []
        # Each group's capturable as the user set it. torch.compile's optimizer support sets
        # group["capturable"] = True in every group it traces (and in the dicts themselves, for CUDA params
        # without state yet), which would refuse backend='cuda' compiled and even in eager steps afterwards;
        # step() reads this list instead.
        self._capturable: list = []
        super().__init__(params, defaults)
        # Fail now, not at the first step, when a requested backend cannot run on these params.
        for group in self.param_groups:
            for p in group["params"]:
                self._resolve(group, p, p.dtype)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        try:
            if group["lr"] is None:
                raise ValueError(f"CAME ({where}): lr is required: give it to the constructor or to every param "
                                 "group (came-pytorch has no default either; CAME usually wants 0.5-0.9x the "
                                 "AdamW lr, e.g. lr=2e-4)")
            _check_group(group, where, read_tensor_lr=True)
            lr = group["lr"]
            if group["capturable"] and isinstance(lr, Tensor) and any(p.device != lr.device for p in group["params"]):
                # A graph replays device work only: an lr on another device would be read once, at capture.
                raise ValueError(f"CAME ({where}): capturable=True needs a tensor lr on the params' device "
                                 f"({group['params'][0].device}), got one on {lr.device}")
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                # One state shared by two entries would be stepped twice per step(); on a GPU, two kernel
                # programs would race on it.
                raise ValueError(f"CAME ({where}): the same parameter appears more than once; pass each "
                                 "parameter once")
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"CAME: complex parameters are not supported (got a {p.dtype} param "
                                     f"of shape {tuple(p.shape)}); view it as real with torch.view_as_real")
                if not p.is_floating_point():
                    raise ValueError(f"CAME: parameters must be floating point, got {p.dtype}")
                if p.dtype == torch.float16 and group["param_rounding"] != "nearest":
                    raise ValueError(f"CAME ({where}): param_rounding={group['param_rounding']!r} takes bf16 params "
                                     f"(fp32/fp64 params are stored exactly), got a float16 param of shape "
                                     f"{tuple(p.shape)}; use param_rounding='nearest' for fp16 params")
                if _distributed.is_dtensor(p):
                    pwhere = f"{where}, param of shape {tuple(p.shape)}"
                    _distributed.check_param(p, pwhere)
                    if group["capturable"]:
                        raise ValueError(f"CAME ({pwhere}): capturable=True does not take DTensor params (FSDP2, "
                                         "tensor parallel): their step all-reduces statistics between phases; use "
                                         "capturable=False")
                    if group["momentum_dtype"] != "fp32" or group["param_rounding"] != "nearest":
                        raise ValueError(f"CAME ({pwhere}): momentum_dtype and param_rounding other than the "
                                         "defaults do not take DTensor params (FSDP2, tensor parallel) yet")
                    if group["factor_conv"] and p.ndim >= 3:
                        raise ValueError(f"CAME ({pwhere}): factor_conv=True does not take DTensor params with "
                                         "ndim >= 3 yet; put them in a param group without factor_conv")
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        group["betas"] = _three_betas(group["betas"])
        group["bias_correction"] = _bias_terms(group["bias_correction"], where)  # checked in _check_group
        if isinstance(group["lr"], Tensor) and group["lr"].ndim:
            group["lr"] = group["lr"].view(())  # a 1-element lr as 0-d; a view: writes to it still count
        self._caches.append({})
        self._capturable.append(bool(group["capturable"]))
        flat = sum(map(_distributed.is_fsdp1_flat_param, group["params"]))
        if flat and not getattr(self, "_warned_flat_params", False):
            self._warned_flat_params = True
            warnings.warn(
                f"CAME: {flat} parameter(s) are FSDP1 flat parameters (FullyShardedDataParallel flattens and "
                "concatenates a module's tensors into 1-D shards; with use_orig_params=True each param is a 1-D "
                "piece of one): CAME cannot factor them, so they get the unfactored rule (a full-size second "
                "moment, no confidence factor), which is not CAME's update of the matrices inside. Use FSDP2 "
                "(torch.distributed.fsdp.fully_shard): its DTensor parameters keep their shapes and CAME factors "
                "them exactly across shards", UserWarning, stacklevel=4)  # the line that called CAME(...)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved by came-pytorch lack our keyword-only options
            for key, value in (("bias_correction", False), ("factor_conv", False), ("momentum_dtype", "fp32"),
                               ("param_rounding", "nearest"), ("seed", 0), ("maximize", False),
                               ("backend", "auto"),
                               ("foreach", None), ("fused", None), ("capturable", False), ("differentiable", False)):
                group.setdefault(key, value)
            group["betas"] = _three_betas(group["betas"])
            group["bias_correction"] = _bias_terms(group["bias_correction"], "a param group")
        kept = getattr(self, "_capturable", None)  # load_state_dict: the same groups, as the user made them
        if kept is None or len(kept) != len(self.param_groups):
            self._capturable = [bool(g["capturable"]) for g in self.param_groups]
        self._reset_caches()

    def _reset_caches(self) -> None:
        """New, empty backend caches (one per group). Caches that a CUDA graph captured from keep the tables
        and tensors that graph addresses: they are kept alive, and the user is told to capture again."""
        old = getattr(self, "_caches", None) or []
        if any(isinstance(v, dict) and v.get("captured") for c in old for v in c.values()):
            self._graph_keepalive = getattr(self, "_graph_keepalive", []) + old
            warnings.warn("CAME: the optimizer state was replaced after a CUDA graph captured step(); replaying "
                          "that graph would update the old state, not this one: capture the step again",
                          RuntimeWarning, stacklevel=3)
        self._caches = [{} for _ in self.param_groups]
        self._state_snapshot = None

    def _resolve(self, group: dict, p: Tensor, grad_dtype: torch.dtype) -> str:
        return resolve_backend(group["backend"], p.device, p.dtype, grad_dtype, group["fused"],
                               _distributed.is_dtensor(p))

    def _check_step_inputs(self, skip=()) -> None:
        """Every check that can fail, before any state is created or changed. Groups in `skip` (indices
        whose grads and state are the very objects a previous step checked, see _unchanged) only get their
        lr checked."""
        compiling = torch.compiler.is_compiling()
        for gi, group in enumerate(self.param_groups):
            if not compiling:  # compiled, a float lr is a graph constant (or a symbolic float) and guarded
                _check_lr(group["lr"], f"param group {gi}", allow_zero=True)
            if gi in skip:
                continue
            resolved = set()
            where = f"param group {gi}"
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                dtensor = _distributed.is_dtensor(p)
                if g.layout != torch.strided or not g.dtype.is_floating_point or g.shape != p.shape \
                        or g.device != p.device or dtensor != _distributed.is_dtensor(g):
                    _raise_bad_grad(p, g, where)  # the common case pays for one combined test only
                key = (p.device, p.dtype, g.dtype, dtensor)
                if key not in resolved:  # once per (device, dtypes) and group: step() runs this every call
                    try:
                        self._resolve(group, p, g.dtype)
                    except BackendUnavailableError as e:
                        where = f"param group {gi}, param of shape {tuple(p.shape)}"
                        raise BackendUnavailableError(f"CAME ({where}): {e}") from None
                    resolved.add(key)

    # ------------------------------------------------------------------ the steady-state fast path
    # Host time is a fused step's budget: for 200 tensors, validating every grad and rebuilding the lists
    # costs about 1 ms of Python, as much as the GPU work of a small model. In steady state nothing changes
    # between steps but the grads: the same params have grads, of the same type, dtype, shape, device and
    # layout as those of the last fully validated step (zero_grad(set_to_none=True) makes new grad tensors
    # every step; that is fine), and the state is the very same objects. Then each group reuses the lists
    # it handed to `came` (the same tuples, which lets `came` and the fused backends reuse their own work
    # too). Every check is a C-level map over the grads, compared as a whole with what that step saw:
    # - every step: which params have grads and their types (a DTensor, a subclass), dtypes (a param may
    #   take grads of another dtype, see Tensor.grad_dtype), shapes (resize_ keeps the address), addresses;
    # - when an address moved (new grads, as after zero_grad(set_to_none=True)): their devices. A grad
    #   cannot change device and keep its address;
    # - the optimizer's state as a whole (_state_unchanged: no entry added, removed or replaced).
    # A grad that is not strided (sparse, mkldnn) has no storage: `data_ptr()` fails and the full path names
    # it. DTensor grads (no address of their own) have their devices and layouts compared every step.
    # Grads are not remembered (that would keep last step's grads alive), only their kind and addresses;
    # state tensors are held by the lists, so their ids and addresses cannot be reused while remembered.
    # With the extension came_kernels._host (see _fastpath), plain grads are checked in one C++ call: their
    # kinds (which params have one; dtype, device, shape), addresses and contiguity, every step; and the
    # state in another.
    def _unchanged(self, gi: int, group: dict) -> Optional[list]:
        """The remembered lists of group gi, with this step's grads, if nothing but the grads' values (or
        addresses) changed since they were built (see above); else None."""
        fast = self._caches[gi].get("fast")
        params = group["params"]
        if fast is None or fast["params"] is not params or len(params) != fast["n"] \
                or fast["how"] != (group["backend"], group["fused"]):
            return None
        if fast["kinds"] is not None:  # every fact of every grad in one C++ call (_fastpath.grads)
            now = _fastpath.grads(params)
            if now is None or now[1] != fast["kinds"]:
                return None
            grads = CheckedGrads(now[0])
            grads.ptrs, grads.contiguous = now[2], now[3]  # (addresses as int64 bytes, see Plan.update_grads)
            lists = list(fast["lists"])
            lists[1] = grads
            return lists
        grads = list(map(_grad, params))
        if list(map(type, grads)) != fast["types"]:  # a param gained or lost its grad, or a DTensor grad
            return None
        if fast["mask"] is not None:  # the params with a grad, in order
            grads = list(itertools.compress(grads, fast["mask"]))
        try:
            if list(map(_dtype, grads)) != fast["dtypes"] or list(map(Tensor.size, grads)) != fast["shapes"]:
                return None
            ptrs = tuple(map(Tensor.data_ptr, grads)) if fast["plain"] else None
            if ptrs is None or ptrs != fast["grad_ptrs"]:
                if list(map(_device, grads)) != fast["devices"] \
                        or (ptrs is None and list(map(_layout, grads)) != fast["layouts"]):
                    return None
                fast["grad_ptrs"] = ptrs
        except RuntimeError:  # no storage (sparse, mkldnn) or no sizes (nested): the full path says what is wrong
            return None
        if ptrs is not None:  # the addresses go along: a fused backend need not read them again
            grads = CheckedGrads(grads)
            grads.ptrs = ptrs
        lists = list(fast["lists"])
        lists[1] = grads
        return lists

    def _remember(self, gi: int, group: dict, lists: tuple) -> None:
        params = group["params"]
        grads = lists[1]
        types = list(map(type, map(_grad, params)))
        plain = all(t is Tensor for t in map(type, grads))  # DTensor grads: no address of their own
        native = _fastpath.grads(params) if plain else None
        self._caches[gi]["fast"] = {
            "params": params, "n": len(params), "how": (group["backend"], group["fused"]), "types": types,
            "mask": None if len(grads) == len(params) else [t is not type(None) for t in types],
            "dtypes": list(map(_dtype, grads)), "plain": plain,
            "grad_ptrs": tuple(map(Tensor.data_ptr, grads)) if plain else None,
            "shapes": list(map(Tensor.size, grads)), "layouts": list(map(_layout, grads)),
            "devices": list(map(_device, grads)),
            "kinds": None if native is None else native[1],  # the C++ checks' view (None: they do not run)
            "lists": tuple(lst if i != 1 else None for i, lst in enumerate(lists)),  # grads: not kept
        }

    def _snapshot_state(self) -> None:
        """Remember the state as it is after a fully validated step (see _state_unchanged)."""
        self._state_snapshot = (self.state, list(self.state), [dict(s) for s in self.state.values()])

    def _state_unchanged(self) -> bool:
        """Whether the optimizer's state holds the very dicts' contents of the last snapshot: the same params,
        and in each param's state the same keys and the very same objects. One C-level comparison of lists
        (list and dict equality test identity first); a tensor that is not the remembered one compares
        False (_IdentityOnly), so a replaced entry costs no device work and no host sync."""
        snap = getattr(self, "_state_snapshot", None)
        if snap is None or snap[0] is not self.state:
            return False
        same = _fastpath.same_state(self.state, snap[1], snap[2])  # the same comparison in C++, where built
        if same is not None:
            return same
        with _IDENTITY_ONLY:
            return list(self.state) == snap[1] and list(self.state.values()) == snap[2]

    # ------------------------------------------------------------------ state
    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_res_rows,
                    exp_avg_res_cols, exp_avg_sqs, state_steps, absmaxes, comps, ids, first_id) -> None:
        """Create missing state and append each param with a grad, and its state, to the lists.

        Why plain list arguments: torch.compile (dynamo) runs a method named `_init_group` outside the trace
        and passes back only what it appended to list arguments, as for torch's own optimizers. Lists packed
        in a dict would stay empty inside the trace, and a compiled step() would silently do nothing.
        """
        for k, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                dt = math_dtype(p.dtype)
                # On the param's device: one _foreach_add_ launch per step on a GPU instead of one tiny
                # CPU op per tensor (host time is the budget of a fused optimizer step).
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                if _distributed.is_dtensor(p):  # sharded like the axes they index, so DCP can reshard them
                    state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.contiguous_format)
                    state.update(_distributed.new_stats(p, dt))  # (fp32 m, no factor_conv: add_param_group)
                else:
                    for key, (shape, mdt) in momentum_state(p.shape, group["momentum_dtype"], p.dtype).items():
                        state[key] = torch.zeros(shape, dtype=mdt, device=p.device)
                    for key, shape in state_shapes(p.shape, group["factor_conv"]).items():
                        state[key] = torch.zeros(shape, dtype=dt, device=p.device)
                    if _wants_comp(group, p):
                        state[_COMP_KEY] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
            factored = p.ndim >= 2  # factor_conv keeps ndim >= 3 factored (as a matrix): the same lists
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg_q"] if "exp_avg_q" in state else state["exp_avg"])
            absmaxes.append(state.get("exp_avg_absmax"))
            comps.append(state.get(_COMP_KEY))
            ids.append(first_id + k)  # the param's index in state_dict(): its random stream
            exp_avg_sq_rows.append(state["exp_avg_sq_row"] if factored else None)
            exp_avg_sq_cols.append(state["exp_avg_sq_col"] if factored else None)
            exp_avg_res_rows.append(state["exp_avg_res_row"] if factored else None)
            exp_avg_res_cols.append(state["exp_avg_res_col"] if factored else None)
            exp_avg_sqs.append(None if factored else state["exp_avg_sq"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step.

        Args:
            closure (callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Compiled, dynamo traces the plain path (its guards do the rest) and the fast path is not even
        # entered: a comprehension here would be one more frame to compile.
        compiling = torch.compiler.is_compiling()
        if not compiling and _capturing():
            for gi in range(len(self.param_groups)):
                if not self._capturable[gi]:
                    raise RuntimeError(f"CAME (param group {gi}): step() is being captured in a CUDA graph, but "
                                       "the optimizer was built with capturable=False; pass capturable=True")
        fast = [None] * len(self.param_groups)
        if not compiling and self._state_unchanged():
            fast = [self._unchanged(gi, g) for gi, g in enumerate(self.param_groups)]
        self._check_step_inputs(skip=() if compiling else {gi for gi, f in enumerate(fast) if f is not None})
        for gi, group in enumerate(self.param_groups):  # indexed: dynamo maps `group` back to param_groups[gi]
            if fast[gi] is not None:
                (params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs, steps, absmaxes, comps,
                 ids) = fast[gi]
            else:
                (params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs, steps, absmaxes, comps,
                 ids) = ([] for _ in range(12))
                first_id = sum(len(g["params"]) for g in self.param_groups[:gi])
                self._init_group(group, params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs,
                                 steps, absmaxes, comps, ids, first_id)
                if not compiling:
                    self._remember(gi, group, (tuple(params), grads, tuple(exp_avgs), tuple(sq_rows),
                                               tuple(sq_cols), tuple(res_rows), tuple(res_cols), tuple(sqs),
                                               tuple(steps), tuple(absmaxes), tuple(comps), tuple(ids)))
            if not params:
                continue
            beta1, beta2, beta3 = group["betas"]
            eps1, eps2 = group["eps"]
            came(params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs, steps, lr=group["lr"],
                 beta1=beta1, beta2=beta2, beta3=beta3, eps1=eps1, eps2=eps2,
                 clip_threshold=group["clip_threshold"], weight_decay=group["weight_decay"],
                 maximize=group["maximize"], bias_correction=frozenset(group["bias_correction"] or ()),
                 factor_conv=group["factor_conv"], exp_avg_absmaxes=absmaxes, param_comps=comps,
                 param_rounding=group["param_rounding"], seed=group["seed"], rng_ids=ids,
                 backend=group["backend"], fused=group["fused"], capturable=self._capturable[gi],
                 cache=self._caches[gi], grad_scale=getattr(self, "grad_scale", None),
                 found_inf=getattr(self, "found_inf", None))
        if not compiling and any(f is None for f in fast):  # a group was rebuilt (its state may be new)
            self._snapshot_state()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """As torch.optim.Optimizer.state_dict, except that each param's state dict is a copy (the tensors are
        still shared, not cloned): in torch's, assigning to `sd["state"][i][key]` would replace the live
        state of this optimizer."""
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a came_kernels or came-pytorch 0.1.3 state dict.

        Everything is checked before anything changes: the groups (count, sizes, hyperparameters) and, for
        every parameter, the state keys its shape needs and each tensor's shape, so that no kernel is ever
        handed a tensor of the wrong size. A bad state dict raises ValueError naming the parameter and what
        was expected, and leaves the optimizer as it was.

        came-pytorch keeps an unused "RMS" entry and an int "step": the first is dropped, the second becomes
        a tensor. torch.optim.Optimizer.load_state_dict casts every floating state tensor to its parameter's
        dtype, which would round the fp32 statistics of bf16/fp16 parameters; the saved tensors are put
        back instead, on the parameter's device, in fp32. How this process runs (`backend`, `fused`,
        `foreach`, `capturable`, `differentiable`) is kept from the constructor, not taken from the file:
        it describes the machine that saved it, not the training state.
        """
        _check_state_dict(self, state_dict)
        state_dict = dict(state_dict)
        saved = {}
        new_state = {}
        for k, st in state_dict["state"].items():
            st = {key: v for key, v in st.items() if key not in _UNUSED_CAME_PYTORCH_KEYS}
            if "step" in st and not isinstance(st["step"], Tensor):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
            saved[k] = {key: v for key, v in st.items() if isinstance(v, Tensor) and key != "step"}
            new_state[k] = {key: v for key, v in st.items() if key == "step" or key not in saved[k]}
        state_dict["state"] = new_state
        state_dict["param_groups"] = [
            dict(saved_group, **{key: group[key] for key in _RUNTIME_KEYS + _STORAGE_KEYS},
                 seed=saved_group.get("seed", group["seed"]))
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        pairs = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(ids, pairs):
            if pid not in saved:
                continue
            st = self.state[p]
            if _distributed.is_dtensor(p) or any(map(_distributed.is_dtensor, saved[pid].values())):
                for key, v in saved[pid].items():  # laid out as a new state would be (an fp32 momentum)
                    st[key] = _distributed.load_stat(p, key, v, math_dtype(p.dtype))
            else:
                for key, v in saved[pid].items():
                    if key in _STATS_KEYS:
                        st[key] = v.to(device=p.device, dtype=math_dtype(p.dtype), copy=True)
                st.update(_loaded_momentum(saved[pid], p, group["momentum_dtype"]))
                if _wants_comp(group, p):
                    comp = saved[pid].get(_COMP_KEY)
                    st[_COMP_KEY] = (torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device) if comp is None
                                     else comp.to(device=p.device, dtype=torch.bfloat16, copy=True))
            if "step" in st:  # a copy, as every other tensor: a live optimizer's state_dict shares its counters
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32, copy=True)
        self._reset_caches()  # tensors changed: fused backends rebuild their tables


# ---------------------------------------------------------------------- checkpoint validation
def _check_state_dict(opt: "CAME", sd: Any) -> None:
    """Raise ValueError, naming the group or param and what was expected, unless `sd` is a state dict this
    optimizer can load; changes nothing."""
    def bad(msg):
        raise ValueError(f"CAME.load_state_dict: {msg}; nothing was loaded")

    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        bad("expected a dict with 'state' and 'param_groups' (what CAME.state_dict() returns)")
    groups, state = sd["param_groups"], sd["state"]
    if not isinstance(groups, (list, tuple)) or not isinstance(state, dict):
        bad("'param_groups' must be a list and 'state' a dict")
    if len(groups) != len(opt.param_groups):
        bad(f"the state dict has {len(groups)} param groups, this optimizer {len(opt.param_groups)}")
    for gi, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        where = f"param group {gi}"
        if not isinstance(saved, dict):
            bad(f"{where} is a {type(saved).__name__}, expected a dict")
        missing = [k for k in _REQUIRED_GROUP_KEYS if k not in saved]
        if missing:
            bad(f"{where} lacks {missing} (a CAME group has {list(_REQUIRED_GROUP_KEYS)})")
        if len(saved["params"]) != len(group["params"]):
            bad(f"{where} has {len(saved['params'])} params in the state dict, {len(group['params'])} here")
        check = dict(saved, maximize=saved.get("maximize", False), backend=group["backend"])
        try:  # a scheduler may have saved lr = 0 (e.g. at the start of a warm-up)
            _check_group(check, where, allow_zero_lr=True, read_tensor_lr=True)
        except ValueError as e:
            bad(str(e).replace("CAME ", "", 1))
        for pid, p in zip(saved["params"], group["params"]):
            st = state.get(pid)
            if st is None:
                continue  # a param that had no grad yet: no state, as in torch
            pwhere = f"{where}, param of shape {tuple(p.shape)} (state id {pid})"
            if not isinstance(st, dict):
                bad(f"{pwhere}: state is a {type(st).__name__}, expected a dict")
            want = dict(state_shapes(p.shape, saved.get("factor_conv", False)))
            keys = set(st) - set(_UNUSED_CAME_PYTORCH_KEYS) - {"step", _COMP_KEY}
            # The momentum in either layout (fp32/bf16 exp_avg, or int8 codes with their absmax), whatever
            # the saving optimizer's momentum_dtype: it is converted to this one's on load.
            quantized = {"exp_avg_q": (tuple(p.shape), torch.int8),
                         "exp_avg_absmax": (((p.numel() + QBLOCK - 1) // QBLOCK,), torch.float32)}
            momentum = quantized if "exp_avg_q" in keys else {"exp_avg": (tuple(p.shape), None)}
            if keys != set(want) | set(momentum):
                hint = (" (it looks like another optimizer's state, e.g. AdamW's exp_avg/exp_avg_sq)"
                        if "exp_avg_sq" in keys and p.ndim >= 2 else "")
                bad(f"{pwhere}: state keys {sorted(keys)}, expected {sorted(set(want) | {'exp_avg'})} (or "
                    f"'exp_avg_q' and 'exp_avg_absmax' for an int8 momentum instead of 'exp_avg'){hint}")
            for key, (shape, dtype) in dict(momentum, **({_COMP_KEY: (tuple(p.shape), None)} if _COMP_KEY in st
                                                          else {})).items():
                v = st[key]
                if not isinstance(v, Tensor):
                    bad(f"{pwhere}: '{key}' is a {type(v).__name__}, expected a tensor of shape {shape}")
                if tuple(v.shape) != shape:
                    bad(f"{pwhere}: '{key}' has shape {tuple(v.shape)}, expected {shape}")
                if v.layout != torch.strided or (v.dtype != dtype if dtype is not None else not v.is_floating_point()):
                    bad(f"{pwhere}: '{key}' must be a dense {dtype or 'floating'} tensor, got {v.dtype} {v.layout}")
                why = _distributed.check_loaded_stat(p, key, v)
                if why is not None:
                    bad(f"{pwhere}: {why}")
            if "step" not in st:
                bad(f"{pwhere}: state lacks 'step'")
            step = st["step"]
            if isinstance(step, Tensor):
                if step.numel() != 1 or step.is_complex():
                    bad(f"{pwhere}: 'step' must be a number or a 1-element tensor, got shape {tuple(step.shape)}")
            elif not isinstance(step, numbers.Real):
                bad(f"{pwhere}: 'step' must be a number or a tensor, got {type(step).__name__}")
            for key, shape in want.items():
                v = st[key]
                if not isinstance(v, Tensor):
                    bad(f"{pwhere}: '{key}' is a {type(v).__name__}, expected a tensor of shape {shape}")
                if tuple(v.shape) != shape:
                    bad(f"{pwhere}: '{key}' has shape {tuple(v.shape)}, expected {shape}")
                if not v.is_floating_point() or v.layout != torch.strided:
                    bad(f"{pwhere}: '{key}' must be a dense floating tensor, got {v.dtype} {v.layout}")
                why = _distributed.check_loaded_stat(p, key, v)
                if why is not None:
                    bad(f"{pwhere}: {why}")


def _loaded_momentum(saved: dict, p: Tensor, momentum_dtype: str) -> dict:
    """The momentum entries of param p's state for this optimizer's `momentum_dtype`, from a checkpoint's
    (already checked) state `saved` in either layout: copied as they are when the layouts agree (resuming
    is bit-exact), else converted through fp32, rounding to nearest (a conversion draws no random bits)."""
    want = momentum_state(p.shape, momentum_dtype, p.dtype)
    have = {k: v for k, v in saved.items() if k in _MOMENTUM_KEYS}
    if set(have) == set(want) and all(v.dtype == want[k][1] for k, v in have.items()):
        return {k: v.to(device=p.device, copy=True) for k, v in have.items()}
    if "exp_avg_q" in have:
        m = dequantize_blockwise(have["exp_avg_q"].to(p.device), have["exp_avg_absmax"].to(p.device))
    else:
        m = have["exp_avg"].to(device=p.device, dtype=torch.float32)
    half = torch.full(p.shape, 0x80000000, dtype=torch.int64, device=p.device)  # random bits of 1/2: nearest
    if "exp_avg_q" in want:
        q, absmax = quantize_blockwise(m, half)
        return {"exp_avg_q": q, "exp_avg_absmax": absmax}
    dtype = want["exp_avg"][1]
    return {"exp_avg": sr_bf16(m, half) if dtype == torch.bfloat16 else m.to(dtype, copy=True)}


# ---------------------------------------------------------------------- validation helpers
def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_lr(lr: Any, where: str, allow_zero: bool = False, read_tensor_lr: bool = False,
              allow_one_element: bool = False) -> None:
    """A float lr is checked by value. A tensor lr by shape and dtype always, and by value only where
    `read_tensor_lr` (construction, add_param_group): in step() reading it would be a host sync."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or (lr.ndim != 0 and not allow_one_element) or not lr.is_floating_point():
            raise ValueError(f"CAME ({where}): a tensor lr must be a 0-d floating tensor, got shape "
                             f"{tuple(lr.shape)} dtype {lr.dtype}")
        if read_tensor_lr:
            v = float(lr)
            if math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"CAME ({where}): invalid lr tensor({v!r}); expected a finite value > 0")
        return
    if not _is_real(lr) or math.isnan(lr) or math.isinf(lr) or lr < 0 or (lr == 0 and not allow_zero):
        raise ValueError(f"CAME ({where}): invalid lr {lr!r}; expected a finite float > 0 (or a 0-d tensor)")


def _raise_bad_grad(p: Tensor, g: Tensor, where: str) -> None:
    where = f"{where}, param of shape {tuple(p.shape)}"
    if g.layout != torch.strided:
        raise RuntimeError(f"CAME does not support sparse gradients ({where}, grad layout {g.layout}); "
                           "use dense gradients (e.g. nn.Embedding(sparse=False))")
    if g.is_complex():
        raise RuntimeError(f"CAME: complex gradients are not supported ({where}, grad dtype {g.dtype})")
    if not g.dtype.is_floating_point:
        raise RuntimeError(f"CAME: gradient must be floating point, got {g.dtype} ({where})")
    if g.shape != p.shape:
        raise RuntimeError(f"CAME: gradient shape {tuple(g.shape)} differs from its parameter's ({where})")
    if _distributed.is_dtensor(g) != _distributed.is_dtensor(p):
        what = ("a DTensor gradient for a plain parameter" if _distributed.is_dtensor(g)
                else "a plain gradient for a DTensor parameter")
        raise RuntimeError(f"CAME: {what} ({where}); expected both DTensors laid out alike, or both plain")
    raise RuntimeError(f"CAME: gradient on {g.device} but its parameter on {p.device} ({where})")


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False, and no CUDA call, without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _bias_terms(value: Any, where: str) -> Union[bool, tuple]:
    """False, or the tuple of the bias correction's terms in BIAS_TERMS order (True: all of them)."""
    if value is False or value is None:
        return False
    if value is True:
        return BIAS_TERMS
    if isinstance(value, str):
        value = (value,)
    try:
        given = set(value)
    except TypeError:
        given = set()
    terms = tuple(t for t in BIAS_TERMS if t in given)  # one order, whatever order was given
    if not given or len(terms) != len(given):
        raise ValueError(f"CAME ({where}): bias_correction must be True, False or a tuple of terms among "
                         f"{BIAS_TERMS}, got {value!r}")
    return terms


def _wants_comp(group: dict, p: Tensor) -> bool:
    """Whether param p keeps a Kahan compensation buffer (param_rounding="kahan", bf16 p)."""
    return group["param_rounding"] == "kahan" and p.dtype == torch.bfloat16


def _three_betas(betas) -> tuple:
    betas = tuple(betas)
    return betas + (_DEFAULT_BETA3,) if len(betas) == 2 else betas


def _check_group(group: dict, where: str, lr_optional: bool = False, read_tensor_lr: bool = False,
                 allow_zero_lr: bool = False) -> None:
    if not (lr_optional and group["lr"] is None):
        _check_lr(group["lr"], where, allow_zero=allow_zero_lr, read_tensor_lr=read_tensor_lr,
                  allow_one_element=True)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) not in (2, 3):
        raise ValueError(f"CAME ({where}): betas must be (beta1, beta2, beta3) or an AdamW-style (beta1, beta2) "
                         f"with beta3 = {_DEFAULT_BETA3}; got {betas!r}")
    for i, b in enumerate(betas):
        if not _is_real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"CAME ({where}): invalid beta at index {i}: {b!r}; expected 0 <= beta < 1")
    eps = group["eps"]
    if _is_real(eps):
        raise ValueError(f"CAME ({where}): eps must be a pair (eps1, eps2), got the single float {eps!r}. CAME "
                         "adds eps1 to g^2 (default 1e-30) and eps2 to the confidence residual (default 1e-16); "
                         "neither is Adam's eps. Use e.g. eps=(1e-30, 1e-16)")
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"CAME ({where}): eps must be a pair (eps1, eps2), got {eps!r}")
    for i, e in enumerate(eps):
        if not _is_real(e) or not e >= 0.0 or math.isinf(e):
            raise ValueError(f"CAME ({where}): invalid eps at index {i}: {e!r}; expected a finite float >= 0")
    d = group["clip_threshold"]
    if not _is_real(d) or not d > 0.0 or math.isinf(d):
        raise ValueError(f"CAME ({where}): invalid clip_threshold {d!r}; expected a finite float > 0")
    wd = group["weight_decay"]
    if not _is_real(wd) or not wd >= 0.0 or math.isinf(wd):
        raise ValueError(f"CAME ({where}): invalid weight_decay {wd!r}; expected a finite float >= 0")
    _bias_terms(group.get("bias_correction", False), where)
    if not isinstance(group.get("factor_conv", False), bool):
        raise ValueError(f"CAME ({where}): factor_conv must be a bool, got {group['factor_conv']!r}")
    if group.get("momentum_dtype", "fp32") not in MOMENTUM_DTYPES:
        raise ValueError(f"CAME ({where}): momentum_dtype must be one of {MOMENTUM_DTYPES}, got "
                         f"{group['momentum_dtype']!r}")
    if group.get("param_rounding", "nearest") not in PARAM_ROUNDINGS:
        raise ValueError(f"CAME ({where}): param_rounding must be one of {PARAM_ROUNDINGS}, got "
                         f"{group['param_rounding']!r}")
    seed = group.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"CAME ({where}): seed must be an int in [0, 2**32), got {seed!r}")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"CAME ({where}): maximize must be a bool, got {group['maximize']!r}")
    if group["backend"] not in ("auto",) + BACKENDS:
        raise ValueError(f"CAME ({where}): unknown backend {group['backend']!r}; expected one of "
                         f"{('auto',) + BACKENDS}")
