"""Phase 2, `clip_stats`: the RMS of the normalized update u, per tensor (mirror of csrc/clip_stats.cu).

Math (spec symbols; factored tensors as [B, M, N]):
    u = g * rsqrt(r / mean_M(r))[:, None] * rsqrt(c)[None, :]     (ndim < 2: u = g * rsqrt(v))
    _clip_stats_kernel     ws[block] = sum over the block of u^2
    _clip_finalize_kernel  stats[div] = max(1, sqrt(sum_blocks ws / numel) / d), blocks added in order
                           with bias correction (s_u = bias_scales[t, 0]; u_hat = s_u*u / max(1, s_u*RMS(u)/d)):
                           stats[div] = max(1, s_u*RMS(u)/d) / s_u, so phase 3's u / stats[div] needs no change
u is recomputed from g, not stored: storing it would cost a full-size write and read.
Traffic per element: reads g (4 B fp32, 2 B bf16), right after phase 1 read it (L2 may still hold small
tensors); flat tensors also read v (4 B). r, c: O(rows + cols). Grid: one program per row tile of ROWS
rows or flat chunk (plan.tile_blocks, largest first; [ROWS, read_block_n] tiles of 8 KB); finalize: one
program per tensor. Deterministic: no atomics, fixed-order sums.
"""
import triton
import triton.language as tl

from .came_math import _factored_u
from .multi_tensor import _amp_found_inf, _amp_inv_scale
from .multi_tensor import (C_COL, C_DIV, C_G, C_NCOLS, C_NROWS, C_NUMEL, C_PACK, C_ROW, C_STAT, C_VEC, C_WS_BLK,
                           D_CLIP, D_NUMEL, DNCOL, FIN_APPLY, FIN_DIRECT, FIN_EXPORT, PACK_K1, PACK_K4, PACK_K8, _packed,
                           FLAT_BLOCK, FLAT_CHUNK, NUM_WARPS, ROWS, STAGES, _field, _ptr, _stripe, _this_block,
                           _vec_run, read_block_n)


@triton.jit
def _clip_stripe(meta, t, local, stats, inv, DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 ALIGNED: tl.constexpr, NUM_STAGES: tl.constexpr, AMP: tl.constexpr):
    """Sum of u^2 over one stripe of factored tensor t."""
    g_ptr = _ptr(meta, t, C_G, DTYPE, ALIGNED)
    M, N, b, row0, row_end, _ = _stripe(meta, t, local, ROWS, DTYPE, ALIGNED, TILED=False)  # one row tile
    col_ptr = _ptr(meta, t, C_COL, tl.float32, ALIGNED) + b * N
    mean_r = tl.load(stats + _field(meta, t, C_STAT) + b)
    rows = row0 + tl.arange(0, ROWS)
    rmask = rows < row_end
    r = tl.load(_ptr(meta, t, C_ROW, tl.float32, False) + rows, mask=rmask, other=1.0)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for n0 in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        g = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        if AMP:
            g = g * inv
        u = _factored_u(g, r, mean_r, tl.load(col_ptr + cols, mask=cmask, other=1.0))
        acc += u * u
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def _clip_chunk(meta, t, local, inv, DTYPE: tl.constexpr, FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr,
                ALIGNED: tl.constexpr, AMP: tl.constexpr):
    """Sum of u^2 = g^2 / v over one chunk of flat tensor t."""
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
        u = g * tl.rsqrt(tl.load(v_ptr + offs, mask=mask, other=1.0))
        acc += u * u
    return tl.sum(acc, axis=0)


@triton.jit
def _clip_packed(meta, t, local, stats, inv, DTYPE: tl.constexpr, PM: tl.constexpr, PK: tl.constexpr,
                 AMP: tl.constexpr):
    """Sum of u^2 over one packed block of tensor t (multi_tensor.PACK_ELEMS), in two half tiles (the whole
    tile spilled on sm_90 for bf16)."""
    total = 0.0
    for half in tl.static_range(2):
        M, N, eb, rb, cb, k0, k, kmask, idx, mask, rows, rmask, cols, cmask = _packed(meta, t, 2 * local + half, PM,
                                                                                     PK // 2)
        g = tl.load(_ptr(meta, t, C_G, DTYPE, False) + eb + idx, mask=mask, other=0.0).to(tl.float32)
        if AMP:
            g = g * inv
        r = tl.load(_ptr(meta, t, C_ROW, tl.float32, False) + rb + rows, mask=rmask, other=1.0)
        mean_r = tl.load(stats + _field(meta, t, C_STAT) + k0 + k, mask=kmask, other=1.0)
        c = tl.load(_ptr(meta, t, C_COL, tl.float32, False) + cb + cols, mask=cmask, other=1.0)
        u = g * tl.rsqrt(r / mean_r[:, None])[:, :, None] * tl.rsqrt(c)[:, None, :]
        total += tl.sum(tl.sum(tl.sum(u * u, axis=2), axis=1), axis=0)
    return total


@triton.jit
def _clip_stats_kernel(meta, blocks, ws, stats, amp, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr,
                       NUM_STAGES: tl.constexpr, AMP: tl.constexpr, PACKED: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # GradScaler: skip the whole step, else unscale g by inv
        return
    inv = _amp_inv_scale(amp, AMP)
    t, local = _this_block(blocks)
    # Two copies of each body: with 16-byte loads where the host found them safe (C_VEC), else scalar.
    # (Compiled Triton wants a name bound in every branch of a runtime `if` to have one type: `total` is an
    # fp32 scalar in all four.)
    if _field(meta, t, C_NROWS) > 0:  # factored
        pack = 0  # a constant 0 compiles the packed bodies out (PACKED: the plan has packed tensors)
        if PACKED:
            pack = _field(meta, t, C_PACK)
        if pack == 1:  # packed small matrices, one body per compiled tile size (multi_tensor.PACK_SIZES)
            total = _clip_packed(meta, t, local, stats, inv, DTYPE, 1, PACK_K1, AMP)
        elif pack == 4:
            total = _clip_packed(meta, t, local, stats, inv, DTYPE, 4, PACK_K4, AMP)
        elif pack == 8:
            total = _clip_packed(meta, t, local, stats, inv, DTYPE, 8, PACK_K8, AMP)
        elif _field(meta, t, C_VEC) != 0:
            total = _clip_stripe(meta, t, local, stats, inv, DTYPE, ROWS, BLOCK_N, True, NUM_STAGES, AMP)
        else:
            total = _clip_stripe(meta, t, local, stats, inv, DTYPE, ROWS, BLOCK_N, False, NUM_STAGES, AMP)
    else:
        if _field(meta, t, C_VEC) != 0:
            total = _clip_chunk(meta, t, local, inv, DTYPE, FLAT_CHUNK, FLAT_BLOCK, True, AMP)
        else:
            total = _clip_chunk(meta, t, local, inv, DTYPE, FLAT_CHUNK, FLAT_BLOCK, False, AMP)
    tl.store(ws + _field(meta, t, C_WS_BLK) + local, total)


@triton.jit
def _clip_finalize_kernel(meta, ws, stats, bias_scales, clip_threshold, dmeta, sums, ROWS: tl.constexpr,
                          FLAT_CHUNK: tl.constexpr, BLOCK: tl.constexpr, BIAS: tl.constexpr, MODE: tl.constexpr):
    """One program per tensor. MODE (sharded tensors, see multi_tensor.D_CLIP): FIN_EXPORT stores the sum of
    u^2 into `sums`; FIN_APPLY takes it from there (summed over processes) and divides by the whole tensor's
    numel; FIN_DIRECT does both with this tensor's numel."""
    t = tl.program_id(0).to(tl.int64)
    numel = _field(meta, t, C_NUMEL)
    if MODE == FIN_APPLY:
        total = tl.load(sums + tl.load(dmeta + t * DNCOL + D_CLIP))
        numel_all = tl.load(dmeta + t * DNCOL + D_NUMEL).to(tl.float32)
    else:
        M = _field(meta, t, C_NROWS)
        pack = _field(meta, t, C_PACK)
        if pack > 0:  # packed: PACK_ELEMS // pack^2 matrices per block
            N = _field(meta, t, C_NCOLS)
            per_block = PACK_K1 // (pack * pack)
            n_blocks = (numel // (M * N) + per_block - 1) // per_block
        elif M > 0:
            N = _field(meta, t, C_NCOLS)
            n_blocks = (numel // (M * N)) * ((M + ROWS - 1) // ROWS)
        else:
            n_blocks = (numel + FLAT_CHUNK - 1) // FLAT_CHUNK
        part = ws + _field(meta, t, C_WS_BLK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, n_blocks, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            acc += tl.load(part + offs, mask=offs < n_blocks, other=0.0)
        total = tl.sum(acc, axis=0)
        numel_all = numel.to(tl.float32)
    if MODE == FIN_EXPORT:
        tl.store(sums + tl.load(dmeta + t * DNCOL + D_CLIP), total)
    else:
        rms = tl.sqrt(total / numel_all)
        if BIAS:
            s_u = tl.load(bias_scales + 2 * t)
            q = (s_u * rms) / clip_threshold
            # max(1, q) that keeps a NaN q (as torch's clamp does): tl.maximum would return 1 and hide it.
            tl.store(stats + _field(meta, t, C_DIV), tl.where(q < 1.0, 1.0, q) / s_u)
        else:
            q = rms / clip_threshold
            tl.store(stats + _field(meta, t, C_DIV), tl.where(q < 1.0, 1.0, q))


def clip_stats(plan, ws, stats, *, clip_threshold: float, amp=None, bias_scales=None, shards=None) -> None:
    """Launch phase 2 and its finalize for every tensor of `plan` (`amp`: see sq_stats; a skipped step
    leaves only the scratch `stats` written by the finalize, which nothing then reads). `bias_scales`: None
    or the checked [T, 2] fp32 tensor of the bias correction (column 0, s_u, is read here). `shards`: see
    sq_stats (the finalize's reduce is shards.reduce("clip"))."""
    if plan.n_tile_blocks:
        _clip_stats_kernel[(plan.n_tile_blocks,)](
            plan.meta, plan.tile_blocks, ws, stats, ws if amp is None else amp, DTYPE=plan.dtype, ROWS=ROWS,
            BLOCK_N=read_block_n(plan.dtype), FLAT_CHUNK=FLAT_CHUNK, FLAT_BLOCK=FLAT_BLOCK,
            NUM_STAGES=STAGES["clip_stats"], AMP=amp is not None, PACKED=plan.packed,
            num_warps=NUM_WARPS)

    def launch(mode, dmeta, sums):
        _clip_finalize_kernel[(plan.n_tensors,)](
            plan.meta, ws, stats, stats if bias_scales is None else bias_scales, clip_threshold, dmeta, sums,
            ROWS=ROWS, FLAT_CHUNK=FLAT_CHUNK, BLOCK=256, BIAS=bias_scales is not None, MODE=mode, num_warps=4)
    if shards is None:
        launch(int(FIN_DIRECT), ws, ws)
    else:
        launch(int(FIN_EXPORT), shards.dmeta, shards.sums)
        shards.reduce("clip")
        launch(int(FIN_APPLY), shards.dmeta, shards.sums)
