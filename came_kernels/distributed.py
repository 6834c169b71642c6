"""CAME on DTensor parameters (FSDP2's `fully_shard`, HSDP, tensor parallel): the update of the whole
tensors, computed on each process's shard, with the statistics that span shards summed across processes.

The math is the torch backend's (backends/torch_backend.py, the spec), phase by phase; this module only
runs each phase for every tensor of a group, all-reduces the partial sums the phase could not finish, and
goes on. A parameter is viewed as a batch of [M, N] matrices (its last two dims); one mesh dim may cut
one tensor dim d (Shard(d)), the other mesh dims must be Replicate (every replica then holds the same
shard and the same gradient, so it computes the same numbers with no communication):

    rows cut (d = ndim-2; FSDP2's Shard(0) of a matrix, row-parallel TP):
        r, R     mean_N is local (every row is whole here)
        c, C     mean_M(g^2), mean_M(res): column sums over the local rows, all-reduced, / global M
        mean_M(r), mean_M(R): the local part of sum_M, all-reduced, / global M
    columns cut (d = ndim-1; column-parallel TP):
        r, R     mean_N: row sums over the local columns, all-reduced, / global N (then r is whole here,
                 and mean_M(r) is local)
        c, C     local
    batch cut (d < ndim-2; dim 0 of a 3-D or 4-D param): every matrix is whole here
    1-D params: v is elementwise, local
    every cut:  sum(u^2) of the whole tensor for the RMS clip (the factors and the clip are per tensor)

A local shard may be empty or shorter than the others (uneven dims, dims smaller than the mesh): the
means divide by the global M and N, and an empty shard still takes part with zero partials, so that
every process builds the same buffers in the same order.

Communication per step and process group: three all_reduce calls (after the partials of sq_stats,
clip_stats and momentum_res), each on one flat buffer holding the partials of every tensor of the group
(fp32; fp64 for fp64 params). In floats: 2 * (sum over row-cut tensors of B*(N+1) + sum over column-cut
tensors of B*M) + one per sharded tensor. For FSDP2 that is about twice the summed widths of the
matrices, far less than the all-gather and reduce-scatter of the parameters themselves. No host sync:
the collectives are queued like any kernel (NCCL), and no Python branch reads a tensor's value.

State: each statistic is a DTensor on the param's mesh, sharded like the axis it indexes: for Shard(d)
of the param, r and R (shape[:-1]) are Shard(d) unless d is the last dim (then Replicate); c and C
(shape[:-2] + shape[-1:]) are Replicate when d = ndim-2, Shard(ndim-2) when d = ndim-1, else Shard(d);
m and v are sharded like the param. So `torch.distributed.checkpoint` saves and reshards them.

The fused backends do not take shards (their finalize kernels would need to hand partials out between
phases): backend="auto" runs DTensor params here, and backend="triton"/"cuda" or fused=True refuse them.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .backends import torch_backend as tb

__all__ = ["is_dtensor", "is_fsdp1_flat_param", "check_param", "check_grads", "check_states", "came_step",
           "agree_found_inf", "new_stats", "check_loaded_stat", "load_stat"]

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except Exception:  # a torch built without distributed support: no DTensor can exist
    dist = DTensor = Replicate = Shard = distribute_tensor = None

_ROW_KEYS = ("exp_avg_sq_row", "exp_avg_res_row")
_COL_KEYS = ("exp_avg_sq_col", "exp_avg_res_col")
_SUPPORTED = ("supported: Shard(d) on at most one mesh dim (FSDP2's fully_shard, HSDP's (Replicate(), Shard(0)), "
              "row- or column-parallel tensor parallel) and Replicate() on the others")


def is_dtensor(x: Any) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


def is_fsdp1_flat_param(p: Tensor) -> bool:
    """An FSDP1 parameter: a FlatParameter (1-D concatenation of many tensors), or with use_orig_params=True
    an original parameter flattened to its 1-D piece of one."""
    return bool(getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False))


class _Layout(NamedTuple):
    """How a DTensor param is cut: the process group holding different pieces (None: every process holds
    the whole tensor), which axis of the [B, M, N] view is cut, the global M and N. `split` is what the
    torch backend's phase functions take: None unless rows or columns are cut."""
    group: Any
    rows: bool
    cols: bool
    m: int
    n: int

    @property
    def split(self):
        return self if (self.rows or self.cols) else None


def _shard_dim(p: Tensor, where: str) -> Optional[tuple]:
    """(mesh dim, tensor dim) of p's one Shard placement, None when it has none; ValueError otherwise."""
    found = None
    for mesh_dim, pl in enumerate(p.placements):
        if type(pl) is Replicate:
            continue
        if type(pl) is not Shard:  # Partial, _StridedShard, anything newer
            raise ValueError(
                f"CAME ({where}): unsupported DTensor placement {pl!r} in {tuple(p.placements)} on a mesh of shape "
                f"{tuple(p.device_mesh.shape)}; {_SUPPORTED}")
        if found is not None:
            raise ValueError(
                f"CAME ({where}): placements {tuple(p.placements)} shard the tensor over more than one mesh dim; "
                f"CAME sums its statistics over one process group per tensor; {_SUPPORTED}")
        found = (mesh_dim, pl.dim % p.ndim)
    return found


def check_param(p: Tensor, where: str) -> None:
    """ValueError naming `where` unless DTensor param p has placements CAME supports (see module docstring)."""
    _shard_dim(p, where)


def _layout(p: Tensor) -> _Layout:
    found = _shard_dim(p, "a DTensor param")
    m, n = (p.shape[-2], p.shape[-1]) if p.ndim >= 2 else (1, p.numel())
    if found is None or p.device_mesh.size(found[0]) == 1:
        return _Layout(None, False, False, m, n)
    mesh_dim, d = found
    return _Layout(p.device_mesh.get_group(mesh_dim), p.ndim >= 2 and d == p.ndim - 2,
                   p.ndim >= 2 and d == p.ndim - 1, m, n)


def _stat_placements(p: Tensor, key: str) -> tuple:
    """The placements of state `key` of DTensor param p (see the module docstring)."""
    out = []
    for pl in p.placements:
        if type(pl) is Replicate:
            out.append(pl)
            continue
        d, nd = pl.dim % p.ndim, p.ndim
        if key in _ROW_KEYS:
            out.append(Replicate() if d == nd - 1 else Shard(d))
        elif key in _COL_KEYS:
            out.append(Replicate() if d == nd - 2 else Shard(nd - 2) if d == nd - 1 else Shard(d))
        else:  # exp_avg, exp_avg_sq: the param's shape
            out.append(Shard(d))
    return tuple(out)


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def new_stats(p: Tensor, dtype: torch.dtype) -> dict:
    """Zero statistics of DTensor param p (every state key but exp_avg and step), as DTensors on its mesh.
    No communication: each process makes its own piece, whose shape is the statistics' shape of its local
    shard (the cut axis has the same local length in the param and in the statistic)."""
    local = tb.state_shapes(p.to_local().shape)
    out = {}
    for key, shape in tb.state_shapes(p.shape).items():
        out[key] = DTensor.from_local(torch.zeros(local[key], dtype=dtype, device=p.device), p.device_mesh,
                                      _stat_placements(p, key), run_check=False, shape=torch.Size(shape),
                                      stride=_contiguous_stride(shape))
    return out


def check_loaded_stat(p: Tensor, key: str, v: Tensor) -> Optional[str]:
    """Why saved state `key` cannot be loaded for param p (a DTensor on another mesh), else None."""
    if is_dtensor(p) and is_dtensor(v) and v.device_mesh != p.device_mesh:
        return (f"'{key}' is a DTensor on mesh {v.device_mesh}, the param is on mesh {p.device_mesh}; "
                "load it through torch.distributed.checkpoint, which reshards")
    return None


def load_stat(p: Tensor, key: str, v: Tensor, dtype: torch.dtype) -> Tensor:
    """Saved state `key` as this optimizer keeps it for p: a copy in `dtype`, laid out like new_stats (or
    exp_avg: like p). A DTensor saved with other placements is redistributed; a plain tensor (a full state
    dict, the same on every process) is cut into this process's piece; a DTensor for a plain param is
    gathered whole."""
    if not is_dtensor(p):
        return v.full_tensor().to(device=p.device, dtype=dtype, copy=True)
    placements = _stat_placements(p, key)
    if is_dtensor(v):
        if tuple(v.placements) != placements:
            v = v.redistribute(p.device_mesh, placements)
        return v.to(dtype=dtype, copy=True)
    return distribute_tensor(v.to(device=p.device, dtype=dtype, copy=True), p.device_mesh, placements,
                             src_data_rank=None)  # None: each process cuts its piece, no scatter


# ---------------------------------------------------------------------- validation before a step
def _same_mesh(a, b) -> bool:
    return a is b or a == b  # DeviceMesh equality compares the rank layout: identity first


def check_grads(params, grads) -> None:
    """RuntimeError naming the param unless every grad is a DTensor laid out like its DTensor param. Run
    every step (grads are new objects each backward), before anything changes."""
    for p, g in zip(params, grads):
        if is_dtensor(g) and tuple(g.placements) == tuple(p.placements) and _same_mesh(g.device_mesh, p.device_mesh):
            continue
        got = (f"a DTensor with placements {tuple(g.placements)} on mesh {g.device_mesh}" if is_dtensor(g)
               else "a plain tensor")
        raise RuntimeError(f"CAME (param of shape {tuple(p.shape)} with placements {tuple(p.placements)}): its grad "
                           f"is {got}; expected a DTensor laid out like the param (placements "
                           f"{tuple(p.placements)} on mesh {p.device_mesh})")


def check_states(params, exp_avgs, rows, cols, res_rows, res_cols, sqs) -> None:
    """RuntimeError naming the param unless every state of these DTensor params is a DTensor laid out as
    new_stats makes it. Run whenever the state lists are built, before anything changes."""
    for i, p in enumerate(params):
        state = {"exp_avg": exp_avgs[i], "exp_avg_sq_row": rows[i], "exp_avg_sq_col": cols[i],
                 "exp_avg_res_row": res_rows[i], "exp_avg_res_col": res_cols[i], "exp_avg_sq": sqs[i]}
        for key, v in state.items():
            if v is None:
                continue
            want = _stat_placements(p, key)
            if not is_dtensor(v) or not _same_mesh(v.device_mesh, p.device_mesh) or tuple(v.placements) != want:
                got = f"placements {tuple(v.placements)}" if is_dtensor(v) else "a plain tensor"
                raise RuntimeError(f"CAME (param of shape {tuple(p.shape)} with placements {tuple(p.placements)}): "
                                   f"state '{key}' is {got}; expected a DTensor with placements {want} on the "
                                   "param's mesh (as CAME makes it, and CAME.load_state_dict loads it)")


# ---------------------------------------------------------------------- cross-process sums
class _Sums:
    """The partial sums of one phase: one flat buffer and one all_reduce per (process group, device, dtype),
    in the order the tensors were added (the same on every process)."""

    def __init__(self):
        self._parts: dict = {}
        self._sums: dict = {}

    def add(self, group, parts: list) -> Optional[tuple]:
        if group is None or not parts:
            return None
        key = (group, parts[0].device, parts[0].dtype)
        lst = self._parts.setdefault(key, [])
        lst.extend(parts)
        return key, len(lst) - len(parts), len(parts)

    def all_reduce(self) -> None:
        for key, parts in self._parts.items():
            flat = torch.cat([x.reshape(-1) for x in parts])
            dist.all_reduce(flat, group=key[0])
            self._sums[key] = [s.view(x.shape) for s, x in zip(flat.split([x.numel() for x in parts]), parts)]

    def get(self, handle) -> list:
        if handle is None:
            return []
        key, start, count = handle
        return self._sums[key][start:start + count]


def _layouts(params, cache: dict) -> list:
    memo = cache.get("layouts")
    if memo is None or memo[0] is not params:  # the optimizer passes the same list every step in steady state
        memo = cache["layouts"] = (params, [_layout(p) for p in params])
    return memo[1]


def agree_found_inf(found_inf: Tensor, params, cache: dict) -> Tensor:
    """GradScaler's found_inf, maxed over the processes that hold pieces of these params. torch.amp.GradScaler
    looks at this process's grads only; were one process to skip a step and another not, the step counters
    would part and the next all_reduce would wait forever. One 1-element all_reduce per process group."""
    found_inf = found_inf.detach().reshape(1).to(torch.float32, copy=True)
    for group in dict.fromkeys(lay.group for lay in _layouts(params, cache) if lay.group is not None):
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf


# ---------------------------------------------------------------------- the step
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
) -> None:
    """One CAME step for DTensor params (the backend contract of backends/README.md; lists as checked by
    check_grads and check_states). Every process of each param's mesh must call it with the same params in
    the same order, as it does with FSDP2. GradScaler: as the torch backend (found_inf is read on the host),
    with the found_inf of agree_found_inf (functional.came calls it), the same on every process."""
    if found_inf is not None and bool(found_inf.reshape(()).item()):  # made the same everywhere: agree_found_inf
        return
    inv_scale = None if grad_scale is None else grad_scale.reshape(()).double().reciprocal().float()
    cache = {} if cache is None else cache
    layouts = _layouts(params, cache)
    # Bias correction: per-tensor scalars from the step counters (the same on every process), no sums.
    scales = [None] * len(params) if bias_scales is None else list(bias_scales.unbind(0))

    def local(xs):
        return [None if x is None else x.to_local() for x in xs]

    P, G, Mo, r, c, R, C, V = map(local, (params, grads, exp_avgs, exp_avg_sq_rows, exp_avg_sq_cols,
                                          exp_avg_res_rows, exp_avg_res_cols, exp_avg_sqs))
    # By global size, so that every process runs the same tensors (a local shard may be empty).
    factored = [i for i, p in enumerate(params) if p.ndim >= 2 and p.numel() > 0]
    vectors = [i for i, p in enumerate(params) if p.ndim < 2 and p.numel() > 0]

    # One scratch buffer per (device, math dtype) for every factored shard, as in the torch backend.
    sizes: dict = {}
    for i in factored:
        key = (Mo[i].device, Mo[i].dtype)
        sizes[key] = max(sizes.get(key, 0), Mo[i].numel())
    scratch = {k: torch.empty(n, dtype=k[1], device=k[0]) for k, n in sizes.items()}

    bufs = {i: scratch[(Mo[i].device, Mo[i].dtype)][: Mo[i].numel()].view(Mo[i].shape) for i in factored}

    # ---- phase 1 (sq_stats): EMAs of r and c; row and column factors of u
    sums, handles = _Sums(), {}
    for i in factored:
        lay = layouts[i]
        parts = tb._sq_stats_(bufs[i], G[i], r[i], c[i], inv_scale=inv_scale, beta2=beta2, eps1=eps1,
                              split=lay.split)
        handles[i] = sums.add(lay.group, parts)
    sums.all_reduce()
    factors = {i: tb._sq_factors(r[i], c[i], beta2=beta2, eps1=eps1, maximize=maximize, split=layouts[i].split,
                                 sums=sums.get(handles[i])) for i in factored}

    # ---- phase 2 (clip_stats): the norm of u over the whole tensor
    sums, handles, norms = _Sums(), {}, {}
    for i in factored:
        b = bufs[i]
        tb._u_(b, G[i], *factors[i], inv_scale, scales[i])
        norms[i] = torch.linalg.vector_norm(b)
        handles[i] = sums.add(layouts[i].group, [norms[i].square()])
    buckets: dict = {}  # _foreach_* ops want one device and dtype per list
    for i in vectors:
        buckets.setdefault((P[i].device, P[i].dtype, G[i].dtype), []).append(i)
    vec_u, vec_norms, vec_scales = {}, {}, {}
    for bk, idx in buckets.items():
        vec_scales[bk] = None if bias_scales is None else [scales[i] for i in idx]
        vec_u[bk] = tb._vector_u([G[i] for i in idx], [Mo[i] for i in idx], [V[i] for i in idx], vec_scales[bk],
                                 inv_scale=inv_scale, beta2=beta2, eps1=eps1, maximize=maximize)
        vec_norms[bk] = torch._foreach_norm(vec_u[bk])
        for i, n in zip(idx, vec_norms[bk]):
            handles[i] = sums.add(layouts[i].group, [n.square()])
    sums.all_reduce()

    def norm(i, local_norm):
        total = sums.get(handles[i])
        return total[0].sqrt() if total else local_norm

    # ---- phase 3 (momentum_res): u_hat, momentum, EMAs of R and C
    res_sums, res_handles = _Sums(), {}
    for i in factored:
        b = bufs[i]
        tb._u_(b, G[i], *factors[i], inv_scale, scales[i])  # again: the scratch is shared by all tensors
        tb._clip_(b, norm(i, norms[i]), params[i].numel(), clip_threshold)
        parts = tb._momentum_res_(b, Mo[i], R[i], C[i], beta1=beta1, beta3=beta3, eps2=eps2,
                                  split=layouts[i].split)
        res_handles[i] = res_sums.add(layouts[i].group, parts)
    for bk, idx in buckets.items():  # unfactored: phases 2 to 4, no statistics cross shards after the clip
        tb._vector_clip_(vec_u[bk], [norm(i, n) for i, n in zip(idx, vec_norms[bk])],
                         [params[i].numel() for i in idx], clip_threshold)
        tb._vector_update_([P[i] for i in idx], [Mo[i] for i in idx], vec_u[bk], vec_scales[bk], lr=lr,
                           beta1=beta1, weight_decay=weight_decay)
    res_sums.all_reduce()

    # ---- phase 4 (param_step)
    for i in factored:
        row_f, col_f = tb._stats_factors(R[i], C[i], beta3, eps2, layouts[i].split, res_sums.get(res_handles[i]))
        tb._param_step_(P[i], bufs[i], Mo[i], row_f, col_f, scales[i], lr, weight_decay)
