"""Phase 3, `momentum_res`: momentum and the confidence statistics (mirror of csrc/momentum_res.cu).

Math (spec symbols; factored tensors as [B, M, N]; g negated first when maximize):
    u_hat = u / div                      (u recomputed from g as in phase 2; div = max(1, RMS(u)/d))
    m = b1*m + (1-b1)*u_hat                                                (every tensor)
    _momentum_res_kernel   res = (u_hat - m)^2  (new m)
                           R[b, i] = b3*R + (1-b3)*(sum_n res / N + eps2)   (row sums complete in-block)
                           ws[s, n] = sum over the rows of stripe s of res  (column partials)
    _res_finalize_kernel   C[b, n] = b3*C + (1-b3)*(sum_s ws[s, n] / M + eps2);  stats: mean_M(R)[b]
Tensors with ndim < 2 stop after the momentum (no confidence step).
Opt-in low-precision momentum (factored tensors of at least LOWBIT_MIN_NUMEL elements; C_MKIND per tensor):
    bf16   m is loaded from bf16 and stored as came_math._sr_bf16(m, Philox bits of stream 0)
    int8   m = q * (absmax * fp32(1/127)); the new m is not stored here: qmax[block] = max |new m| (atomic
           max on the bits, exact in any order), qold[block] = the old absmax; phase 4 stores the codes
The residual uses the new m before it is rounded (as the torch backend). Groups without an int8 momentum
(multi_tensor.LB_BF16) take the default slab body for their bf16 momenta too, m loaded and stored as bf16,
at the default launch's register cap; groups with one take the _lp bodies, uncapped.
Traffic per element: reads g (4 B fp32, 2 B bf16) and m (4 B), writes m (4 B): 12 B fp32, 10 B bf16; flat
tensors also read v (4 B). bf16 m: 8 B fp32 params, 6 B bf16 (plus a Philox4x32-10 per element); int8 m:
reads g and q only, 5 B fp32, 3 B bf16 (the absmax gathers hit one float per 256 elements; one atomic per
tile row when N is a multiple of QBLOCK, else one per element). Partials as in phase 1. Grid: one program per stripe of TILES row tiles or flat
chunk (plan.blocks, largest first); finalize as in phase 1. Deterministic.
"""
import triton
import triton.language as tl

from . import multi_tensor as _mt
from .came_math import QBLOCK, STREAM_MOMENTUM, _dequantize, _ema, _factored_u, _random_bits, _rsqrt, _sr_bf16
from .multi_tensor import (C_PACK, LB_BF16, LB_INT8, PACK_K1, PACK_K4, PACK_K8, _amp_found_inf, _amp_inv_scale,
                           _packed, _packed_factors, _packed_mean, lowbit_of)
from .multi_tensor import (BLOCK_N, C_ABSMAX, C_COL, C_DIV, C_G, C_M, C_MKIND, C_NCOLS, C_NROWS, C_NUMEL, C_QOFF,
                           C_RES_COL, C_RES_ROW, C_ROW, C_TILES, C_WS_COL, MK_BF16, MK_FP32, MK_INT8,
                           C_STAT, C_VEC, FIN_MEAN, FIN_WARPS, FLAT_BLOCK, FLAT_CHUNK,
                           NUM_WARPS, ROWS, STAGES, _add_column_partials, _field,
                           _finalize_columns_and_means, _ptr, _row_tile_done, _stripe, _this_block, _vec_run,
                           _ws_col, finalize)


SLAB_WARPS = tl.constexpr(NUM_WARPS)  # _momentum_res_stripe's halves put one warp per row group


@triton.jit
def _load_momentum(meta, t, idx, mask, MKIND: tl.constexpr, ALIGNED: tl.constexpr):
    """m (fp32) of the elements idx of tensor t from its storage (MKIND: see multi_tensor.C_MKIND)."""
    if MKIND == MK_INT8:
        q = tl.load(_ptr(meta, t, C_M, tl.int8, ALIGNED) + idx, mask=mask, other=0)
        absmax = tl.load(_ptr(meta, t, C_ABSMAX, tl.float32, False) + idx // QBLOCK, mask=mask, other=0.0)
        return _dequantize(q, absmax)
    elif MKIND == MK_BF16:
        return tl.load(_ptr(meta, t, C_M, tl.bfloat16, ALIGNED) + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(_ptr(meta, t, C_M, tl.float32, ALIGNED) + idx, mask=mask, other=0.0)


@triton.jit
def _update_res_rows(R_ptr, rows, rmask, sums, N, beta3, one_minus_beta3, eps2):
    """R = b3*R + (1-b3)*(sum_n res / N + eps2) for rows whose sums are complete."""
    R = tl.load(R_ptr + rows, mask=rmask, other=0.0)
    tl.store(R_ptr + rows, _ema(R, beta3, one_minus_beta3, sums / N.to(tl.float32) + eps2), mask=rmask)


@triton.jit
def _momentum_res_rows(g_ptr, m_ptr, rows, rmask, row_f, cols, cmask, col_f, N, div, beta1, one_minus_beta1, inv,
                       key, step, DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, AMP: tl.constexpr,
                       MKIND: tl.constexpr):
    """m of the rows [W, R] x cols [C] (stored; MKIND MK_BF16: from and to bf16, rounded stochastically with
    the bits of (key, step)), and the residual (u_hat - m)^2 of the unrounded m as [W, R, C], 0 where masked."""
    mask = rmask[:, :, None] & cmask[None, None, :]
    idx = rows[:, :, None] * N + cols[None, None, :]
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if AMP:
        g = g * inv
    if MAXIMIZE:
        g = -g
    u_hat = g * row_f[:, :, None] * col_f[None, None, :] / div
    m = _ema(tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32), beta1, one_minus_beta1, u_hat)
    res = u_hat - m
    if MKIND == MK_BF16:
        tl.store(m_ptr + idx, _sr_bf16(m, _random_bits(key, step, idx, STREAM_MOMENTUM)), mask=mask)
    else:
        tl.store(m_ptr + idx, m, mask=mask)
    return tl.where(mask, res * res, 0.0)


# The default path (fp32 momenta, and bf16 ones in groups without int8 momenta): MKIND is a constant per
# call, so the fp32 body keeps its code; the _lp variant below is built only for groups with an int8 momentum.
@triton.jit
def _momentum_res_stripe(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3, eps2,
                         inv, rng, DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, ROWS: tl.constexpr,
                         SLAB_N: tl.constexpr, ALIGNED: tl.constexpr, NUM_STAGES: tl.constexpr,
                         TILED: tl.constexpr, AMP: tl.constexpr, MKIND: tl.constexpr):
    """One stripe of factored tensor t: m, then R for its rows and column partials of the residual into ws.

    A row tile goes by slabs of [ROWS, SLAB_N], each as two halves of [W, R, SLAB_N]: W = the warps, R rows
    per thread, a warp's lanes along the columns (16 values of g and of m per thread in flight). A half's row
    sums stay within a warp, its column sums over R rows within a thread; those of the two halves cross the
    warps once per slab, as in the extension's 64 x 128 slabs (csrc/momentum_res.cu). (A [ROWS, BLOCK_N] tile
    did that every 2048 values, with half the bytes in flight.) The scalar body (ALIGNED False) takes slabs
    half as wide: with 128 columns its 32 addresses per half spill. MKIND: the momentum's storage, fp32 or
    bf16 (rng: its Philox key and step; int8 momenta take _momentum_res_stripe_lp)."""
    R: tl.constexpr = ROWS // (2 * SLAB_WARPS)
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    key = 0
    step = 0
    if MKIND == MK_BF16:
        m_ptr = _ptr(meta, t, C_M, tl.bfloat16, ALIGNED)
        key = tl.load(rng + 2 * t)
        step = tl.load(rng + 2 * t + 1)
    else:
        m_ptr = _ptr(meta, t, C_M, tl.float32, ALIGNED)
    M, N, b, row0, row_end, n_tiles = _stripe(meta, t, local, ROWS, DTYPE, ALIGNED, TILED)
    col_ptr = _ptr(meta, t, C_COL, tl.float32, ALIGNED) + b * N
    mean_r = tl.load(stats + _field(meta, t, C_STAT) + b)
    r_ptr = _ptr(meta, t, C_ROW, tl.float32, False)
    R_ptr = _ptr(meta, t, C_RES_ROW, tl.float32, False)
    part = ws + _ws_col(meta, t, ALIGNED) + local * N
    # row (w, i) of a half: w*R + i (Triton lays the warps along the first dimension, the R rows of a thread
    # along the second)
    in_half = tl.arange(0, SLAB_WARPS)[:, None] * R + tl.arange(0, R)[None, :]
    for tile in range(0, n_tiles):
        top = row0 + tile * ROWS + in_half
        top_sum = tl.zeros([SLAB_WARPS, R], dtype=tl.float32)
        bottom_sum = tl.zeros([SLAB_WARPS, R], dtype=tl.float32)
        for n0 in tl.range(0, N, SLAB_N, num_stages=NUM_STAGES):
            cols = n0 + tl.arange(0, SLAB_N)
            if DTYPE.primitive_bitwidth == 16:
                # g in 8-byte loads, the layout of m's 16-byte ones: else the new m goes from g's layout to m's
                # through shared memory every tile.
                cols = tl.max_contiguous(cols, 4)
            cmask = cols < N
            col_f = _rsqrt(tl.load(col_ptr + cols, mask=cmask, other=1.0))
            col_sum = tl.zeros([SLAB_WARPS, SLAB_N], dtype=tl.float32)
            # The two halves in a loop, not unrolled: unrolled, the compiler hoists both halves' row offsets,
            # masks and factors out of the column loop and spills them.
            for h in range(0, 2):
                rows = top + h * (R * SLAB_WARPS)
                rmask = rows < row_end
                row_f = _rsqrt(tl.load(r_ptr + rows, mask=rmask, other=1.0) / mean_r)
                res = _momentum_res_rows(g_ptr, m_ptr, rows, rmask, row_f, cols, cmask, col_f, N, div, beta1,
                                         one_minus_beta1, inv, key, step, DTYPE, MAXIMIZE, AMP, MKIND)
                row_sum = tl.sum(res, axis=2)
                top_sum = tl.where(h == 0, top_sum + row_sum, top_sum)
                bottom_sum = tl.where(h == 0, bottom_sum, bottom_sum + row_sum)
                col_sum += tl.sum(res, axis=1)
            _add_column_partials(part, cols, cmask, tile, tl.sum(col_sum, axis=0))
        bottom = top + R * SLAB_WARPS
        _update_res_rows(R_ptr, top, top < row_end, top_sum, N, beta3, one_minus_beta3, eps2)
        _update_res_rows(R_ptr, bottom, bottom < row_end, bottom_sum, N, beta3, one_minus_beta3, eps2)
        _row_tile_done()


@triton.jit
def _momentum_res_stripe_lp(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3, eps2,
                         inv, rng, qmax, qold, DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, NUM_STAGES: tl.constexpr,
                         TILED: tl.constexpr, AMP: tl.constexpr, MKIND: tl.constexpr):
    """_momentum_res_stripe with the momentum stored as MKIND. Low-precision momentum: bf16 is stored rounded stochastically; int8 is not stored here (its blocks'
    new absmax is not known until every program is done): the new absmax is gathered into qmax (atomic max
    of the bits of |m|: exact, so in any order the same), the old one copied to qold, and phase 4 recomputes
    the new m and stores its codes."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    M, N, b, row0, row_end, n_tiles = _stripe(meta, t, local, ROWS, DTYPE, ALIGNED, TILED)
    col_ptr = _ptr(meta, t, C_COL, tl.float32, ALIGNED) + b * N
    mean_r = tl.load(stats + _field(meta, t, C_STAT) + b)
    R_ptr = _ptr(meta, t, C_RES_ROW, tl.float32, False)
    part = ws + _ws_col(meta, t, ALIGNED) + local * N
    if MKIND != MK_FP32:
        key = tl.load(rng + 2 * t)
        step = tl.load(rng + 2 * t + 1)
        qoff = _field(meta, t, C_QOFF)
    for tile in range(0, n_tiles):
        rows = row0 + tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < row_end
        r = tl.load(_ptr(meta, t, C_ROW, tl.float32, False) + rows, mask=rmask, other=1.0)
        res_row_sum = tl.zeros([ROWS], dtype=tl.float32)
        for n0 in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            mask = rmask[:, None] & cmask[None, :]
            idx = rows[:, None] * N + cols[None, :]
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if AMP:
                g = g * inv
            if MAXIMIZE:
                g = -g
            u_hat = _factored_u(g, r, mean_r, tl.load(col_ptr + cols, mask=cmask, other=1.0)) / div
            m = _ema(_load_momentum(meta, t, idx, mask, MKIND, ALIGNED), beta1, one_minus_beta1, u_hat)
            res = u_hat - m
            res = tl.where(mask, res * res, 0.0)
            res_row_sum += tl.sum(res, axis=1)
            _add_column_partials(part, cols, cmask, tile, tl.sum(res, axis=0))
            # m is stored after the residual (u_hat is dead by then: fewer live registers around the Philox)
            if MKIND == MK_FP32:
                tl.store(_ptr(meta, t, C_M, tl.float32, ALIGNED) + idx, m, mask=mask)
            elif MKIND == MK_BF16:
                bits = _random_bits(key, step, idx, STREAM_MOMENTUM)
                tl.store(_ptr(meta, t, C_M, tl.bfloat16, ALIGNED) + idx, _sr_bf16(m, bits), mask=mask)
            else:
                _gather_absmax(meta, t, m, idx, rows, rmask, mask, n0, N, qmax + qoff, qold + qoff)
        _update_res_rows(R_ptr, rows, rmask, res_row_sum, N, beta3, one_minus_beta3, eps2)
        _row_tile_done()


@triton.jit
def _gather_absmax(meta, t, m, idx, rows, rmask, mask, n0, N, qmax, qold):
    """int8 momentum, phase 3: qmax[block] = max |new m| over the block (as int32 bits: non-negative floats
    order as their bits, and a NaN, whose bits are the largest, wins as torch's amax lets it); the element
    that starts a block copies the block's old absmax to qold, for phase 4, which overwrites the state."""
    bits = tl.where(mask, tl.abs(m), 0.0).to(tl.int32, bitcast=True)
    if N % QBLOCK == 0:  # BLOCK_N divides QBLOCK: each row of the tile lies in one block, one atomic per row
        tl.atomic_max(qmax + (rows * N + n0) // QBLOCK, tl.max(bits, axis=1), mask=rmask)
    else:
        tl.atomic_max(qmax + idx // QBLOCK, bits, mask=mask)
    first = mask & (idx % QBLOCK == 0)
    old = tl.load(_ptr(meta, t, C_ABSMAX, tl.float32, False) + idx // QBLOCK, mask=first, other=0.0)
    tl.store(qold + idx // QBLOCK, old, mask=first)


@triton.jit
def _momentum_chunk(meta, t, local, div, beta1, one_minus_beta1, inv, DTYPE: tl.constexpr,
                    MAXIMIZE: tl.constexpr, FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr,
                    ALIGNED: tl.constexpr, AMP: tl.constexpr):
    """One chunk of flat tensor t: the momentum only (no confidence step for ndim < 2)."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    m_ptr = _ptr(meta, t, C_M, tl.float32, ALIGNED)
    v_ptr = _ptr(meta, t, C_ROW, tl.float32, ALIGNED)
    numel = _vec_run(meta, t, C_NUMEL, DTYPE, ALIGNED)
    for i0 in range(0, FLAT_CHUNK, FLAT_BLOCK):
        offs = local * FLAT_CHUNK + i0 + tl.arange(0, FLAT_BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if AMP:
            g = g * inv
        if MAXIMIZE:
            g = -g
        u_hat = g * _rsqrt(tl.load(v_ptr + offs, mask=mask, other=1.0)) / div
        m = _ema(tl.load(m_ptr + offs, mask=mask, other=0.0), beta1, one_minus_beta1, u_hat)
        tl.store(m_ptr + offs, m, mask=mask)


@triton.jit
def _momentum_res_factored(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3, eps2,
                           inv, rng, qmax, qold, DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, TILED: tl.constexpr,
                           AMP: tl.constexpr, MKIND: tl.constexpr):
    # Two copies of the body: with 16-byte loads where the host found them safe (C_VEC), else scalar.
    if _field(meta, t, C_VEC) != 0:
        _momentum_res_stripe_lp(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3,
                             eps2, inv, rng, qmax, qold, DTYPE, MAXIMIZE, ROWS, BLOCK_N, True, NUM_STAGES, TILED,
                             AMP, MKIND)
    else:
        _momentum_res_stripe_lp(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3,
                             eps2, inv, rng, qmax, qold, DTYPE, MAXIMIZE, ROWS, BLOCK_N, False, NUM_STAGES, TILED,
                             AMP, MKIND)


@triton.jit
def _momentum_res_packed(meta, t, local, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3, eps2, inv,
                         DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, PM: tl.constexpr, PK: tl.constexpr,
                         AMP: tl.constexpr):
    """One packed block of tensor t (multi_tensor.PACK_ELEMS): m, then R and C of its matrices."""
    M, N, eb, rb, cb, k0, k, kmask, idx, mask, rows, rmask, cols, cmask = _packed(meta, t, local, PM, PK)
    g = tl.load(_ptr(meta, t, C_G, DTYPE, False) + eb + idx, mask=mask, other=0.0).to(tl.float32)
    if AMP:
        g = g * inv
    if MAXIMIZE:
        g = -g
    r = tl.load(_ptr(meta, t, C_ROW, tl.float32, False) + rb + rows, mask=rmask, other=1.0)
    mean_r = _packed_mean(r, rmask, M)
    c = tl.load(_ptr(meta, t, C_COL, tl.float32, False) + cb + cols, mask=cmask, other=1.0)
    u_hat = g * _rsqrt(r / mean_r[:, None])[:, :, None] * _rsqrt(c)[:, None, :] / div
    m_ptr = _ptr(meta, t, C_M, tl.float32, False) + eb
    m = _ema(tl.load(m_ptr + idx, mask=mask, other=0.0), beta1, one_minus_beta1, u_hat)
    tl.store(m_ptr + idx, m, mask=mask)
    res = u_hat - m
    res = tl.where(mask, res * res, 0.0)
    _packed_factors(meta, t, res, rb, cb, rows, rmask, cols, cmask, M, N, beta3, one_minus_beta3, eps2, C_RES_ROW,
                    C_RES_COL)


@triton.jit
def _momentum_res_kernel(meta, blocks, ws, stats, amp, rng, qmax, qold, beta1, one_minus_beta1, beta3,
                         one_minus_beta3, eps2, DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_N: tl.constexpr, SLAB_N: tl.constexpr, FLAT_CHUNK: tl.constexpr,
                         FLAT_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, TILED: tl.constexpr, AMP: tl.constexpr,
                         LOWBIT: tl.constexpr, PACKED: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # GradScaler: skip the whole step, else unscale g by inv
        return
    inv = _amp_inv_scale(amp, AMP)
    t, local = _this_block(blocks)
    div = tl.load(stats + _field(meta, t, C_DIV))
    if _field(meta, t, C_NROWS) > 0:  # factored
        if LOWBIT != LB_INT8:
            kind = MK_FP32  # a constant compiles the bf16 bodies out (LOWBIT: the plan's momentum kinds)
            if LOWBIT == LB_BF16:
                kind = _field(meta, t, C_MKIND)
            pack = 0  # a constant 0 compiles the packed bodies out (PACKED: the plan has packed tensors)
            if PACKED:
                pack = _field(meta, t, C_PACK)
            # Packed small matrices, one body per compiled tile size (multi_tensor.PACK_SIZES); else two copies
            # of the stripe body: with 16-byte loads where the host found them safe (C_VEC), else scalar.
            if pack == 1:
                _momentum_res_packed(meta, t, local, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3,
                                     eps2, inv, DTYPE, MAXIMIZE, 1, PACK_K1, AMP)
            elif pack == 4:
                _momentum_res_packed(meta, t, local, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3,
                                     eps2, inv, DTYPE, MAXIMIZE, 4, PACK_K4, AMP)
            elif pack == 8:
                _momentum_res_packed(meta, t, local, stats, div, beta1, one_minus_beta1, beta3, one_minus_beta3,
                                     eps2, inv, DTYPE, MAXIMIZE, 8, PACK_K8, AMP)
            elif _field(meta, t, C_VEC) != 0:
                if kind == MK_BF16:
                    _momentum_res_stripe(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3,
                                         one_minus_beta3, eps2, inv, rng, DTYPE, MAXIMIZE, ROWS, SLAB_N, True,
                                         NUM_STAGES, TILED, AMP, MK_BF16)
                else:
                    _momentum_res_stripe(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3,
                                         one_minus_beta3, eps2, inv, rng, DTYPE, MAXIMIZE, ROWS, SLAB_N, True,
                                         NUM_STAGES, TILED, AMP, MK_FP32)
            else:
                if kind == MK_BF16:
                    _momentum_res_stripe(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3,
                                         one_minus_beta3, eps2, inv, rng, DTYPE, MAXIMIZE, ROWS, SLAB_N // 2, False,
                                         NUM_STAGES, TILED, AMP, MK_BF16)
                else:
                    _momentum_res_stripe(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3,
                                         one_minus_beta3, eps2, inv, rng, DTYPE, MAXIMIZE, ROWS, SLAB_N // 2, False,
                                         NUM_STAGES, TILED, AMP, MK_FP32)
        else:  # a group with int8 momenta: a body per storage kind
            kind = _field(meta, t, C_MKIND)
            if kind == MK_FP32:
                _momentum_res_factored(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3,
                                       one_minus_beta3, eps2, inv, rng, qmax, qold, DTYPE, MAXIMIZE, ROWS, BLOCK_N,
                                       NUM_STAGES, TILED, AMP, MK_FP32)
            elif kind == MK_BF16:
                _momentum_res_factored(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3,
                                       one_minus_beta3, eps2, inv, rng, qmax, qold, DTYPE, MAXIMIZE, ROWS, BLOCK_N,
                                       NUM_STAGES, TILED, AMP, MK_BF16)
            else:
                _momentum_res_factored(meta, t, local, ws, stats, div, beta1, one_minus_beta1, beta3,
                                       one_minus_beta3, eps2, inv, rng, qmax, qold, DTYPE, MAXIMIZE, ROWS, BLOCK_N,
                                       NUM_STAGES, TILED, AMP, MK_INT8)
    else:
        if _field(meta, t, C_VEC) != 0:
            _momentum_chunk(meta, t, local, div, beta1, one_minus_beta1, inv, DTYPE, MAXIMIZE, FLAT_CHUNK,
                            FLAT_BLOCK, True, AMP)
        else:
            _momentum_chunk(meta, t, local, div, beta1, one_minus_beta1, inv, DTYPE, MAXIMIZE, FLAT_CHUNK,
                            FLAT_BLOCK, False, AMP)


@triton.jit
def _res_finalize_kernel(meta, fin_blocks, ws, stats, amp, beta3, one_minus_beta3, eps2, dmeta, sums,
                         ROWS: tl.constexpr, FIN_STRIPES: tl.constexpr, FIN_COLS: tl.constexpr,
                         FIN_MEAN: tl.constexpr, NUM_STAGES: tl.constexpr, AMP: tl.constexpr, MODE: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # a skipped step: C must not change
        return
    _finalize_columns_and_means(meta, fin_blocks, ws, stats, beta3, one_minus_beta3, eps2, dmeta, sums, ws,
                                COL=C_RES_COL, ROW=C_RES_ROW, MEAN_SLOT=1, ROWS=ROWS, FIN_STRIPES=FIN_STRIPES,
                                FIN_COLS=FIN_COLS, FIN_MEAN=FIN_MEAN, NUM_STAGES=NUM_STAGES, MODE=MODE, CLIP=False,
                                TILES_COL=C_TILES, WS_COL=C_WS_COL)


# Register cap of the default (fp32 momentum) kernel: two 8-warp programs per SM. With up to 255 ptxas gives
# the slab body 154 registers (sm_90 fp32; one program per SM); at 128 it spills nothing (the AOT check
# compiles with the same cap). So is the bf16 momentum's (LB_BF16: 128, no spills); the _lp bodies of groups
# with an int8 momentum need more and are not capped.
MAXNREG = 128


def momentum_res(plan, ws, stats, *, beta1: float, beta3: float, eps2: float, maximize: bool, amp=None,
                 shards=None, rng=None, qmax=None, qold=None) -> None:
    """Launch phase 3 and its finalize for every tensor of `plan` (`amp`, `shards`: see sq_stats). Low-precision
    momentum (plan.lowbit): rng, the int64 [T, 2] (Philox key, step) per tensor; qmax (int32, zeros) and
    qold (fp32), plan.q_blocks slots each, for the int8 momenta."""
    # (SLAB_N is read at each launch, as STAGES: bench.triton_sweep tries other values)
    lowbit = lowbit_of(plan)
    _momentum_res_kernel[(plan.n_blocks,)](
        plan.meta, plan.blocks, ws, stats, ws if amp is None else amp, ws if rng is None else rng,
        ws if qmax is None else qmax, ws if qold is None else qold, beta1, 1.0 - beta1, beta3, 1.0 - beta3,
        eps2, DTYPE=plan.dtype, MAXIMIZE=bool(maximize), ROWS=ROWS, BLOCK_N=BLOCK_N, SLAB_N=_mt.SLAB_N,
        FLAT_CHUNK=FLAT_CHUNK, FLAT_BLOCK=FLAT_BLOCK, TILED=plan.tiles > 1, NUM_STAGES=STAGES["momentum_res"],
        AMP=amp is not None, LOWBIT=lowbit, PACKED=plan.packed, num_warps=NUM_WARPS,
        **({} if lowbit == int(LB_INT8) else {"maxnreg": MAXNREG}))

    def launch(mode, dmeta, sums):
        _res_finalize_kernel[(plan.n_fin,)](plan.meta, plan.fin_blocks, ws, stats, ws if amp is None else amp,
                                            beta3, 1.0 - beta3, eps2, dmeta, sums, AMP=amp is not None,
                                            ROWS=ROWS, FIN_STRIPES=_mt.FIN_STRIPES, FIN_COLS=plan.fin_cols,
                                            FIN_MEAN=FIN_MEAN, NUM_STAGES=STAGES["finalize"], MODE=mode,
                                            num_warps=FIN_WARPS)
    finalize(plan, ws, launch, shards, "res")
