"""Phase 4, `param_step`: the parameter update with decoupled weight decay (mirror of csrc/param_step.cu).

Math (spec symbols; factored tensors as [B, M, N]):
    update = m * rsqrt(R / mean_M(R))[:, None] * rsqrt(C)[None, :]      (ndim < 2: update = m)
    update = s_m * update                          (bias correction only: s_m = bias_scales[t, 1])
    p = p - lr*weight_decay*p - lr*update          (fp32 arithmetic; p stored in its dtype, rounded once)
lr is read from a 1-element fp32 device tensor: no host sync, and a new lr value never recompiles.
Traffic per element: reads m (4 B) and p (4 B fp32, 2 B bf16), writes p: 12 B fp32, 8 B bf16. R, C:
O(rows + cols). Grid: one program per row tile of ROWS rows or flat chunk (plan.tile_blocks, largest
first). Deterministic (elementwise).
"""
import triton
import triton.language as tl

from .came_math import _factored_u, _param_update, _round_to
from .multi_tensor import _amp_found_inf
from .multi_tensor import (BLOCK_N, C_M, C_NROWS, C_NUMEL, C_P, C_RES_COL, C_RES_ROW, C_STAT, C_VEC, FLAT_BLOCK,
                           FLAT_CHUNK, NUM_WARPS, ROWS, STAGES, _field, _ptr, _stripe, _this_block, _vec_run)


@triton.jit
def _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, NUM_STAGES: tl.constexpr, BIAS: tl.constexpr):
    """One stripe of factored tensor t: update = m * rsqrt(R / mean_M(R)) * rsqrt(C), then p."""
    SAME: tl.constexpr = DTYPE == tl.float32
    p_ptr = _ptr(meta, t, C_P, DTYPE, ALIGNED)
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
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
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
def _param_step_kernel(meta, blocks, stats, lr_ptr, amp, bias_scales, weight_decay, DTYPE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_CHUNK: tl.constexpr,
                       FLAT_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, AMP: tl.constexpr,
                       BIAS: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # the params stay as they are
        return
    t, local = _this_block(blocks)
    lr = tl.load(lr_ptr)
    s_m = 1.0
    if BIAS:
        s_m = tl.load(bias_scales + 2 * t + 1)
    # Two copies of each body: with 16-byte loads where the host found them safe (C_VEC), else scalar.
    if _field(meta, t, C_NROWS) > 0:  # factored
        if _field(meta, t, C_VEC) != 0:
            _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, ROWS, BLOCK_N, True, NUM_STAGES,
                          BIAS)
        else:
            _param_stripe(meta, t, local, stats, lr, s_m, weight_decay, DTYPE, ROWS, BLOCK_N, False, NUM_STAGES,
                          BIAS)
    else:
        if _field(meta, t, C_VEC) != 0:
            _param_chunk(meta, t, local, lr, s_m, weight_decay, DTYPE, FLAT_CHUNK, FLAT_BLOCK, True, BIAS)
        else:
            _param_chunk(meta, t, local, lr, s_m, weight_decay, DTYPE, FLAT_CHUNK, FLAT_BLOCK, False, BIAS)


def param_step(plan, stats, lr, *, weight_decay: float, amp=None, bias_scales=None) -> None:
    """Launch phase 4 for every tensor of `plan`; `lr` is a 1-element fp32 tensor on the device (`amp`: see
    sq_stats; `bias_scales`: see clip_stats, column 1, s_m, is read here)."""
    _param_step_kernel[(plan.n_tile_blocks,)](
        plan.meta, plan.tile_blocks, stats, lr, lr if amp is None else amp,
        lr if bias_scales is None else bias_scales, weight_decay, DTYPE=plan.dtype, ROWS=ROWS, BLOCK_N=BLOCK_N,
        FLAT_CHUNK=FLAT_CHUNK, FLAT_BLOCK=FLAT_BLOCK, NUM_STAGES=STAGES["param_step"], AMP=amp is not None,
        BIAS=bias_scales is not None, num_warps=NUM_WARPS)
