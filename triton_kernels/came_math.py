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
def _factored_u(g, row, mean_row, col):
    """g * rsqrt(row / mean_M(row))[:, None] * rsqrt(col)[None, :] for a [rows, cols] tile."""
    return g * tl.rsqrt(row / mean_row)[:, None] * tl.rsqrt(col)[None, :]


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
