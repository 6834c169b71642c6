"""Phase 2, `clip_stats`: the RMS of the normalized update u, per tensor (mirror of csrc/clip_stats.cu).

Math (spec symbols; factored tensors as [B, M, N]):
    u = g * rsqrt(r / mean_M(r))[:, None] * rsqrt(c)[None, :]     (ndim < 2: u = g * rsqrt(v))
    _clip_stats_kernel     ws[block] = sum over the block of u^2
    _clip_finalize_kernel  stats[div] = max(1, sqrt(sum_blocks ws / numel) / d), blocks added in order
u is recomputed from g, not stored: storing it would cost a full-size write and read.
Traffic per element: reads g (4 B fp32, 2 B bf16), right after phase 1 read it (L2 may still hold small
tensors); flat tensors also read v (4 B). r, c: O(rows + cols). Grid: one program per block; finalize: one
program per tensor. Deterministic: no atomics, fixed-order sums.
"""
import triton
import triton.language as tl

from .multi_tensor import (BLOCK_N, C_COL, C_DIV, C_G, C_NCOLS, C_NROWS, C_NUMEL, C_ROW, C_STAT, C_WS_BLK, FLAT_BLOCK,
                           FLAT_CHUNK, NUM_WARPS, ROWS, _field, _ptr, _stripe, _this_block)
from .came_math import _factored_u


@triton.jit
def _clip_stats_kernel(meta, blocks, ws, stats, DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                       FLAT_CHUNK: tl.constexpr, FLAT_BLOCK: tl.constexpr):
    t, local = _this_block(blocks)
    g_ptr = _ptr(meta, t, C_G, DTYPE)
    row_ptr = _ptr(meta, t, C_ROW, tl.float32)
    # (Names bound in both branches of a runtime `if` must have one type in compiled Triton: the tile
    # accumulators are named apart, and only `total`, an fp32 scalar in both, leaves the branch.)
    if _field(meta, t, C_NROWS) > 0:  # factored
        M, N, b, row0, row_end = _stripe(meta, t, local, ROWS)
        col_ptr = _ptr(meta, t, C_COL, tl.float32) + b * N
        mean_r = tl.load(stats + _field(meta, t, C_STAT) + b)
        rows = row0 + tl.arange(0, ROWS)
        rmask = rows < row_end
        r = tl.load(row_ptr + rows, mask=rmask, other=1.0)
        tile_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            g = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            u = _factored_u(g, r, mean_r, tl.load(col_ptr + cols, mask=cmask, other=1.0))
            tile_acc += u * u
        total = tl.sum(tl.sum(tile_acc, axis=1), axis=0)
    else:
        numel = _field(meta, t, C_NUMEL)
        flat_acc = tl.zeros([FLAT_BLOCK], dtype=tl.float32)
        for i0 in range(0, FLAT_CHUNK, FLAT_BLOCK):
            offs = local * FLAT_CHUNK + i0 + tl.arange(0, FLAT_BLOCK)
            mask = offs < numel
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = g * tl.rsqrt(tl.load(row_ptr + offs, mask=mask, other=1.0))
            flat_acc += u * u
        total = tl.sum(flat_acc, axis=0)
    tl.store(ws + _field(meta, t, C_WS_BLK) + local, total)


@triton.jit
def _clip_finalize_kernel(meta, ws, stats, clip_threshold, ROWS: tl.constexpr, FLAT_CHUNK: tl.constexpr,
                          BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    numel = _field(meta, t, C_NUMEL)
    M = _field(meta, t, C_NROWS)
    if M > 0:
        N = _field(meta, t, C_NCOLS)
        n_blocks = (numel // (M * N)) * ((M + ROWS - 1) // ROWS)
    else:
        n_blocks = (numel + FLAT_CHUNK - 1) // FLAT_CHUNK
    part = ws + _field(meta, t, C_WS_BLK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n_blocks, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(part + offs, mask=offs < n_blocks, other=0.0)
    rms = tl.sqrt(tl.sum(acc, axis=0) / numel.to(tl.float32))
    q = rms / clip_threshold
    # max(1, q) that keeps a NaN q (as torch's clamp does): tl.maximum would return 1 and hide it.
    tl.store(stats + _field(meta, t, C_DIV), tl.where(q < 1.0, 1.0, q))


def clip_stats(plan, ws, stats, *, clip_threshold: float) -> None:
    """Launch phase 2 and its finalize for every tensor of `plan`."""
    _clip_stats_kernel[(plan.n_blocks,)](
        plan.meta, plan.blocks, ws, stats, DTYPE=plan.dtype, ROWS=ROWS, BLOCK_N=BLOCK_N, FLAT_CHUNK=FLAT_CHUNK,
        FLAT_BLOCK=FLAT_BLOCK, num_warps=NUM_WARPS)
    _clip_finalize_kernel[(plan.n_tensors,)](plan.meta, ws, stats, clip_threshold, ROWS=ROWS,
                                             FLAT_CHUNK=FLAT_CHUNK, BLOCK=256, num_warps=4)
