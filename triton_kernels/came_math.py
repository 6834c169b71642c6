"""Per-element CAME math on registers (mirror of csrc/came_math.cuh), in the torch backend's order.

Everything here is fp32; loads convert from the storage dtype before these run and stores round after.
"""
import triton
import triton.language as tl


@triton.jit
def _ema(avg, beta, one_minus_beta, new):
    """beta*avg + (1-beta)*new: came-pytorch's avg.mul_(beta).add_(new, alpha=1-beta)."""
    return avg * beta + one_minus_beta * new


@triton.jit
def _rsqrt(x):
    """1 / sqrt(x) that keeps a subnormal x. tl.rsqrt compiles to rsqrt.approx.ftz.f32, which flushes a
    subnormal input to 0 (then inf, then NaN in the update), where torch and the CUDA extension (rsqrtf, no
    flush) give a finite value: statistics that small occur with a tiny eps1 and near-zero gradients. Such x
    is scaled by 2^24 into the normal range first (exact) and the result by 2^12."""
    tiny = x < 1.1754943508222875e-38  # the smallest normal fp32
    r = tl.rsqrt(tl.where(tiny, x * 16777216.0, x))
    return tl.where(tiny, r * 4096.0, r)


@triton.jit
def _factored_u(g, row, mean_row, col):
    """g * rsqrt(row / mean_M(row))[:, None] * rsqrt(col)[None, :] for a [rows, cols] tile."""
    return g * _rsqrt(row / mean_row)[:, None] * _rsqrt(col)[None, :]


@triton.jit
def _param_update(p, update, lr, weight_decay, SAME_DTYPE_AS_MATH: tl.constexpr):
    """p - lr*weight_decay*p - lr*update, all fp32.

    fp32 params: came-pytorch's order (decay first, then the update), as the torch backend does.
    bf16/fp16 params: one expression, so the stored value is rounded once.
    """
    if SAME_DTYPE_AS_MATH:
        p = p + (-(lr * weight_decay)) * p
        return p - update * lr
    else:
        return p - (update * lr + p * (lr * weight_decay))


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to the storage dtype, to nearest even (what torch's .to() does).

    bf16 is rounded by hand on the bits: Triton's interpreter (the CPU path CI tests) truncates in
    .to(tl.bfloat16), which would bias every bf16 parameter update. A few integer ops per element cost
    nothing in a memory-bound kernel, and one code path is then checked on the CPU and run on the GPU.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # keep NaN a NaN whatever its payload
    else:
        return x.to(DTYPE)


# ---- Low-precision state (opt-in; the spec is torch_backend's philox, sr_bf16, quantize_blockwise and
# dequantize_blockwise: every op below is the same exactly rounded fp32 or integer op, in the same order).
QBLOCK = tl.constexpr(256)             # elements of the flattened tensor per int8 absmax
INV127 = tl.constexpr(0.007874015718698502)  # fp32(1/127), exactly
TWO_M24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24
STREAM_MOMENTUM = tl.constexpr(0)      # Philox counter word 3
STREAM_PARAM = tl.constexpr(1)


@triton.jit
def _random_bits(key, step, idx, STREAM: tl.constexpr):
    """32 random bits per element index idx (int64) of a tensor whose rng row is (key, step): Philox4x32-10
    with key (key lo, key hi) and counters (idx lo, idx hi, step, STREAM), first output word (uint32)."""
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    zero = lo * 0
    r, _, _, _ = tl.philox(key, lo, hi, zero + step.to(tl.uint32), zero + STREAM)
    return r


@triton.jit
def _sr_bf16(x, r):
    """fp32 x rounded to bf16 stochastically with the random bits r: r's top 16 bits are added below the
    bf16 ulp, then the low 16 bits are dropped (round up with probability (x - down) / ulp). NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (r >> 16)) >> 16
    out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), out)


@triton.jit
def _dequantize(q, absmax):
    """fp32 m of int8 codes q with their blocks' absmax (gathered per element)."""
    return q.to(tl.float32) * (absmax * INV127)


@triton.jit
def _quantize(m, absmax, r):
    """int8 code of fp32 m in a block of absmax: x = m * (127 / absmax) rounded stochastically (up with
    probability frac(x), from r's top 24 bits), clamped to [-127, 127]; 0 for NaN (its absmax is NaN)."""
    nonzero = absmax > 0
    inv = tl.math.div_rn(tl.full(absmax.shape, 127.0, tl.float32), tl.where(nonzero, absmax, 1.0))
    inv = tl.where(nonzero, inv, 0.0)  # an all-zero block stays zero
    x = m * inv
    # floor(x) by truncation (|x| <= 127): tl.floor compiles to cvt.rmi.ftz, which gives 0 for a negative
    # subnormal x where floor is -1 (the torch backend's floor). NaN is cast as 0 and coded 0 below.
    t = tl.where(x != x, 0.0, x).to(tl.int32).to(tl.float32)
    down = tl.where(t > x, t - 1.0, t)
    up = (r >> 8).to(tl.float32) * TWO_M24 < x - down
    q = tl.minimum(tl.maximum(down + up.to(tl.float32), -127.0), 127.0)
    return tl.where(x != x, 0.0, q).to(tl.int8)
