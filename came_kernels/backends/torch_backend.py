"""The torch backend: CAME (came-pytorch 0.1.3 semantics) in plain PyTorch. This file is the spec.

Every fused backend is tested against `came_step` below. The math, per tensor, with d = clip_threshold and
the parameter viewed as a batch of [M, N] matrices when it has two or more dims ("factored"):

    factored:  r = b2*r + (1-b2)*mean_N(g^2+eps1)            c = b2*c + (1-b2)*mean_M(g^2+eps1)
               u = g * rsqrt(r / mean_M(r))[:, None] * rsqrt(c)[None, :]
    else:      v = b2*v + (1-b2)*(g^2+eps1)                  u = g * rsqrt(v)
    u_hat = u / max(1, RMS(u) / d)
    m = b1*m + (1-b1)*u_hat
    factored:  res = (u_hat - m)^2 + eps2
               R = b3*R + (1-b3)*mean_N(res)                 C = b3*C + (1-b3)*mean_M(res)
               update = m * rsqrt(R / mean_M(R))[:, None] * rsqrt(C)[None, :]
    else:      update = m
    p = p - lr*weight_decay*p - lr*update

Opt-in bias correction (`bias_correction`, off by default as in came-pytorch 0.1.3, which never reads the
step counter t). Each term divides one statistic by its EMA's weight sum 1 - beta^t:
    "exp_avg_sq":   c / (1-b2^t) (factored; the row correction cancels in r / mean_M(r)) or v / (1-b2^t)
    "exp_avg_res":  C / (1-b3^t) (factored only; the row correction cancels in R / mean_M(R))
    "exp_avg":      m / (1-b1^t) in the update only: the residual keeps the raw m (corrected there, it
                    would make (u_hat - m) zero at t = 1 and the update explode)
Every term is a per-tensor scalar, so the whole correction is two numbers per tensor (`bias_scales`):
    s_u = sqrt(1-b2^t)                         u is multiplied by it before the clip
    s_m = sqrt(1-b3^t) / (1-b1^t)              the update is multiplied by it (weight decay is not)
(a term that is off contributes 1). The fused backends take the same [T, 2] tensor.

Opt-in conv factoring (`factor_conv`): a param with ndim >= 3 is stepped as its [shape[0], numel/shape[0]]
matrix (functional.came hands every backend that view, see `state_shapes`); the rule above is unchanged.

Arithmetic is fp32 (fp64 for fp64 params) whatever the storage dtype, and a low-precision parameter is
rounded once, at its final store. Memory: one scratch buffer the size of the largest factored tensor is
allocated per call and reused by every phase of every tensor (came-pytorch allocates about four
full-size temporaries per tensor); a bf16/fp16 gradient is read through type promotion, never copied.
Tensors with ndim < 2 (biases, norms, scalars) go through torch._foreach_* ops: many tiny tensors, where
per-tensor Python overhead would dominate.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["came_step", "unavailable_reason", "math_dtype", "state_shapes", "matrix_shape", "bias_scales",
           "BIAS_TERMS"]

# The statistics bias correction can divide by 1 - beta^t (see the module docstring).
BIAS_TERMS = ("exp_avg", "exp_avg_sq", "exp_avg_res")


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None  # plain PyTorch runs wherever torch does


def state_shapes(shape, factor_conv: bool = False) -> dict:
    """{state key: shape} of the statistics of a param of `shape` (came-pytorch 0.1.3's layout): factored
    (ndim >= 2) over the last two dims, else one full-size v. The momentum `exp_avg` has the param's shape.

    factor_conv (opt-in): a param with ndim >= 3 (a conv weight [out, in, *kernel]) is factored as the one
    matrix [shape[0], numel / shape[0]] (`matrix_shape`) instead of a batch of [in, kernel] matrices, whose
    row statistics are as large as the weight divided by its last dim (all of it for a 1x1 conv)."""
    shape = tuple(shape)
    if factor_conv and len(shape) >= 3:
        shape = matrix_shape(shape)
    if len(shape) >= 2:
        row, col = shape[:-1], shape[:-2] + shape[-1:]
        return {"exp_avg_sq_row": row, "exp_avg_sq_col": col, "exp_avg_res_row": row, "exp_avg_res_col": col}
    return {"exp_avg_sq": shape}


def matrix_shape(shape) -> tuple:
    """The [out, rest] matrix a param of ndim >= 3 is stepped as under factor_conv (see state_shapes)."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:]))


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics, the momentum and the arithmetic for a parameter of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_scales(steps: list[Tensor], factored: list[bool], terms, *, beta1: float, beta2: float,
                beta3: float, cache: Optional[dict] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """[T, 2] tensor of (s_u, s_m) per tensor (see the module docstring), in `dtype`, from the step counters
    `steps` (0-d fp32 tensors on one device, already incremented for this step). Device ops only: no host
    sync, and t is data, so a growing t never recompiles a compiled step. 1 - b^t is computed as
    -expm1(t * log(b)), which keeps its digits when b^t is close to 1 (1 - 0.9999 in fp32 is off by 2e-4).
    `cache`: where the device constant for tensors without a confidence statistic is kept between calls."""
    terms = frozenset(terms)
    t = torch.stack(steps).to(dtype)

    def weight_sum(beta, t):  # 1 - beta^t
        return torch.expm1(t * math.log(beta)).neg_() if beta > 0 else torch.ones_like(t)

    ones = torch.ones_like(t)
    s_u = weight_sum(beta2, t).sqrt_() if "exp_avg_sq" in terms else ones
    s_m = weight_sum(beta1, t).reciprocal_() if "exp_avg" in terms else ones
    if "exp_avg_res" in terms and any(factored):
        # Only factored tensors have C: the others get t = inf, for which 1 - b3^t = 1 (no data-dependent
        # indexing, no host-to-device copy of a mask).
        key = ("never", t.device)
        never = None if cache is None else cache.get(key)
        if never is None:
            never = torch.full((), math.inf, dtype=torch.float32, device=t.device)  # as the counters
            if cache is not None:
                cache[key] = never
        t3 = torch.stack([s if f else never for s, f in zip(steps, factored)]).to(dtype)
        s_m = s_m * weight_sum(beta3, t3).sqrt_()
    return torch.stack([s_u, s_m], dim=1)


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
    """One CAME step for every tensor in the lists (see the module docstring and backends/README.md).

    bias_scales: None (no bias correction, came-pytorch 0.1.3), or the [T, 2] tensor of `bias_scales()`
    for these lists: row i holds (s_u, s_m) of tensor i.

    grad_scale, found_inf (GradScaler's, 1-element fp32 tensors): the grads are used divided by
    grad_scale, and nothing at all changes when found_inf is nonzero. Here found_inf is read on the host
    (this backend is the spec; the fused backends skip on the device, without a sync).
    """
    if found_inf is not None and bool(found_inf.reshape(()).item()):
        return
    if grad_scale is not None:
        # Multiply by 1/scale, as GradScaler.unscale_ does: the same numbers (exactly so for its power-of-2
        # scales), with the unscaled grad kept in fp32 rather than rounded to the grad's dtype.
        inv_scale = grad_scale.reshape(()).double().reciprocal().float()
    else:
        inv_scale = None
    scales = [None] * len(params) if bias_scales is None else list(bias_scales.unbind(0))  # views, no copy
    hyper = dict(inv_scale=inv_scale, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, eps1=eps1, eps2=eps2,
                 clip_threshold=clip_threshold, weight_decay=weight_decay, maximize=maximize)
    # Empty tensors have nothing to update; skipping them keeps their statistics finite (a mean over zero
    # rows would be NaN) and equal to what the fused backends leave, which skip them too.
    factored = [i for i, p in enumerate(params) if p.ndim >= 2 and p.numel() > 0]
    vectors = [i for i, p in enumerate(params) if p.ndim < 2 and p.numel() > 0]

    # One scratch buffer per (device, math dtype), sized for the largest factored tensor.
    scratch: dict = {}
    for i in factored:
        key = (exp_avgs[i].device, exp_avgs[i].dtype)
        scratch[key] = max(scratch.get(key, 0), params[i].numel())
    scratch = {k: torch.empty(n, dtype=k[1], device=k[0]) for k, n in scratch.items()}

    for i in factored:
        m = exp_avgs[i]
        buf = scratch[(m.device, m.dtype)][: m.numel()].view(m.shape)
        _factored_step(params[i], grads[i], m, exp_avg_sq_rows[i], exp_avg_sq_cols[i],
                       exp_avg_res_rows[i], exp_avg_res_cols[i], buf, scales[i], **hyper)

    # _foreach_* ops want one device and dtype per list.
    buckets: dict = {}
    for i in vectors:
        buckets.setdefault((params[i].device, params[i].dtype, grads[i].dtype), []).append(i)
    for idx in buckets.values():
        _vector_step([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                     [exp_avg_sqs[i] for i in idx], None if bias_scales is None else [scales[i] for i in idx],
                     **hyper)


def _row_col_factors(row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """rsqrt(row / mean_M(row)) and rsqrt(col): the factored inverse square root, as two small vectors."""
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1), col.rsqrt().unsqueeze(-2)


def _ema_(avg: Tensor, beta: float, new: Tensor) -> None:
    # came-pytorch's form, b*avg + (1-b)*new, kept op for op so results match it to the last bit or two.
    avg.mul_(beta).add_(new, alpha=1.0 - beta)


def _apply_update_(p: Tensor, update: Tensor, lr: Union[float, Tensor], weight_decay: float) -> None:
    """p = p - lr*weight_decay*p - lr*update, in the math dtype, rounding p once. Overwrites `update`."""
    update.mul_(lr)
    if weight_decay != 0:
        if p.dtype == update.dtype:
            # came-pytorch's order (p -= lr*wd*p, then p -= lr*update) for bit-level parity with it. Not
            # p.mul_(1 - lr*wd): 1 - lr*wd rounded to fp32 loses most digits of a small lr*wd.
            if isinstance(lr, Tensor):
                p.addcmul_(p, lr, value=-weight_decay)
            else:
                p.add_(p, alpha=-lr * weight_decay)
        elif isinstance(lr, Tensor):  # bf16/fp16 p: fold the decay into the update so p is rounded once
            update.addcmul_(p, lr, value=weight_decay)
        else:
            update.add_(p, alpha=lr * weight_decay)
    p.sub_(update)  # for bf16/fp16 p the subtraction runs in fp32 and rounds once


def _factored_step(p, g, m, r, c, R, C, buf, scale, *, inv_scale, lr, beta1, beta2, beta3, eps1, eps2,
                   clip_threshold, weight_decay, maximize) -> None:
    # ---- phase 1 (sq_stats): EMAs of the row and column means of g^2 + eps1
    buf.copy_(g)
    if inv_scale is not None:
        buf.mul_(inv_scale)  # GradScaler's unscale, in fp32
    buf.square_()
    _ema_(r, beta2, buf.mean(dim=-1).add_(eps1))
    _ema_(c, beta2, buf.mean(dim=-2).add_(eps1))
    row_f, col_f = _row_col_factors(r, c)
    if maximize:
        row_f.neg_()  # u is linear in g: negating the small row factor negates u
    torch.mul(g, row_f, out=buf).mul_(col_f)  # buf = u (g upcast exactly by type promotion)
    if inv_scale is not None:
        buf.mul_(inv_scale)  # exact for GradScaler's power-of-2 scales, so the order does not matter
    if scale is not None:
        buf.mul_(scale[0])  # bias correction: rsqrt(c / (1-b2^t)) = rsqrt(c) * s_u

    # ---- phase 2 (clip_stats): u_hat = u / max(1, RMS(u) / d)
    rms = torch.linalg.vector_norm(buf) / math.sqrt(buf.numel())
    buf.div_((rms / clip_threshold).clamp_(min=1.0))  # buf = u_hat

    # ---- phase 3 (momentum_res): momentum, then EMAs of the confidence residual (u_hat - m)^2 + eps2
    _ema_(m, beta1, buf)
    buf.sub_(m).square_()  # buf = (u_hat - m)^2
    _ema_(R, beta3, buf.mean(dim=-1).add_(eps2))
    _ema_(C, beta3, buf.mean(dim=-2).add_(eps2))

    # ---- phase 4 (param_step): update = m * rsqrt(R / mean_M(R)) * rsqrt(C); decoupled weight decay
    row_f, col_f = _row_col_factors(R, C)
    torch.mul(m, row_f, out=buf).mul_(col_f)
    if scale is not None:
        buf.mul_(scale[1])  # bias correction: m / (1-b1^t) and rsqrt(C / (1-b3^t)), as s_m
    _apply_update_(p, buf, lr, weight_decay)


def _vector_step(ps, gs, ms, vs, scales, *, inv_scale, lr, beta1, beta2, beta3, eps1, eps2,
                 clip_threshold, weight_decay, maximize) -> None:
    """Tensors with ndim < 2: the unfactored rule, all tensors of one (device, dtype) at once."""
    if gs[0].dtype != ms[0].dtype:
        gs = [g.to(ms[0].dtype) for g in gs]  # small tensors: the copy is cheaper than mixed-dtype foreach
    if inv_scale is not None:
        gs = torch._foreach_mul(gs, inv_scale.to(ms[0].dtype))
    if maximize:
        gs = torch._foreach_neg(gs)

    # ---- phase 1 (sq_stats): v = b2*v + (1-b2)*(g^2 + eps1);  u = g * rsqrt(v)
    u = torch._foreach_mul(gs, gs)
    torch._foreach_add_(u, eps1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_add_(vs, u, alpha=1.0 - beta2)
    u = torch._foreach_rsqrt(vs)
    torch._foreach_mul_(u, gs)
    if scales is not None:
        torch._foreach_mul_(u, [s[0] for s in scales])  # bias correction: rsqrt(v / (1-b2^t)), as s_u

    # ---- phase 2 (clip_stats): u_hat = u / max(1, RMS(u) / d)
    denoms = torch._foreach_norm(u)
    torch._foreach_div_(denoms, [math.sqrt(x.numel()) * clip_threshold for x in u])
    torch._foreach_clamp_min_(denoms, 1.0)
    torch._foreach_div_(u, denoms)

    # ---- phase 3 (momentum_res): momentum only; no confidence step for unfactored tensors
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, u, alpha=1.0 - beta1)

    # ---- phase 4 (param_step): update = m; decoupled weight decay
    update = torch._foreach_mul(ms, lr)
    if scales is not None:
        torch._foreach_mul_(update, [s[1] for s in scales])  # bias correction: m / (1-b1^t), as s_m
    if weight_decay != 0:
        if ps[0].dtype == ms[0].dtype:  # same order as _apply_update_
            torch._foreach_add_(ps, torch._foreach_mul(ps, -lr * weight_decay))
        else:
            torch._foreach_add_(update, torch._foreach_mul([p.to(ms[0].dtype) for p in ps], lr * weight_decay))
    torch._foreach_sub_(ps, update)  # bf16/fp16 params: computed in fp32, rounded once
