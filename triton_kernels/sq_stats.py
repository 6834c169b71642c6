"""Phase 1, `sq_stats`: second-moment statistics, and the clip's statistic (mirror of csrc/sq_stats.cu).

Math (spec symbols; factored tensors as [B, M, N]):
    _sq_stats_kernel     r[b, i] = b2*r + (1-b2)*(sum_n g[b,i,n]^2 / N + eps1)     (row sums complete in-block)
                         ws[s, n] = sum over the rows of stripe s of g^2             (column partials Q)
                         N <= NPAD_MAX (fused plans): also ws[P + s, n] = sum over the rows of (g * rsqrt(r))^2
                         ndim < 2: v = b2*v + (1-b2)*(g^2 + eps1); fused: ws[blk] = sum (g * rsqrt(v))^2
                         packed: r, c, mean_M(r) in-block; fused: ws[blk] = sum u^2 of the block
    _sq_finalize_kernel  c[b, n] = b2*c + (1-b2)*(sum_s ws[s, n] / M + eps1);  stats: mean_M(r)[b]
                         fused, N <= NPAD_MAX: wsd[W + b*N + n] = sum_s P[s, n] / c[b, n]   (fp64)
The clip's sum of u^2 is then made from these by clip_stats' finalize (see multi_tensor.CLIP_IN_PHASE1).
Traffic per element: reads g once (4 B fp32, 2 B bf16); flat tensors also read and write v (8 B). Stripes of
N <= NPAD_MAX: [SUB, NPAD] tiles of whole rows held in registers, column sums of g^2 and t^2 kept in
registers over the stripe and stored once (2 floats per stripe column); wider rows: [ROWS, read_block_n]
tiles of 8 KB looping over N, partials 4 B per row-tile column (1/ROWS of the elements), read back when a
stripe has several row tiles. Grid: one program per stripe of TILES1 row tiles, packed block or flat chunk
(plan.blocks1, largest first; the stripes of the widest in-register body in a second launch, plan.blocks_big,
see phase1_launches); finalize: cdiv(B*N, FIN_COLS) + B programs per factored tensor, reading the
partials once. Deterministic: no atomics, every sum in a fixed order.
"""
import triton
import triton.language as tl

from .came_math import _ema, _rsqrt
from .multi_tensor import _amp_found_inf, _amp_inv_scale
from .multi_tensor import (C_COL, C_G, C_NPAD, C_NROWS, C_NUMEL, C_PACK, C_ROW, C_STAT, C_TILES1, C_VEC, C_WS_BLK,
                           C_WS_P, C_WS_Q1, FIN_MEAN, FIN_WARPS, FLAT_BLOCK, FLAT_CHUNK,
                           NUM_WARPS, PACK_K1, PACK_K4, PACK_K8, REG_ELEMS, ROWS, STAGES, _add_column_partials, _field,
                           _finalize_columns_and_means, _packed, _packed_factors, _ptr, _row_tile_done, _stripe_of,
                           _this_block, _vec_run, _ws_col, finalize, read_block_n)
from . import multi_tensor as _mt


@triton.jit
def _sq_stripe(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
               NUM_STAGES: tl.constexpr, TILED: tl.constexpr, AMP: tl.constexpr):
    """One stripe of factored tensor t: r for its rows, column partials of g^2 into ws."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    row_ptr = _ptr(meta, t, C_ROW, tl.float32, False)  # indexed by row: no alignment to promise
    M, N, b, row0, row_end, n_tiles = _stripe_of(meta, t, local, ROWS, DTYPE, ALIGNED, TILED, C_TILES1)
    part = ws + _ws_col(meta, t, ALIGNED, C_WS_Q1) + local * N
    for tile in range(0, n_tiles):
        rows = row0 + tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < row_end
        row_sum = tl.zeros([ROWS], dtype=tl.float32)
        for n0 in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            g = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            if AMP:
                g = g * inv
            sq = g * g
            row_sum += tl.sum(sq, axis=1)
            _add_column_partials(part, cols, cmask, tile, tl.sum(sq, axis=0))
        r = tl.load(row_ptr + rows, mask=rmask, other=0.0)
        tl.store(row_ptr + rows, _ema(r, beta2, one_minus_beta2, row_sum / N.to(tl.float32) + eps1), mask=rmask)
        _row_tile_done()


@triton.jit
def _sq_stripe_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                   NPAD: tl.constexpr, SUB: tl.constexpr, ALIGNED: tl.constexpr, TILED: tl.constexpr,
                   AMP: tl.constexpr, REG_STAGES: tl.constexpr):
    """One stripe of factored tensor t with N <= NPAD, read once: SUB whole rows at a time in registers, their
    r, then column sums of g^2 (Q) and of t^2 = (g * rsqrt(r))^2 (P) kept in registers over the stripe and
    stored once into its partial slots."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    row_ptr = _ptr(meta, t, C_ROW, tl.float32, False)
    M, N, b, row0, row_end, _ = _stripe_of(meta, t, local, ROWS, DTYPE, ALIGNED, TILED, C_TILES1)
    cols = tl.arange(0, NPAD)
    if DTYPE.primitive_bitwidth == 16 and NPAD <= 1024:
        # 8-byte loads (4 values a thread, as fp32 rows): with 16-byte ones a row of at most 1024 spans only
        # half the warps it does in fp32, the others take other rows, and every tile's column sums then cross
        # warps through shared memory (sm_90 PTX: 85 shared stores and 33 barriers against fp32's 19 and 21)
        cols = tl.max_contiguous(cols, 4)
    cmask = cols < N
    q = tl.zeros([NPAD], dtype=tl.float32)
    p = tl.zeros([NPAD], dtype=tl.float32)
    # Bodies of one row per tile (NPAD 4096, 8192) may load the next row while reducing one (REG_STAGES: see
    # multi_tensor.STAGES["sq_rows"]); the others hold many rows per tile already.
    for i0 in tl.range(row0, row_end, SUB, num_stages=REG_STAGES if SUB == 1 else 1):
        rows = i0 + tl.arange(0, SUB)
        rmask = rows < row_end
        g = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        if AMP:
            g = g * inv
        sq = g * g
        r = _ema(tl.load(row_ptr + rows, mask=rmask, other=0.0), beta2, one_minus_beta2,
                 tl.sum(sq, axis=1) / N.to(tl.float32) + eps1)
        tl.store(row_ptr + rows, r, mask=rmask)
        u = g * _rsqrt(tl.where(rmask, r, 1.0))[:, None]  # (a masked row's r may be 0: eps1 = 0 is allowed)
        q += tl.sum(sq, axis=0)
        p += tl.sum(u * u, axis=0)
    tl.store(ws + _ws_col(meta, t, ALIGNED, C_WS_Q1) + local * N + cols, q, mask=cmask)
    tl.store(ws + _field(meta, t, C_WS_P) + local * N + cols, p, mask=cmask)


@triton.jit
def _sq_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, ROWS: tl.constexpr,
            NPAD: tl.constexpr, TILED: tl.constexpr, AMP: tl.constexpr, REG_STAGES: tl.constexpr):
    """_sq_stripe_reg for one compiled NPAD, with 16-byte loads where the host found them safe (C_VEC)."""
    # Rows per tile: REG_ELEMS elements (64 rows for NPAD 64 ... 1 for 4096, 8192), twice as many 16-bit ones
    # for NPAD 256 ... 2048, so that their tile is as many bytes as an fp32 one (csrc/sq_stats.cu's waves
    # likewise; NPAD 64 has a row tile's rows already, wider rows would take too many registers).
    ELEMS: tl.constexpr = REG_ELEMS * (2 if DTYPE.primitive_bitwidth == 16 and NPAD > 64 and NPAD <= 2048 else 1)
    SUB: tl.constexpr = (ELEMS + NPAD - 1) // NPAD
    if _field(meta, t, C_VEC) != 0:
        _sq_stripe_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, NPAD, SUB, True,
                       TILED, AMP, REG_STAGES)
    else:
        _sq_stripe_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, NPAD, SUB, False,
                       TILED, AMP, REG_STAGES)


@triton.jit
def _sq_chunk(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, FLAT_CHUNK: tl.constexpr,
              FLAT_BLOCK: tl.constexpr, ALIGNED: tl.constexpr, AMP: tl.constexpr, FUSED: tl.constexpr):
    """One chunk of flat tensor t: v = b2*v + (1-b2)*(g^2 + eps1); FUSED: ws[blk] = sum of u^2 = (g*rsqrt(v))^2."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    v_ptr = _ptr(meta, t, C_ROW, tl.float32, ALIGNED)
    numel = _vec_run(meta, t, C_NUMEL, DTYPE, ALIGNED)
    acc = tl.zeros([FLAT_BLOCK], dtype=tl.float32)
    for i0 in range(0, FLAT_CHUNK, FLAT_BLOCK):
        offs = local * FLAT_CHUNK + i0 + tl.arange(0, FLAT_BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if AMP:
            g = g * inv
        v = _ema(tl.load(v_ptr + offs, mask=mask, other=0.0), beta2, one_minus_beta2, g * g + eps1)
        tl.store(v_ptr + offs, v, mask=mask)
        if FUSED:
            u = g * _rsqrt(tl.where(mask, v, 1.0))  # (past the end v may be 0: eps1 = 0 is allowed)
            acc += u * u
    if FUSED:
        tl.store(ws + _field(meta, t, C_WS_BLK) + local, tl.sum(acc, axis=0))


@triton.jit
def _sq_packed(meta, t, local, ws, stats, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, PM: tl.constexpr,
               PK: tl.constexpr, AMP: tl.constexpr, FUSED: tl.constexpr):
    """One packed block of tensor t (multi_tensor.PACK_ELEMS): r and c of its whole matrices; FUSED: ws[blk] =
    the block's sum of u^2."""
    M, N, eb, rb, cb, k0, k, kmask, idx, mask, rows, rmask, cols, cmask = _packed(meta, t, local, PM, PK)
    g = tl.load(_ptr(meta, t, C_G, DTYPE, False) + eb + idx, mask=mask, other=0.0).to(tl.float32)
    if AMP:
        g = g * inv
    r, c, mean_r = _packed_factors(meta, t, g * g, rb, cb, rows, rmask, cols, cmask, M, N, beta2, one_minus_beta2,
                                   eps1, C_ROW, C_COL)
    if FUSED:  # the padding (g = 0) gets factors of 1: its r / mean_M(r) can underflow to 0, and rsqrt(0) * 0 is NaN
        u = g * _rsqrt(tl.where(rmask, r / mean_r[:, None], 1.0))[:, :, None] * \
            _rsqrt(tl.where(cmask, c, 1.0))[:, None, :]
        tl.store(ws + _field(meta, t, C_WS_BLK) + local, tl.sum(tl.sum(tl.sum(u * u, axis=2), axis=1), axis=0))


@triton.jit
def _sq_stats_kernel(meta, blocks, ws, stats, amp, beta2, one_minus_beta2, eps1, DTYPE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr,
                     NUM_STAGES: tl.constexpr, TILED: tl.constexpr, AMP: tl.constexpr, PACKED: tl.constexpr,
                     FUSED: tl.constexpr = False, NPADS: tl.constexpr = 0, WIDE: tl.constexpr = True,
                     REG_STAGES: tl.constexpr = 1):
    if _amp_found_inf(amp, AMP):  # GradScaler: skip the whole step, else unscale g by inv
        return
    inv = _amp_inv_scale(amp, AMP)
    t, local = _this_block(blocks)
    # Only the bodies the plan needs are compiled: packed ones (PACKED), the in-register stripe body of each
    # NPAD in use (bit i of NPADS: NPAD_SIZES[i]), the one looping over N (WIDE). Two copies of each: with
    # 16-byte loads where the host found them safe (C_VEC), else scalar.
    if _field(meta, t, C_NROWS) > 0:  # factored (M > 0)
        pack = 0  # a constant 0 compiles the packed bodies out
        if PACKED:
            pack = _field(meta, t, C_PACK)
        npad = 0
        if NPADS != 0:
            npad = _field(meta, t, C_NPAD)
        if pack == 1:  # packed small matrices, one body per compiled tile size (multi_tensor.PACK_SIZES)
            _sq_packed(meta, t, local, ws, stats, beta2, one_minus_beta2, eps1, inv, DTYPE, 1, PACK_K1, AMP, FUSED)
        elif pack == 4:
            _sq_packed(meta, t, local, ws, stats, beta2, one_minus_beta2, eps1, inv, DTYPE, 4, PACK_K4, AMP, FUSED)
        elif pack == 8:
            _sq_packed(meta, t, local, ws, stats, beta2, one_minus_beta2, eps1, inv, DTYPE, 8, PACK_K8, AMP, FUSED)
        elif npad > 0:
            if (NPADS & 1) != 0:
                if npad == 64:
                    _sq_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, 64, TILED, AMP,
                            REG_STAGES)
            if (NPADS & 2) != 0:
                if npad == 256:
                    _sq_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, 256, TILED, AMP,
                            REG_STAGES)
            if (NPADS & 4) != 0:
                if npad == 1024:
                    _sq_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, 1024, TILED, AMP,
                            REG_STAGES)
            if (NPADS & 8) != 0:
                if npad == 2048:
                    _sq_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, 2048, TILED, AMP,
                            REG_STAGES)
            if (NPADS & 16) != 0:
                if npad == 4096:
                    _sq_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, 4096, TILED, AMP,
                            REG_STAGES)
            if (NPADS & 32) != 0:
                if npad == 8192:
                    _sq_reg(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, 8192, TILED, AMP,
                            REG_STAGES)
        elif WIDE:
            if _field(meta, t, C_VEC) != 0:
                _sq_stripe(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, BLOCK_N, True,
                           NUM_STAGES, TILED, AMP)
            else:
                _sq_stripe(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, BLOCK_N, False,
                           NUM_STAGES, TILED, AMP)
    else:
        if _field(meta, t, C_VEC) != 0:
            _sq_chunk(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, FLAT_CHUNK, FLAT_BLOCK, True, AMP,
                      FUSED)
        else:
            _sq_chunk(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, FLAT_CHUNK, FLAT_BLOCK, False, AMP,
                      FUSED)


@triton.jit
def _sq_finalize_kernel(meta, fin_blocks, ws, stats, amp, beta2, one_minus_beta2, eps1, dmeta, sums, wsd,
                        ROWS: tl.constexpr, FIN_STRIPES: tl.constexpr, FIN_COLS: tl.constexpr,
                        FIN_MEAN: tl.constexpr, NUM_STAGES: tl.constexpr, AMP: tl.constexpr, MODE: tl.constexpr,
                        CLIP: tl.constexpr = False):
    if _amp_found_inf(amp, AMP):  # a skipped step: the partials are stale, c must not change
        return
    _finalize_columns_and_means(meta, fin_blocks, ws, stats, beta2, one_minus_beta2, eps1, dmeta, sums, wsd,
                                COL=C_COL, ROW=C_ROW, MEAN_SLOT=0, ROWS=ROWS, FIN_STRIPES=FIN_STRIPES,
                                FIN_COLS=FIN_COLS, FIN_MEAN=FIN_MEAN, NUM_STAGES=NUM_STAGES, MODE=MODE, CLIP=CLIP,
                                TILES_COL=C_TILES1, WS_COL=C_WS_Q1)


def phase1_launches(plan) -> list:
    """(blocks, n_blocks, body constexprs) of each launch of _sq_stats_kernel: one for everything but the
    widest in-register body, which runs in a launch of its own (plan.blocks_big): compiled into the same
    kernel, its registers (about 200 per thread) would cut every other block's occupancy too."""
    widest = 1 << (len(_mt.NPAD_SIZES) - 1)
    out = []
    if plan.n_blocks1:
        out.append((plan.blocks1, plan.n_blocks1, dict(FUSED=plan.fused, NPADS=plan.npads & ~widest,
                                                       WIDE=plan.wide, PACKED=plan.packed)))
    if plan.n_blocks_big:
        out.append((plan.blocks_big, plan.n_blocks_big, dict(FUSED=True, NPADS=widest, WIDE=False, PACKED=False)))
    return out


def sq_stats(plan, ws, stats, *, beta2: float, eps1: float, amp=None, shards=None, wsd=None) -> None:
    """Launch phase 1 and its finalize for every tensor of `plan`. `amp`: None, or the fp32 device tensor
    [found_inf, 1/grad_scale] of a GradScaler step. `shards`: None, or the Shards of sharded tensors (see
    multi_tensor.finalize): the finalize then runs in two halves around shards.reduce("stats"). `wsd`: the
    fp64 scratch of plan.w_doubles doubles (fused plans: W = P / c, read by clip_stats)."""
    fused = plan.fused
    if fused and wsd is None:
        raise ValueError("sq_stats: a fused plan needs its fp64 scratch `wsd` (plan.w_doubles doubles)")
    for blocks, n, kinds in phase1_launches(plan):
        _sq_stats_kernel[(n,)](
            plan.meta, blocks, ws, stats, ws if amp is None else amp, beta2, 1.0 - beta2, eps1, DTYPE=plan.dtype,
            ROWS=ROWS, BLOCK_N=read_block_n(plan.dtype), FLAT_CHUNK=FLAT_CHUNK, FLAT_BLOCK=FLAT_BLOCK,
            TILED=plan.tiles1 > 1, NUM_STAGES=STAGES["sq_stats"], AMP=amp is not None, num_warps=NUM_WARPS,
            REG_STAGES=STAGES["sq_rows"], **kinds)

    def launch(mode, dmeta, sums):
        _sq_finalize_kernel[(plan.n_fin,)](plan.meta, plan.fin_blocks, ws, stats, ws if amp is None else amp,
                                           beta2, 1.0 - beta2, eps1, dmeta, sums, wsd if fused else ws, ROWS=ROWS,
                                           FIN_STRIPES=_mt.FIN_STRIPES, FIN_COLS=plan.fin_cols, FIN_MEAN=FIN_MEAN,
                                           NUM_STAGES=STAGES["finalize"], AMP=amp is not None, MODE=mode,
                                           CLIP=fused and plan.npads != 0, num_warps=FIN_WARPS)
    finalize(plan, ws, launch, shards, "stats")
