"""Phase 2, `clip_stats`: the RMS of the normalized update u, per tensor (mirror of csrc/clip_stats.cu).

Math (spec symbols; factored tensors as [B, M, N]):
    u = g * rsqrt(r / mean_M(r))[:, None] * rsqrt(c)[None, :]     (ndim < 2: u = g * rsqrt(v))
    _clip_stats_kernel     ws[block] = sum over the block of u^2: only for the stripe tensors phase 1 cannot
                           hold in registers (N > NPAD_MAX) and sharded groups (multi_tensor.CLIP_IN_PHASE1)
    _clip_finalize_kernel  stats[div] = max(1, sqrt(sum u^2 / numel) / d), where sum u^2 is
                             sum_b mean_M(r)[b] * sum_n wsd[W + b*N + n]   (phase 1's W = P / c; fp64, in order)
                             or the sum of the tensor's block sums ws[blk] (phase 2's, or phase 1's for flat and
                             packed tensors), added in order;
                           with bias correction (s_u = bias_scales[t, 0]; u_hat = s_u*u / max(1, s_u*RMS(u)/d)):
                           stats[div] = max(1, s_u*RMS(u)/d) / s_u, so phase 3's u / stats[div] needs no change
u is not stored: that would cost a full-size write and read.
Traffic per element: none for the tensors phase 1 covers; phase 2 reads g (4 B fp32, 2 B bf16), and v for
flat tensors of sharded groups (4 B). Grid: one program per row tile of ROWS rows or flat chunk of the
tensors it covers (plan.clip_blocks, largest first; [ROWS, read_block_n] tiles of 8 KB); finalize: one
program per tensor, reading B*N doubles or one float per block. Deterministic: no atomics, fixed-order sums.
"""
import triton
import triton.language as tl

from .came_math import _factored_u, _rsqrt
from .multi_tensor import _amp_found_inf, _amp_inv_scale
from .multi_tensor import (C_COL, C_DIV, C_G, C_NCOLS, C_NPAD, C_NROWS, C_NUMEL, C_PACK, C_ROW, C_STAT, C_VEC,
                           C_WS_BLK, C_WS_W, D_CLIP, D_NUMEL, DNCOL, FIN_APPLY, FIN_DIRECT, FIN_EXPORT, PACK_K1,
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
        u = g * _rsqrt(tl.load(v_ptr + offs, mask=mask, other=1.0))
        acc += u * u
    return tl.sum(acc, axis=0)


@triton.jit
def _clip_stats_kernel(meta, blocks, ws, stats, amp, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr,
                       NUM_STAGES: tl.constexpr, AMP: tl.constexpr):
    if _amp_found_inf(amp, AMP):  # GradScaler: skip the whole step, else unscale g by inv
        return
    inv = _amp_inv_scale(amp, AMP)
    t, local = _this_block(blocks)
    # Two copies of each body: with 16-byte loads where the host found them safe (C_VEC), else scalar.
    # (Compiled Triton wants a name bound in every branch of a runtime `if` to have one type: `total` is an
    # fp32 scalar in all four.) Packed tensors never come here: their plans are fused (phase 1 sums u^2).
    if _field(meta, t, C_NROWS) > 0:  # factored
        if _field(meta, t, C_VEC) != 0:
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
def _clip_finalize_kernel(meta, ws, wsd, stats, bias_scales, clip_threshold, dmeta, sums, ROWS: tl.constexpr,
                          FLAT_CHUNK: tl.constexpr, BLOCK: tl.constexpr, BIAS: tl.constexpr, MODE: tl.constexpr,
                          FUSED: tl.constexpr = False):
    """One program per tensor. MODE (sharded tensors, see multi_tensor.D_CLIP): FIN_EXPORT stores the sum of
    u^2 into `sums`; FIN_APPLY takes it from there (summed over processes) and divides by the whole tensor's
    numel; FIN_DIRECT does both with this tensor's numel. FUSED (a fused plan, FIN_DIRECT): tensors with
    C_NPAD > 0 take their sum from phase 1's W (wsd) and mean_M(r) (stats)."""
    t = tl.program_id(0).to(tl.int64)
    numel = _field(meta, t, C_NUMEL)
    if MODE == FIN_APPLY:
        total = tl.load(sums + tl.load(dmeta + t * DNCOL + D_CLIP)).to(tl.float64)
        numel_all = tl.load(dmeta + t * DNCOL + D_NUMEL).to(tl.float64)
    else:
        M = _field(meta, t, C_NROWS)
        npad = 0
        if FUSED:
            npad = _field(meta, t, C_NPAD)
        if npad > 0:  # sum_b mean_M(r)[b] * sum_n W[b, n]
            N = _field(meta, t, C_NCOLS)
            BN = (numel // (M * N)) * N
            w_ptr = wsd + _field(meta, t, C_WS_W)
            mean_ptr = stats + _field(meta, t, C_STAT)
            wacc = tl.zeros([BLOCK], dtype=tl.float64)
            for i0 in range(0, BN, BLOCK):
                k = i0 + tl.arange(0, BLOCK)
                kmask = k < BN
                mean_r = tl.load(mean_ptr + k // N, mask=kmask, other=0.0).to(tl.float64)
                wacc += tl.load(w_ptr + k, mask=kmask, other=0.0) * mean_r
            total = tl.sum(wacc, axis=0)
        else:  # the tensor's block sums
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
            total = tl.sum(acc, axis=0).to(tl.float64)
        numel_all = numel.to(tl.float64)
    if MODE == FIN_EXPORT:
        tl.store(sums + tl.load(dmeta + t * DNCOL + D_CLIP), total.to(tl.float32))
    else:
        rms = tl.sqrt(total / numel_all).to(tl.float32)
        if BIAS:
            s_u = tl.load(bias_scales + 2 * t)
            q = (s_u * rms) / clip_threshold
            # max(1, q) that keeps a NaN q (as torch's clamp does): tl.maximum would return 1 and hide it.
            tl.store(stats + _field(meta, t, C_DIV), tl.where(q < 1.0, 1.0, q) / s_u)
        else:
            q = rms / clip_threshold
            tl.store(stats + _field(meta, t, C_DIV), tl.where(q < 1.0, 1.0, q))


def clip_stats(plan, ws, stats, *, clip_threshold: float, amp=None, bias_scales=None, shards=None,
               wsd=None) -> None:
    """Launch phase 2 (for the tensors phase 1 did not cover) and the clip finalize for every tensor of
    `plan` (`amp`: see sq_stats; a skipped step leaves only the scratch `stats` written by the finalize,
    which nothing then reads). `bias_scales`: None or the checked [T, 2] fp32 tensor of the bias correction
    (column 0, s_u, is read here). `shards`: see sq_stats (the finalize's reduce is shards.reduce("clip")).
    `wsd`: the fp64 scratch sq_stats wrote (fused plans)."""
    fused = plan.fused
    if fused and wsd is None:
        raise ValueError("clip_stats: a fused plan needs the fp64 scratch `wsd` that sq_stats wrote")
    if plan.n_clip_blocks:
        _clip_stats_kernel[(plan.n_clip_blocks,)](
            plan.meta, plan.clip_blocks, ws, stats, ws if amp is None else amp, DTYPE=plan.dtype, ROWS=ROWS,
            BLOCK_N=read_block_n(plan.dtype), FLAT_CHUNK=FLAT_CHUNK, FLAT_BLOCK=FLAT_BLOCK,
            NUM_STAGES=STAGES["clip_stats"], AMP=amp is not None, num_warps=NUM_WARPS)

    def launch(mode, dmeta, sums):
        _clip_finalize_kernel[(plan.n_tensors,)](
            plan.meta, ws, wsd if fused else ws, stats, stats if bias_scales is None else bias_scales,
            clip_threshold, dmeta, sums, ROWS=ROWS, FLAT_CHUNK=FLAT_CHUNK, BLOCK=256, BIAS=bias_scales is not None,
            MODE=mode, FUSED=fused and plan.npads != 0, num_warps=4)
    if shards is None:
        launch(int(FIN_DIRECT), ws, ws)
    else:
        launch(int(FIN_EXPORT), shards.dmeta, shards.sums)
        shards.reduce("clip")
        launch(int(FIN_APPLY), shards.dmeta, shards.sums)
