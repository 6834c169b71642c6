"""Phase 1, `sq_stats`: second-moment statistics (mirror of csrc/sq_stats.cu).

Math (spec symbols; factored tensors as [B, M, N]):
    _sq_stats_kernel     r[b, i] = b2*r + (1-b2)*(sum_n g[b,i,n]^2 / N + eps1)     (row sums complete in-block)
                         ws[s, n] = sum over the rows of stripe s of g^2             (column partials)
                         ndim < 2: v = b2*v + (1-b2)*(g^2 + eps1)
    _sq_finalize_kernel  c[b, n] = b2*c + (1-b2)*(sum_s ws[s, n] / M + eps1);  stats: mean_M(r)[b]
Traffic per element: reads g (4 B fp32, 2 B bf16, in [ROWS, read_block_n] tiles of 8 KB); flat tensors
also read and write v (8 B). Partials: 4 B per row-tile column (1/ROWS of the elements) written, and as
much read back when a stripe has several row tiles. Grid: one program per stripe of TILES row tiles or
flat chunk (plan.blocks, largest first); finalize: cdiv(B*N, FIN_COLS) + B programs per factored tensor,
reading the partials once (numel/(TILES*ROWS) floats). Deterministic: no atomics, every sum in a fixed
order.
"""
import triton
import triton.language as tl

from .came_math import _ema
from .multi_tensor import _amp_found_inf, _amp_inv_scale
from .multi_tensor import (C_COL, C_G, C_NROWS, C_NUMEL, C_PACK, C_ROW, C_STAT, C_VEC, FIN_COLS, FIN_MEAN,
                           FIN_STRIPES, FIN_WARPS, FLAT_BLOCK, FLAT_CHUNK, NUM_WARPS, PACK_K1, PACK_K4, PACK_K8, ROWS,
                           STAGES, _add_column_partials, _field, _finalize_columns_and_means, _packed, _ptr,
                           _row_tile_done, _stripe, _this_block, _vec_run, _ws_col, finalize, read_block_n)


@triton.jit
def _sq_stripe(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
               NUM_STAGES: tl.constexpr, TILED: tl.constexpr, AMP: tl.constexpr):
    """One stripe of factored tensor t: r for its rows, column partials of g^2 into ws."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    row_ptr = _ptr(meta, t, C_ROW, tl.float32, False)  # indexed by row: no alignment to promise
    M, N, b, row0, row_end, n_tiles = _stripe(meta, t, local, ROWS, DTYPE, ALIGNED, TILED)
    part = ws + _ws_col(meta, t, ALIGNED) + local * N
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
def _sq_chunk(meta, t, local, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, FLAT_CHUNK: tl.constexpr,
              FLAT_BLOCK: tl.constexpr, ALIGNED: tl.constexpr, AMP: tl.constexpr):
    """One chunk of flat tensor t: v = b2*v + (1-b2)*(g^2 + eps1)."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    v_ptr = _ptr(meta, t, C_ROW, tl.float32, ALIGNED)
    numel = _vec_run(meta, t, C_NUMEL, DTYPE, ALIGNED)
    for i0 in range(0, FLAT_CHUNK, FLAT_BLOCK):
        offs = local * FLAT_CHUNK + i0 + tl.arange(0, FLAT_BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if AMP:
            g = g * inv
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        tl.store(v_ptr + offs, _ema(v, beta2, one_minus_beta2, g * g + eps1), mask=mask)


@triton.jit
def _sq_packed(meta, t, local, stats, beta2, one_minus_beta2, eps1, inv, DTYPE: tl.constexpr, PM: tl.constexpr,
               PK: tl.constexpr, AMP: tl.constexpr):
    """One packed block of tensor t (multi_tensor.PACK_ELEMS): r, c and mean_M(r) of its whole matrices."""
    M, N, eb, rb, cb, k0, k, kmask, idx, mask, rows, rmask, cols, cmask = _packed(meta, t, local, PM, PK)
    g = tl.load(_ptr(meta, t, C_G, DTYPE, False) + eb + idx, mask=mask, other=0.0).to(tl.float32)
    if AMP:
        g = g * inv
    sq = g * g
    row_ptr = _ptr(meta, t, C_ROW, tl.float32, False) + rb
    r = _ema(tl.load(row_ptr + rows, mask=rmask, other=0.0), beta2, one_minus_beta2,
             tl.sum(sq, axis=2) / N.to(tl.float32) + eps1)
    tl.store(row_ptr + rows, r, mask=rmask)
    col_ptr = _ptr(meta, t, C_COL, tl.float32, False) + cb
    c = _ema(tl.load(col_ptr + cols, mask=cmask, other=0.0), beta2, one_minus_beta2,
             tl.sum(sq, axis=1) / M.to(tl.float32) + eps1)
    tl.store(col_ptr + cols, c, mask=cmask)
    mean_r = tl.sum(tl.where(rmask, r, 0.0), axis=1) / M.to(tl.float32)
    tl.store(stats + _field(meta, t, C_STAT) + k0 + k, mean_r, mask=kmask)


@triton.jit
def _sq_stats_kernel(meta, blocks, ws, stats, amp, beta2, one_minus_beta2, eps1, DTYPE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr,
                     NUM_STAGES: tl.constexpr, TILED: tl.constexpr, AMP: tl.constexpr, PACKED: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # GradScaler: skip the whole step, else unscale g by inv
        return
    inv = _amp_inv_scale(amp, AMP)
    t, local = _this_block(blocks)
    # Two copies of each body: with 16-byte loads where the host found them safe (C_VEC), else scalar.
    if _field(meta, t, C_NROWS) > 0:  # factored (M > 0)
        pack = 0  # a constant 0 compiles the packed bodies out (PACKED: the plan has packed tensors)
        if PACKED:
            pack = _field(meta, t, C_PACK)
        if pack == 1:  # packed small matrices, one body per compiled tile size (multi_tensor.PACK_SIZES)
            _sq_packed(meta, t, local, stats, beta2, one_minus_beta2, eps1, inv, DTYPE, 1, PACK_K1, AMP)
        elif pack == 4:
            _sq_packed(meta, t, local, stats, beta2, one_minus_beta2, eps1, inv, DTYPE, 4, PACK_K4, AMP)
        elif pack == 8:
            _sq_packed(meta, t, local, stats, beta2, one_minus_beta2, eps1, inv, DTYPE, 8, PACK_K8, AMP)
        elif _field(meta, t, C_VEC) != 0:
            _sq_stripe(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, BLOCK_N, True, NUM_STAGES,
                       TILED, AMP)
        else:
            _sq_stripe(meta, t, local, ws, beta2, one_minus_beta2, eps1, inv, DTYPE, ROWS, BLOCK_N, False, NUM_STAGES,
                       TILED, AMP)
    else:
        if _field(meta, t, C_VEC) != 0:
            _sq_chunk(meta, t, local, beta2, one_minus_beta2, eps1, inv, DTYPE, FLAT_CHUNK, FLAT_BLOCK, True, AMP)
        else:
            _sq_chunk(meta, t, local, beta2, one_minus_beta2, eps1, inv, DTYPE, FLAT_CHUNK, FLAT_BLOCK, False, AMP)


@triton.jit
def _sq_finalize_kernel(meta, fin_blocks, ws, stats, amp, beta2, one_minus_beta2, eps1, dmeta, sums,
                        ROWS: tl.constexpr, FIN_STRIPES: tl.constexpr, FIN_COLS: tl.constexpr,
                        FIN_MEAN: tl.constexpr, NUM_STAGES: tl.constexpr, AMP: tl.constexpr, MODE: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # a skipped step: the partials are stale, c must not change
        return
    _finalize_columns_and_means(meta, fin_blocks, ws, stats, beta2, one_minus_beta2, eps1, dmeta, sums,
                                COL=C_COL, ROW=C_ROW, MEAN_SLOT=0, ROWS=ROWS, FIN_STRIPES=FIN_STRIPES,
                                FIN_COLS=FIN_COLS, FIN_MEAN=FIN_MEAN, NUM_STAGES=NUM_STAGES, MODE=MODE)


def sq_stats(plan, ws, stats, *, beta2: float, eps1: float, amp=None, shards=None) -> None:
    """Launch phase 1 and its finalize for every tensor of `plan`. `amp`: None, or the fp32 device tensor
    [found_inf, 1/grad_scale] of a GradScaler step. `shards`: None, or the Shards of sharded tensors (see
    multi_tensor.finalize): the finalize then runs in two halves around shards.reduce("stats")."""
    _sq_stats_kernel[(plan.n_blocks,)](
        plan.meta, plan.blocks, ws, stats, ws if amp is None else amp, beta2, 1.0 - beta2, eps1, DTYPE=plan.dtype,
        ROWS=ROWS, BLOCK_N=read_block_n(plan.dtype), FLAT_CHUNK=FLAT_CHUNK, FLAT_BLOCK=FLAT_BLOCK,
        TILED=plan.tiles > 1, NUM_STAGES=STAGES["sq_stats"], AMP=amp is not None, PACKED=plan.packed,
        num_warps=NUM_WARPS)

    def launch(mode, dmeta, sums):
        _sq_finalize_kernel[(plan.n_fin,)](plan.meta, plan.fin_blocks, ws, stats, ws if amp is None else amp,
                                           beta2, 1.0 - beta2, eps1, dmeta, sums, ROWS=ROWS, FIN_STRIPES=FIN_STRIPES,
                                           FIN_COLS=FIN_COLS, FIN_MEAN=FIN_MEAN, NUM_STAGES=STAGES["finalize"],
                                           AMP=amp is not None, MODE=mode, num_warps=FIN_WARPS)
    finalize(plan, ws, launch, shards, "stats")
