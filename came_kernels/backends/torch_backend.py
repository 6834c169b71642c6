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

Opt-in low-precision state (`momentum_dtype`, `param_rounding`, `seed`). The math above is unchanged and
fp32; only what is stored between steps changes:
    momentum "bf16":  m is stored as bf16, rounded stochastically (`sr_bf16`)
    momentum "int8":  m is stored as int8 codes q (param shape) with one fp32 absmax per block of QBLOCK
                      elements of the flattened tensor: m = q * (absmax * fp32(1/127)); the new m is
                      quantized with its block's new absmax, rounding stochastically (`quantize_blockwise`)
    (tensors with ndim < 2 or fewer than LOWBIT_MIN_NUMEL elements keep an fp32 m, as bitsandbytes does)
    The residual (u_hat - m)^2 uses the new m before it is stored; the update uses the stored m (what the
    next step starts from), so a parameter moves by exactly the momentum the state holds.
    param "stochastic" (bf16 params): p is stored rounded stochastically instead of to nearest;
    param "kahan" (bf16 params): a bf16 compensation k (state `param_comp`) carries what the last store
        rounded away: x = p + k; x = x - lr*wd*x - lr*update; p = bf16(x); k = bf16(x - p).
Random bits come from Philox4x32-10 (`philox`, the generator of Triton's tl.philox), keyed by
(seed, tensor id) with counters (element index lo, element index hi, step, stream): every backend draws the
same bits for the same element, the step is the device-side step counter (no sync, no recompile), and a run
is reproducible. Stream 0 rounds the momentum, stream 1 the parameter.

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
           "BIAS_TERMS", "MOMENTUM_DTYPES", "PARAM_ROUNDINGS", "QBLOCK", "LOWBIT_MIN_NUMEL", "momentum_storage",
           "momentum_state", "philox", "random_bits", "sr_bf16", "quantize_blockwise", "dequantize_blockwise",
           "rng_keys"]

# The statistics bias correction can divide by 1 - beta^t (see the module docstring).
BIAS_TERMS = ("exp_avg", "exp_avg_sq", "exp_avg_res")
# Opt-in low-precision state (see the module docstring).
MOMENTUM_DTYPES = ("fp32", "bf16", "int8")
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
QBLOCK = 256               # elements of the flattened tensor per int8 absmax
LOWBIT_MIN_NUMEL = 4096    # smaller tensors (and ndim < 2) keep an fp32 momentum: their state is negligible
INV127 = 0.007874015718698502  # fp32(1/127), exactly representable: m = q * (absmax * INV127)
STREAM_MOMENTUM, STREAM_PARAM = 0, 1  # Philox counter word 3: which rounding the bits are for
_M32 = 0xFFFFFFFF


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


def momentum_storage(shape, momentum_dtype: str, param_dtype: torch.dtype = torch.float32) -> str:
    """The storage ("fp32", "bf16" or "int8") of the momentum of a param of `shape` and `param_dtype` under
    the option `momentum_dtype`: low precision only for tensors with ndim >= 2 and at least LOWBIT_MIN_NUMEL
    elements (fp64 params keep the fp64 momentum of their math dtype, reported as "fp32")."""
    if momentum_dtype == "fp32" or param_dtype == torch.float64 or len(shape) < 2 \
            or math.prod(shape) < LOWBIT_MIN_NUMEL:
        return "fp32"
    return momentum_dtype


def momentum_state(shape, momentum_dtype: str, param_dtype: torch.dtype) -> dict:
    """{state key: (shape, dtype)} of the momentum of a param: `exp_avg` (fp32, or bf16), or int8 codes
    `exp_avg_q` of the param's shape and fp32 `exp_avg_absmax` [ceil(numel / QBLOCK)]."""
    shape = tuple(shape)
    kind = momentum_storage(shape, momentum_dtype, param_dtype)
    if kind == "int8":
        return {"exp_avg_q": (shape, torch.int8),
                "exp_avg_absmax": (((math.prod(shape) + QBLOCK - 1) // QBLOCK,), torch.float32)}
    return {"exp_avg": (shape, torch.bfloat16 if kind == "bf16" else math_dtype(param_dtype))}


def rng_keys(seed: int, ids) -> list:
    """Philox keys (int64: seed in the low 32 bits, the tensor's id in the high ones) of tensors `ids`."""
    return [(seed & _M32) | ((int(i) & 0x7FFFFFFF) << 32) for i in ids]


def _umul32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32 bits of a * b for uint32 values held in int64 (a * b itself would overflow int64):
    a is split into 16-bit halves, each product fits in 48 bits."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part, lo_part = a_hi * b, a_lo * b
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    return high, low


def philox(key: Tensor, c0: Tensor, c1, c2, c3, rounds: int = 10) -> tuple:
    """Philox4x32 (Salmon et al., SC 2011) with `rounds` rounds, as Triton's tl.philox(seed=key, c0, ..., c3):
    key is int64 (low 32 bits k0, high 32 bits k1), counters are uint32 values held in int64 tensors (or
    ints); returns the four output words, uint32 values in int64. Integer tensor ops only: bitwise equal to
    the Triton kernels' bits on any device (tests/test_low_precision.py checks it against tl.philox)."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    # An int counter stays an int: a device tensor made from it would be a host-to-device copy every step.
    c0, c1, c2, c3 = (c & _M32 for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        hi_b, lo_b = _umul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _umul32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def random_bits(rng: Tensor, numel: int, stream: int, device) -> Tensor:
    """32 random bits (int64 in [0, 2^32)) for elements 0..numel-1 of a tensor whose rng row is (key, step):
    Philox counters (index lo, index hi, step, stream), first output word."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    return philox(rng[0], idx & _M32, idx >> 32, rng[1] & _M32, stream)[0]


def sr_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 x rounded to bf16 stochastically: 16 random bits are added below the bf16 ulp and the result is
    truncated, so x rounds up with probability (x - down) / ulp and E[bf16] = x (unbiased). NaN stays NaN."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    u = (u + (bits >> 16)) >> 16
    out = u.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # 16-bit pattern (wraps to int16)
    return torch.where(x.isnan(), x.to(torch.bfloat16), out.view(x.shape))


def _blocks(x: Tensor) -> Tensor:
    """Flattened x, zero-padded to whole QBLOCKs, as [nblocks, QBLOCK]."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % QBLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QBLOCK)


def dequantize_blockwise(q: Tensor, absmax: Tensor) -> Tensor:
    """fp32 m from int8 codes q and per-block absmax: m = q * (absmax * fp32(1/127))."""
    scale = absmax * INV127  # a Python scalar: no device tensor per call (that would be a host copy and sync);
    # fp32 absmax times a scalar computes in fp32 with the scalar rounded to fp32, which INV127 already is
    return (_blocks(q.float()) * scale[:, None]).reshape(-1)[: q.numel()].view(q.shape)


def quantize_blockwise(m: Tensor, bits: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes of m's shape, fp32 absmax per block) of fp32 m: x = m * (127 / absmax) rounded
    stochastically (up with probability frac(x), from 24 random bits), clamped to [-127, 127]. Every op is
    one exactly specified fp32 operation, so the fused kernels can reproduce it bit for bit."""
    mb = _blocks(m)
    absmax = mb.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    x = mb * inv[:, None]
    down = x.floor()
    up = (_blocks(bits.view(m.shape)) >> 8).float() * 2.0 ** -24 < x - down
    q = (down + up.float()).clamp_(-127, 127)
    q = torch.where(x.isnan(), torch.zeros_like(q), q)  # NaN: its block's absmax is NaN, which shows
    return q.reshape(-1)[: m.numel()].to(torch.int8).view(m.shape), absmax


def _load_momentum(m: Tensor, absmax: Optional[Tensor]) -> Tensor:
    """The momentum as the math dtype: m itself when it is stored so (updated in place), else an fp32 copy."""
    if absmax is not None:
        return dequantize_blockwise(m, absmax)
    return m if m.dtype in (torch.float32, torch.float64) else m.float()


def _store_momentum_(m: Tensor, absmax: Optional[Tensor], m32: Tensor, rng: Optional[Tensor]) -> Tensor:
    """Store the new momentum m32 into its storage and return the value stored, as the math dtype (what the
    update uses)."""
    if m32 is m:
        return m  # fp32 storage: already in place
    bits = random_bits(rng, m.numel(), STREAM_MOMENTUM, m.device).view(m.shape)
    if absmax is not None:
        q, new_absmax = quantize_blockwise(m32, bits)
        m.copy_(q)
        absmax.copy_(new_absmax)
        return dequantize_blockwise(m, absmax)
    m.copy_(sr_bf16(m32, bits))
    return m.float()


def _store_param_(p: Tensor, x: Tensor, comp: Optional[Tensor], rounding: str, rng: Optional[Tensor]) -> None:
    """Store the new fp32 value x of a bf16 param p under `rounding` (see the module docstring)."""
    if rounding == "stochastic":
        p.copy_(sr_bf16(x, random_bits(rng, p.numel(), STREAM_PARAM, p.device).view(p.shape)))
    else:
        p.copy_(x)  # to nearest
        if comp is not None:  # kahan: keep what the rounding lost (x - p is exact in fp32)
            comp.copy_(x - p.float())


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
    """One CAME step for every tensor in the lists (see the module docstring and backends/README.md).

    bias_scales: None (no bias correction, came-pytorch 0.1.3), or the [T, 2] tensor of `bias_scales()`
    for these lists: row i holds (s_u, s_m) of tensor i.

    Low-precision state (opt-in): exp_avgs[i] is fp32, bf16 or int8 (codes, with exp_avg_absmaxes[i]);
    param_rounding "stochastic" or "kahan" (with param_comps[i], bf16) for bf16 params; rng: int64 [T, 2]
    (Philox key, step) per tensor, needed by stochastic rounding.

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
    absmaxes = exp_avg_absmaxes or [None] * len(params)
    comps = param_comps or [None] * len(params)
    rngs = [None] * len(params) if rng is None else list(rng.unbind(0))
    hyper = dict(inv_scale=inv_scale, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, eps1=eps1, eps2=eps2,
                 clip_threshold=clip_threshold, weight_decay=weight_decay, maximize=maximize)
    # Empty tensors have nothing to update; skipping them keeps their statistics finite (a mean over zero
    # rows would be NaN) and equal to what the fused backends leave, which skip them too.
    factored = [i for i, p in enumerate(params) if p.ndim >= 2 and p.numel() > 0]
    vectors = [i for i, p in enumerate(params) if p.ndim < 2 and p.numel() > 0]

    # One scratch buffer per (device, math dtype), sized for the largest factored tensor.
    scratch: dict = {}
    for i in factored:
        key = (exp_avgs[i].device, math_dtype(params[i].dtype))
        scratch[key] = max(scratch.get(key, 0), params[i].numel())
    scratch = {k: torch.empty(n, dtype=k[1], device=k[0]) for k, n in scratch.items()}

    for i in factored:
        m = exp_avgs[i]
        buf = scratch[(m.device, math_dtype(params[i].dtype))][: m.numel()].view(m.shape)
        _factored_step(params[i], grads[i], m, exp_avg_sq_rows[i], exp_avg_sq_cols[i],
                       exp_avg_res_rows[i], exp_avg_res_cols[i], buf, scales[i], absmax=absmaxes[i],
                       comp=comps[i], rounding=param_rounding, rng=rngs[i], **hyper)

    # _foreach_* ops want one device and dtype per list.
    buckets: dict = {}
    for i in vectors:
        buckets.setdefault((params[i].device, params[i].dtype, grads[i].dtype), []).append(i)
    for idx in buckets.values():
        _vector_step([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                     [exp_avg_sqs[i] for i in idx], None if bias_scales is None else [scales[i] for i in idx],
                     [comps[i] for i in idx], param_rounding, [rngs[i] for i in idx], **hyper)


def _row_col_factors(row: Tensor, col: Tensor, row_mean: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """rsqrt(row / mean_M(row)) and rsqrt(col): the factored inverse square root, as two small vectors.
    `row_mean`: mean_M(row) when the rows are sharded (see _stats_partials_), else computed here."""
    if row_mean is None:
        row_mean = row.mean(dim=-1, keepdim=True)
    return (row / row_mean).rsqrt_().unsqueeze(-1), col.rsqrt().unsqueeze(-2)


def _ema_(avg: Tensor, beta: float, new: Tensor) -> None:
    # came-pytorch's form, b*avg + (1-b)*new, kept op for op so results match it to the last bit or two.
    avg.mul_(beta).add_(new, alpha=1.0 - beta)


def _apply_update_(p: Tensor, update: Tensor, lr: Union[float, Tensor], weight_decay: float,
                   comp: Optional[Tensor] = None, rounding: str = "nearest", rng: Optional[Tensor] = None) -> None:
    """p = p - lr*weight_decay*p - lr*update, in the math dtype, rounding p once. Overwrites `update`.
    bf16 p with rounding "stochastic" or "kahan": see the module docstring."""
    update.mul_(lr)
    if p.dtype == torch.bfloat16 and rounding != "nearest":
        x = p.float() if comp is None else p.float().add_(comp)  # kahan: the value p stands for
        if weight_decay != 0:  # the order of the bf16 branch below
            if isinstance(lr, Tensor):
                update.addcmul_(x, lr, value=weight_decay)
            else:
                update.add_(x, alpha=lr * weight_decay)
        _store_param_(p, x.sub_(update), comp, rounding, rng)
        return
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


# ---------------------------------------------------------------------- the factored rule, phase by phase
# Each phase is a function so that came_kernels.distributed can run one phase for every tensor, sum the
# statistics that span shards across processes, and go on: the math is written once, here. `split` is
# None when this process holds the whole tensor (every call in this file); for a shard it says whether
# the rows (`split.rows`) or the columns (`split.cols`) of the [B, M, N] view are cut across processes,
# and gives the global `split.m` and `split.n` the means divide by. Where an axis is cut, a phase returns
# the partial sums it cannot finish (a list of tensors, [] when none), and the next phase takes their sums
# over all processes (`sums`, the same list, all-reduced). `scale`: the tensor's row of bias_scales, or None.

def _stats_partials_(sq: Tensor, row: Tensor, col: Tensor, beta: float, eps: float, split=None) -> list:
    """EMAs of mean_N(sq) + eps into `row` and of mean_M(sq) + eps into `col`, where this process sees the
    whole axis; returns the partial sums for the rest (finished by _stats_factors)."""
    parts = []
    if split is not None and split.cols:
        parts.append(sq.sum(dim=-1))  # row sums over this shard's columns
    else:
        _ema_(row, beta, sq.mean(dim=-1).add_(eps))
    if split is not None and split.rows:
        # column sums over this shard's rows, and this shard's part of sum_M(row) (rows are whole: N is local)
        parts += [sq.sum(dim=-2), row.sum(dim=-1)]
    else:
        _ema_(col, beta, sq.mean(dim=-2).add_(eps))
    return parts


def _stats_factors(row: Tensor, col: Tensor, beta: float, eps: float, split=None, sums=()) -> tuple:
    """Finish the EMAs _stats_partials_ left to the cross-process `sums`; rsqrt(row / mean_M(row)), rsqrt(col)."""
    row_mean = None
    if split is not None and split.cols:
        _ema_(row, beta, sums[0].div_(split.n).add_(eps))
    if split is not None and split.rows:
        _ema_(col, beta, sums[0].div_(split.m).add_(eps))
        row_mean = sums[1].div_(split.m).unsqueeze_(-1)
    return _row_col_factors(row, col, row_mean)


def _sq_stats_(buf: Tensor, g: Tensor, r: Tensor, c: Tensor, *, inv_scale, beta2: float, eps1: float,
               split=None) -> list:
    """Phase 1 (sq_stats), first half: buf = (g / scale)^2 and the EMAs of r and c (see _stats_partials_)."""
    buf.copy_(g)
    if inv_scale is not None:
        buf.mul_(inv_scale)  # GradScaler's unscale, in fp32
    buf.square_()
    return _stats_partials_(buf, r, c, beta2, eps1, split)


def _sq_factors(r: Tensor, c: Tensor, *, beta2: float, eps1: float, maximize: bool, split=None, sums=()) -> tuple:
    """Phase 1, second half: the row and column factors of u (negated rows when maximizing)."""
    row_f, col_f = _stats_factors(r, c, beta2, eps1, split, sums)
    if maximize:
        row_f.neg_()  # u is linear in g: negating the small row factor negates u
    return row_f, col_f


def _u_(buf: Tensor, g: Tensor, row_f: Tensor, col_f: Tensor, inv_scale, scale) -> None:
    """buf = u = g * row_f * col_f (g upcast exactly by type promotion)."""
    torch.mul(g, row_f, out=buf).mul_(col_f)
    if inv_scale is not None:
        buf.mul_(inv_scale)  # exact for GradScaler's power-of-2 scales, so the order does not matter
    if scale is not None:
        buf.mul_(scale[0])  # bias correction: rsqrt(c / (1-b2^t)) = rsqrt(c) * s_u


def _clip_(u: Tensor, norm: Tensor, numel: int, clip_threshold: float) -> None:
    """Phase 2 (clip_stats): u_hat = u / max(1, RMS(u) / d), RMS = norm / sqrt(numel) over the whole tensor."""
    rms = norm / math.sqrt(numel)
    u.div_((rms / clip_threshold).clamp_(min=1.0))


def _momentum_res_(buf: Tensor, m: Tensor, R: Tensor, C: Tensor, *, beta1: float, beta3: float, eps2: float,
                   split=None) -> list:
    """Phase 3 (momentum_res), first half: with buf = u_hat, the momentum, then the EMAs of the confidence
    residual (u_hat - m)^2 + eps2 into R and C (see _stats_partials_)."""
    _ema_(m, beta1, buf)
    buf.sub_(m).square_()  # buf = (u_hat - m)^2
    return _stats_partials_(buf, R, C, beta3, eps2, split)


def _param_step_(p: Tensor, buf: Tensor, m: Tensor, row_f: Tensor, col_f: Tensor, scale, lr,
                 weight_decay: float, comp: Optional[Tensor] = None, rounding: str = "nearest",
                 rng: Optional[Tensor] = None) -> None:
    """Phase 4 (param_step): update = m * rsqrt(R / mean_M(R)) * rsqrt(C); decoupled weight decay (a bf16 p
    stored as `rounding` says, see _apply_update_)."""
    torch.mul(m, row_f, out=buf).mul_(col_f)
    if scale is not None:
        buf.mul_(scale[1])  # bias correction: m / (1-b1^t) and rsqrt(C / (1-b3^t)), as s_m
    _apply_update_(p, buf, lr, weight_decay, comp, rounding, rng)


def _factored_step(p, g, m, r, c, R, C, buf, scale, *, absmax=None, comp=None, rounding="nearest", rng=None,
                   inv_scale, lr, beta1, beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize) -> None:
    """Every phase for one whole tensor, in one scratch buffer."""
    # ---- phase 1 (sq_stats): EMAs of the row and column means of g^2 + eps1; buf = u
    _sq_stats_(buf, g, r, c, inv_scale=inv_scale, beta2=beta2, eps1=eps1)
    row_f, col_f = _sq_factors(r, c, beta2=beta2, eps1=eps1, maximize=maximize)
    _u_(buf, g, row_f, col_f, inv_scale, scale)
    # ---- phase 2 (clip_stats): buf = u_hat
    _clip_(buf, torch.linalg.vector_norm(buf), buf.numel(), clip_threshold)
    # ---- phase 3 (momentum_res): momentum, then EMAs of the confidence residual; the residual uses the
    # new m before it is stored, the update the stored m (low-precision momentum: see the module docstring)
    m32 = _load_momentum(m, absmax)  # m itself for an fp32 momentum, else a dequantized copy
    _momentum_res_(buf, m32, R, C, beta1=beta1, beta3=beta3, eps2=eps2)
    m32 = _store_momentum_(m, absmax, m32, rng)
    row_f, col_f = _stats_factors(R, C, beta3, eps2)
    # ---- phase 4 (param_step)
    _param_step_(p, buf, m32, row_f, col_f, scale, lr, weight_decay, comp, rounding, rng)


def _vector_step(ps, gs, ms, vs, scales, comps=None, rounding="nearest", rngs=None, *, inv_scale, lr, beta1,
                 beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize) -> None:
    """Tensors with ndim < 2: the unfactored rule, all tensors of one (device, dtype) at once. Their momentum
    is always in the math dtype (momentum_storage)."""
    u = _vector_u(gs, ms, vs, scales, inv_scale=inv_scale, beta2=beta2, eps1=eps1, maximize=maximize)
    _vector_clip_(u, torch._foreach_norm(u), [x.numel() for x in u], clip_threshold)
    _vector_update_(ps, ms, u, scales, lr=lr, beta1=beta1, weight_decay=weight_decay, comps=comps,
                    rounding=rounding, rngs=rngs)


def _vector_u(gs, ms, vs, scales, *, inv_scale, beta2, eps1, maximize) -> list:
    """Phase 1 (sq_stats) of tensors with ndim < 2: v = b2*v + (1-b2)*(g^2 + eps1); returns u = g * rsqrt(v)."""
    if gs[0].dtype != ms[0].dtype:
        gs = [g.to(ms[0].dtype) for g in gs]  # small tensors: the copy is cheaper than mixed-dtype foreach
    if inv_scale is not None:
        gs = torch._foreach_mul(gs, inv_scale.to(ms[0].dtype))
    if maximize:
        gs = torch._foreach_neg(gs)
    u = torch._foreach_mul(gs, gs)
    torch._foreach_add_(u, eps1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_add_(vs, u, alpha=1.0 - beta2)
    u = torch._foreach_rsqrt(vs)
    torch._foreach_mul_(u, gs)
    if scales is not None:
        torch._foreach_mul_(u, [s[0] for s in scales])  # bias correction: rsqrt(v / (1-b2^t)), as s_u
    return u


def _vector_clip_(u, norms, numels, clip_threshold) -> None:
    """Phase 2 (clip_stats): u_hat = u / max(1, RMS(u) / d), RMS = norm / sqrt(numel) over each whole tensor.
    Overwrites `norms`."""
    torch._foreach_div_(norms, [math.sqrt(n) * clip_threshold for n in numels])
    torch._foreach_clamp_min_(norms, 1.0)
    torch._foreach_div_(u, norms)


def _vector_update_(ps, ms, u, scales, *, lr, beta1, weight_decay, comps=None, rounding="nearest",
                    rngs=None) -> None:
    """Phases 3 and 4: momentum only (no confidence step for unfactored tensors); update = m; decoupled
    weight decay."""
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, u, alpha=1.0 - beta1)
    if ps[0].dtype == torch.bfloat16 and rounding != "nearest":  # per tensor, as the factored ones
        for p, m, s, comp, rng in zip(ps, ms, scales or [None] * len(ps), comps or [None] * len(ps),
                                      rngs or [None] * len(ps)):
            update = m.clone() if s is None else m * s[1]
            _apply_update_(p, update, lr, weight_decay, comp, rounding, rng)
        return
    update = torch._foreach_mul(ms, lr)
    if scales is not None:
        torch._foreach_mul_(update, [s[1] for s in scales])  # bias correction: m / (1-b1^t), as s_m
    if weight_decay != 0:
        if ps[0].dtype == ms[0].dtype:  # same order as _apply_update_
            torch._foreach_add_(ps, torch._foreach_mul(ps, -lr * weight_decay))
        else:
            torch._foreach_add_(update, torch._foreach_mul([p.to(ms[0].dtype) for p in ps], lr * weight_decay))
    torch._foreach_sub_(ps, update)  # bf16/fp16 params: computed in fp32, rounded once
