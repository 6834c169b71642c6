"""Phase 4, `param_step`: the parameter update with decoupled weight decay (mirror of csrc/param_step.cu).

Math (spec symbols; factored tensors as [B, M, N]):
    update = m * rsqrt(R / mean_M(R))[:, None] * rsqrt(C)[None, :]      (ndim < 2: update = m)
    update = s_m * update                          (bias correction only: s_m = bias_scales[t, 1])
    p = p - lr*weight_decay*p - lr*update          (fp32 arithmetic; p stored in its dtype, rounded once)
lr is read from a 1-element fp32 device tensor: no host sync, and a new lr value never recompiles.
Opt-in low-precision state:
    bf16 m     update uses the stored bf16 m (what phase 3 rounded)
    int8 m     the new m is recomputed as phase 3 computed it (g, r, c, the old codes and qold), quantized
               with its block's new absmax (qmax) rounding stochastically (Philox stream 0), stored; the
               update uses the stored (dequantized) m; the block's first element writes the new absmax
    bf16 p     param_rounding: "nearest" (_round_to), "stochastic" (_sr_bf16, Philox stream 1), "kahan"
               (p + k is the param; p = bf16(x), k = bf16(x - p))
Traffic per element: reads m (4 B) and p (4 B fp32, 2 B bf16), writes p: 12 B fp32, 8 B bf16. R, C:
O(rows + cols). bf16 m: 10 B fp32, 6 B bf16. int8 m: reads g, q, p, writes q, p: 14 B fp32, 8 B bf16.
Kahan: +4 B (k read and written). Whole step (4 phases): fp32 params 32 B (bf16 m 26, int8 m 27); bf16
params 22 B (bf16 m 16, int8 m 15; Kahan +4). Grid: one program per row tile of ROWS rows or flat chunk (plan.tile_blocks, largest
first). Deterministic (elementwise).
"""
import triton
import triton.language as tl

from .came_math import (QBLOCK, STREAM_MOMENTUM, STREAM_PARAM, _dequantize, _ema, _factored_u, _param_update, _rsqrt,
                        _quantize, _random_bits, _round_to, _sr_bf16)
from .momentum_res import _load_momentum
from .multi_tensor import C_PACK, PACK_K1, PACK_K4, PACK_K8, _amp_found_inf, _amp_inv_scale, _packed, _packed_mean
from .multi_tensor import (BLOCK_N, C_ABSMAX, C_COL, C_COMP, C_DIV, C_G, C_M, C_MKIND, C_NROWS, C_NUMEL, C_P, C_QOFF,
                           C_RES_COL, C_RES_ROW, C_ROW, C_STAT, C_VEC, FLAT_BLOCK, FLAT_CHUNK, MK_BF16, MK_FP32,
                           MK_INT8, NUM_WARPS, ROWS, STAGES, LB_BF16, LB_FP32, LB_INT8, _field, _ptr, _stripe,
                           _this_block, _vec_run, lowbit_of)

# param_rounding of bf16 params (a launch constant; other dtypes always take NEAREST)
NEAREST = tl.constexpr(0)
STOCHASTIC = tl.constexpr(1)
KAHAN = tl.constexpr(2)
ROUNDINGS = {"nearest": 0, "stochastic": 1, "kahan": 2}


@triton.jit
def _store_param(meta, t, p_ptr, idx, mask, x, key, step, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 ROUNDING: tl.constexpr):
    """Store the new fp32 value x of the param: to nearest, stochastically, or Kahan-compensated (the
    compensation k was added to p before x was computed; k = bf16(x - bf16(x)) is stored for next step)."""
    if ROUNDING == STOCHASTIC:
        tl.store(p_ptr + idx, _sr_bf16(x, _random_bits(key, step, idx, STREAM_PARAM)), mask=mask)
    elif ROUNDING == KAHAN:
        p = _round_to(x, DTYPE)
        tl.store(p_ptr + idx, p, mask=mask)
        tl.store(_ptr(meta, t, C_COMP, tl.bfloat16, ALIGNED) + idx, _round_to(x - p.to(tl.float32), tl.bfloat16),
                 mask=mask)
    else:
        tl.store(p_ptr + idx, _round_to(x, DTYPE), mask=mask)


@triton.jit
def _load_param(meta, t, p_ptr, idx, mask, ALIGNED: tl.constexpr, ROUNDING: tl.constexpr):
    """p as fp32; with Kahan compensation, p + k (the value p stands for)."""
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if ROUNDING == KAHAN:
        p = p + tl.load(_ptr(meta, t, C_COMP, tl.bfloat16, ALIGNED) + idx, mask=mask, other=0.0).to(tl.float32)
    return p


@triton.jit
def _int8_momentum(meta, t, b, N, idx, rows, rmask, cols, cmask, mask, stats, inv, beta1, one_minus_beta1, key,
                   step, qmax, qold, DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
                   AMP: tl.constexpr):
    """int8 momentum, phase 4: the new m of phase 3 recomputed (the same ops on the same inputs: u_hat from
    g and the g^2 statistics, the old codes and the old absmax that phase 3 copied to qold), quantized with
    the new absmax (qmax) and stored; returns the stored m, which the update uses. The element that starts a
    block writes its new absmax to the state (no program reads the state's absmax in this phase)."""
    g = tl.load(_ptr(meta, t, C_G, DTYPE, ALIGNED) + idx, mask=mask, other=0.0).to(tl.float32)
    if AMP:
        g = g * inv
    if MAXIMIZE:
        g = -g
    r = tl.load(_ptr(meta, t, C_ROW, tl.float32, False) + rows, mask=rmask, other=1.0)
    c = tl.load(_ptr(meta, t, C_COL, tl.float32, False) + b * N + cols, mask=cmask, other=1.0)
    mean_r = tl.load(stats + _field(meta, t, C_STAT) + b)
    u_hat = _factored_u(g, r, mean_r, c) / tl.load(stats + _field(meta, t, C_DIV))
    blk = idx // QBLOCK
    q_ptr = _ptr(meta, t, C_M, tl.int8, ALIGNED)
    m_old = _dequantize(tl.load(q_ptr + idx, mask=mask, other=0), tl.load(qold + blk, mask=mask, other=0.0))
    m = _ema(m_old, beta1, one_minus_beta1, u_hat)
    absmax = tl.load(qmax + blk, mask=mask, other=0).to(tl.float32, bitcast=True)
    q = _quantize(m, absmax, _random_bits(key, step, idx, STREAM_MOMENTUM))
    tl.store(q_ptr + idx, q, mask=mask)
    tl.store(_ptr(meta, t, C_ABSMAX, tl.float32, False) + blk, absmax, mask=mask & (idx % QBLOCK == 0))
    return _dequantize(q, absmax)


# The default path (fp32 or bf16 momentum, params rounded to nearest): MKIND is a constant per call, so the fp32
# bodies keep their code; the _lp variants below are built only when asked for (int8 momenta, param_rounding).
@triton.jit
def _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, NUM_STAGES: tl.constexpr, BIAS: tl.constexpr,
                  MKIND: tl.constexpr):
    """One stripe of factored tensor t: update = m * rsqrt(R / mean_M(R)) * rsqrt(C), then p. MKIND: the
    momentum's storage, fp32 or bf16 (the update uses m as stored)."""
    SAME: tl.constexpr = DTYPE == tl.float32
    p_ptr = _ptr(meta, t, C_P, DTYPE, ALIGNED)
    if MKIND == MK_BF16:
        m_ptr = _ptr(meta, t, C_M, tl.bfloat16, ALIGNED)
    else:
        m_ptr = _ptr(meta, t, C_M, tl.float32, ALIGNED)
    M, N, b, row0, row_end, _ = _stripe(meta, t, local, ROWS, DTYPE, ALIGNED, TILED=False)  # one row tile
    B = _field(meta, t, C_NUMEL) // (M * N)
    C_ptr = _ptr(meta, t, C_RES_COL, tl.float32, ALIGNED) + b * N
    mean_R = tl.load(stats + _field(meta, t, C_STAT) + B + b)
    rows = row0 + tl.arange(0, ROWS)
    rmask = rows < row_end
    R = tl.load(_ptr(meta, t, C_RES_ROW, tl.float32, False) + rows, mask=rmask, other=1.0)
    for n0 in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        idx = rows[:, None] * N + cols[None, :]
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        update = _factored_u(m, R, mean_R, tl.load(C_ptr + cols, mask=cmask, other=1.0))
        if BIAS:
            update = update * s_m
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(p_ptr + idx, _round_to(_param_update(p, update, lr, weight_decay, SAME), DTYPE), mask=mask)


@triton.jit
def _param_chunk(meta, t, local, lr, s_m, weight_decay, DTYPE: tl.constexpr, FLAT_CHUNK: tl.constexpr,
                 FLAT_BLOCK: tl.constexpr, ALIGNED: tl.constexpr, BIAS: tl.constexpr):
    """One chunk of flat tensor t: update = m, then p."""
    SAME: tl.constexpr = DTYPE == tl.float32
    p_ptr = _ptr(meta, t, C_P, DTYPE, ALIGNED)
    m_ptr = _ptr(meta, t, C_M, tl.float32, ALIGNED)
    numel = _vec_run(meta, t, C_NUMEL, DTYPE, ALIGNED)
    for i0 in range(0, FLAT_CHUNK, FLAT_BLOCK):
        offs = local * FLAT_CHUNK + i0 + tl.arange(0, FLAT_BLOCK)
        mask = offs < numel
        update = tl.load(m_ptr + offs, mask=mask, other=0.0)
        if BIAS:
            update = update * s_m
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(p_ptr + offs, _round_to(_param_update(p, update, lr, weight_decay, SAME), DTYPE), mask=mask)


@triton.jit
def _param_stripe_lp(meta, t, local, stats, lr, s_m, weight_decay, inv, beta1, one_minus_beta1, rng, qmax, qold,
                  DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
                  NUM_STAGES: tl.constexpr, BIAS: tl.constexpr, MKIND: tl.constexpr, ROUNDING: tl.constexpr,
                  MAXIMIZE: tl.constexpr, AMP: tl.constexpr):
    """_param_stripe with the opt-in low-precision state (momentum kind MKIND, param ROUNDING)."""
    SAME: tl.constexpr = DTYPE == tl.float32
    p_ptr = _ptr(meta, t, C_P, DTYPE, ALIGNED)
    M, N, b, row0, row_end, _ = _stripe(meta, t, local, ROWS, DTYPE, ALIGNED, TILED=False)  # one row tile
    B = _field(meta, t, C_NUMEL) // (M * N)
    C_ptr = _ptr(meta, t, C_RES_COL, tl.float32, ALIGNED) + b * N
    mean_R = tl.load(stats + _field(meta, t, C_STAT) + B + b)
    rows = row0 + tl.arange(0, ROWS)
    rmask = rows < row_end
    R = tl.load(_ptr(meta, t, C_RES_ROW, tl.float32, False) + rows, mask=rmask, other=1.0)
    key = 0
    step = 0
    if MKIND != MK_FP32 or ROUNDING == STOCHASTIC:
        key = tl.load(rng + 2 * t)
        step = tl.load(rng + 2 * t + 1)
    for n0 in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        idx = rows[:, None] * N + cols[None, :]
        if MKIND == MK_INT8:
            qoff = _field(meta, t, C_QOFF)
            m = _int8_momentum(meta, t, b, N, idx, rows, rmask, cols, cmask, mask, stats, inv, beta1,
                               one_minus_beta1, key, step, qmax + qoff, qold + qoff, DTYPE, MAXIMIZE, ALIGNED, AMP)
        else:
            m = _load_momentum(meta, t, idx, mask, MKIND, ALIGNED)  # as phase 3 stored it
        update = _factored_u(m, R, mean_R, tl.load(C_ptr + cols, mask=cmask, other=1.0))
        if BIAS:
            update = update * s_m
        p = _load_param(meta, t, p_ptr, idx, mask, ALIGNED, ROUNDING)
        _store_param(meta, t, p_ptr, idx, mask, _param_update(p, update, lr, weight_decay, SAME), key, step, DTYPE,
                     ALIGNED, ROUNDING)


@triton.jit
def _param_chunk_lp(meta, t, local, lr, s_m, weight_decay, rng, DTYPE: tl.constexpr, FLAT_CHUNK: tl.constexpr,
                 FLAT_BLOCK: tl.constexpr, ALIGNED: tl.constexpr, BIAS: tl.constexpr, ROUNDING: tl.constexpr):
    """_param_chunk with param ROUNDING (the momentum of a flat tensor is always fp32)."""
    SAME: tl.constexpr = DTYPE == tl.float32
    p_ptr = _ptr(meta, t, C_P, DTYPE, ALIGNED)
    m_ptr = _ptr(meta, t, C_M, tl.float32, ALIGNED)
    numel = _vec_run(meta, t, C_NUMEL, DTYPE, ALIGNED)
    key = 0
    step = 0
    if ROUNDING == STOCHASTIC:
        key = tl.load(rng + 2 * t)
        step = tl.load(rng + 2 * t + 1)
    for i0 in range(0, FLAT_CHUNK, FLAT_BLOCK):
        offs = local * FLAT_CHUNK + i0 + tl.arange(0, FLAT_BLOCK)
        mask = offs < numel
        update = tl.load(m_ptr + offs, mask=mask, other=0.0)
        if BIAS:
            update = update * s_m
        p = _load_param(meta, t, p_ptr, offs, mask, ALIGNED, ROUNDING)
        _store_param(meta, t, p_ptr, offs, mask, _param_update(p, update, lr, weight_decay, SAME), key, step,
                     DTYPE, ALIGNED, ROUNDING)


@triton.jit
def _param_factored(meta, t, local, stats, lr, s_m, weight_decay, inv, beta1, one_minus_beta1, rng, qmax, qold,
                    DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
                    BIAS: tl.constexpr, MKIND: tl.constexpr, ROUNDING: tl.constexpr, MAXIMIZE: tl.constexpr,
                    AMP: tl.constexpr):
    # Two copies of the body: with 16-byte loads where the host found them safe (C_VEC), else scalar.
    if _field(meta, t, C_VEC) != 0:
        _param_stripe_lp(meta, t, local, stats, lr, s_m, weight_decay, inv, beta1, one_minus_beta1, rng, qmax, qold,
                      DTYPE, ROWS, BLOCK_N, True, NUM_STAGES, BIAS, MKIND, ROUNDING, MAXIMIZE, AMP)
    else:
        _param_stripe_lp(meta, t, local, stats, lr, s_m, weight_decay, inv, beta1, one_minus_beta1, rng, qmax, qold,
                      DTYPE, ROWS, BLOCK_N, False, NUM_STAGES, BIAS, MKIND, ROUNDING, MAXIMIZE, AMP)


@triton.jit
def _param_packed(meta, t, local, stats, lr, s_m, weight_decay, DTYPE: tl.constexpr, PM: tl.constexpr,
                  PK: tl.constexpr, BIAS: tl.constexpr):
    """One packed block of tensor t (multi_tensor.PACK_ELEMS): update = m * rsqrt(R / mean_M(R)) * rsqrt(C)."""
    SAME: tl.constexpr = DTYPE == tl.float32
    M, N, eb, rb, cb, k0, k, kmask, idx, mask, rows, rmask, cols, cmask = _packed(meta, t, local, PM, PK)
    m = tl.load(_ptr(meta, t, C_M, tl.float32, False) + eb + idx, mask=mask, other=0.0)
    R = tl.load(_ptr(meta, t, C_RES_ROW, tl.float32, False) + rb + rows, mask=rmask, other=1.0)
    mean_R = _packed_mean(R, rmask, M)
    C = tl.load(_ptr(meta, t, C_RES_COL, tl.float32, False) + cb + cols, mask=cmask, other=1.0)
    update = m * _rsqrt(R / mean_R[:, None])[:, :, None] * _rsqrt(C)[:, None, :]
    if BIAS:
        update = update * s_m
    p_ptr = _ptr(meta, t, C_P, DTYPE, False) + eb
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + idx, _round_to(_param_update(p, update, lr, weight_decay, SAME), DTYPE), mask=mask)


@triton.jit
def _param_step_kernel(meta, blocks, stats, lr_ptr, amp, bias_scales, rng, qmax, qold, weight_decay, beta1,
                       one_minus_beta1, DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                       FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
                       AMP: tl.constexpr, BIAS: tl.constexpr, LOWBIT: tl.constexpr, ROUNDING: tl.constexpr,
                       MAXIMIZE: tl.constexpr, PACKED: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # the params stay as they are
        return
    t, local = _this_block(blocks)
    lr = tl.load(lr_ptr)
    s_m = 1.0
    if BIAS:
        s_m = tl.load(bias_scales + 2 * t + 1)
    if LOWBIT != LB_INT8 and ROUNDING == NEAREST:
        # Packed small matrices, one body per compiled tile size (multi_tensor.PACK_SIZES); else two copies of
        # each body: with 16-byte loads where the host found them safe (C_VEC), else scalar. bf16 momenta
        # (LOWBIT: the plan's momentum kinds) take the same bodies; flat tensors keep fp32 ones.
        if _field(meta, t, C_NROWS) > 0:  # factored
            kind = MK_FP32  # a constant compiles the bf16 bodies out
            if LOWBIT == LB_BF16:
                kind = _field(meta, t, C_MKIND)
            pack = 0  # a constant 0 compiles the packed bodies out (PACKED: the plan has packed tensors)
            if PACKED:
                pack = _field(meta, t, C_PACK)
            if pack == 1:
                _param_packed(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, 1, PACK_K1, BIAS)
            elif pack == 4:
                _param_packed(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, 4, PACK_K4, BIAS)
            elif pack == 8:
                _param_packed(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, 8, PACK_K8, BIAS)
            elif _field(meta, t, C_VEC) != 0:  # 16 values of m and p per thread in flight (the scalar body: 8)
                if kind == MK_BF16:
                    _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, ROWS, 2 * BLOCK_N, True,
                                  NUM_STAGES, BIAS, MK_BF16)
                else:
                    _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, ROWS, 2 * BLOCK_N, True,
                                  NUM_STAGES, BIAS, MK_FP32)
            else:
                if kind == MK_BF16:
                    _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, ROWS, BLOCK_N, False,
                                  NUM_STAGES, BIAS, MK_BF16)
                else:
                    _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, ROWS, BLOCK_N, False,
                                  NUM_STAGES, BIAS, MK_FP32)
        else:
            if _field(meta, t, C_VEC) != 0:
                _param_chunk(meta, t, local, lr, s_m, weight_decay, DTYPE, FLAT_CHUNK, FLAT_BLOCK, True, BIAS)
            else:
                _param_chunk(meta, t, local, lr, s_m, weight_decay, DTYPE, FLAT_CHUNK, FLAT_BLOCK, False, BIAS)
    else:
        _param_step_lp(meta, t, local, stats, lr, s_m, weight_decay, amp, rng, qmax, qold, beta1, one_minus_beta1,
                       DTYPE, ROWS, BLOCK_N, FLAT_CHUNK, FLAT_BLOCK, NUM_STAGES, AMP, BIAS, LOWBIT, ROUNDING,
                       MAXIMIZE)


@triton.jit
def _param_step_lp(meta, t, local, stats, lr, s_m, weight_decay, amp, rng, qmax, qold, beta1, one_minus_beta1,
                   DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_CHUNK: tl.constexpr,
                   FLAT_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, AMP: tl.constexpr, BIAS: tl.constexpr,
                   LOWBIT: tl.constexpr, ROUNDING: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The kernel's body with the opt-in low-precision state."""
    inv = _amp_inv_scale(amp, AMP)
    if _field(meta, t, C_NROWS) > 0:  # factored
        # LOWBIT (a launch constant): the group's momentum kinds; only their bodies are built.
        kind = MK_FP32
        if LOWBIT != LB_FP32:
            kind = _field(meta, t, C_MKIND)
        if kind == MK_FP32:
            _param_factored(meta, t, local, stats, lr, s_m, weight_decay, inv, beta1, one_minus_beta1, rng, qmax,
                            qold, DTYPE, ROWS, BLOCK_N, NUM_STAGES, BIAS, MK_FP32, ROUNDING, MAXIMIZE, AMP)
        elif kind == MK_BF16:
            _param_factored(meta, t, local, stats, lr, s_m, weight_decay, inv, beta1, one_minus_beta1, rng, qmax,
                            qold, DTYPE, ROWS, BLOCK_N, NUM_STAGES, BIAS, MK_BF16, ROUNDING, MAXIMIZE, AMP)
        elif LOWBIT == LB_INT8:  # (int8 recomputes the new m here: the most registers)
            _param_factored(meta, t, local, stats, lr, s_m, weight_decay, inv, beta1, one_minus_beta1, rng, qmax,
                            qold, DTYPE, ROWS, BLOCK_N, NUM_STAGES, BIAS, MK_INT8, ROUNDING, MAXIMIZE, AMP)
    else:
        if _field(meta, t, C_VEC) != 0:
            _param_chunk_lp(meta, t, local, lr, s_m, weight_decay, rng, DTYPE, FLAT_CHUNK, FLAT_BLOCK, True, BIAS,
                            ROUNDING)
        else:
            _param_chunk_lp(meta, t, local, lr, s_m, weight_decay, rng, DTYPE, FLAT_CHUNK, FLAT_BLOCK, False, BIAS,
                            ROUNDING)


def param_step(plan, stats, lr, *, weight_decay: float, amp=None, bias_scales=None, beta1: float = 0.9,
               maximize: bool = False, rounding: str = "nearest", rng=None, qmax=None, qold=None) -> None:
    """Launch phase 4 for every tensor of `plan`; `lr` is a 1-element fp32 tensor on the device (`amp`: see
    sq_stats; `bias_scales`: see clip_stats, column 1, s_m, is read here). Low-precision state: `rounding`
    (param_rounding; bf16 params only), rng, qmax, qold as in momentum_res; beta1 and maximize recompute
    an int8 momentum's new value."""
    mode = ROUNDINGS[rounding] if plan.dtype == tl.bfloat16 else 0
    _param_step_kernel[(plan.n_tile_blocks,)](
        plan.meta, plan.tile_blocks, stats, lr, lr if amp is None else amp,
        lr if bias_scales is None else bias_scales, lr if rng is None else rng, lr if qmax is None else qmax,
        lr if qold is None else qold, weight_decay, beta1, 1.0 - beta1, DTYPE=plan.dtype, ROWS=ROWS,
        BLOCK_N=BLOCK_N, FLAT_CHUNK=FLAT_CHUNK, FLAT_BLOCK=FLAT_BLOCK, NUM_STAGES=STAGES["param_step"],
        AMP=amp is not None, BIAS=bias_scales is not None, LOWBIT=lowbit_of(plan), ROUNDING=mode,
        MAXIMIZE=bool(maximize), PACKED=plan.packed, num_warps=NUM_WARPS)
