"""Multi-tensor plumbing shared by every phase (mirror of csrc/multi_tensor.cuh and csrc/came_ops.h).

One launch covers every tensor of a (device, dtype) group. The host builds, once per parameter set, three
device tables that every phase reads (`build_plan`):

    meta        int64 [T, NCOL]   per tensor: addresses of p, g, m, r|v, c, R, C; numel, M, N (M = 0 for
                                  tensors with ndim < 2); offsets into the workspace and the stats buffer
    blocks      int64 [nblk, 2]   (tensor, local block) of every phase-kernel program
    fin_blocks  int64 [nfin, 2]   (tensor, local block) of every finalize program of phases 1 and 3

Work units, the same in every phase kernel:
    factored tensor [B, M, N]: block s = a stripe of ROWS whole rows of matrix b = s // cdiv(M, ROWS); the
        stripe loops over N in tiles of BLOCK_N columns, so row sums are complete inside the program and
        column sums are per-stripe partials written to fixed workspace slots (ws[colpart_off + s*N + n]).
    tensor with ndim < 2 (0-d included): block k = elements [k*FLAT_CHUNK, (k+1)*FLAT_CHUNK).
Finalize programs of a factored tensor: cdiv(B*N, FIN_COLS) column programs, then one program per matrix
for mean_M of the row statistic.

Buffers per step (allocated by the backend, freed after it): the workspace, max(sum of column partials,
sum of blocks) floats, i.e. about numel/ROWS floats (1/64 of the params: 69 MB for 1.1B fp32 params), shared
by phases 1-3 in turn; and `stats`, 2B+1 floats per tensor: mean_M(r)[B], mean_M(R)[B], clip divisor.

The grad column of `meta` is the only one that changes between steps (zero_grad(set_to_none=True) may
reallocate grads): `Plan.update_grads` compares data_ptr()s on the host and re-uploads that column only when
they moved, from pinned memory, without a host sync.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

# ---- Work decomposition (the same numbers as csrc/came_ops.h)
ROWS = 64            # rows per stripe: column partials take numel/ROWS floats
BLOCK_N = 32         # columns per tile inside a stripe. From the compiler's resource report (tests/
                     # triton_aot_check.py, no GPU needed): 64 gave 184-255 registers and local-memory
                     # spills in _momentum_res_kernel on sm_80; 32 gives 64-154 registers and no spills.
FLAT_CHUNK = 16384   # elements per program for tensors with ndim < 2
FLAT_BLOCK = 1024    # elements per tile inside a flat chunk
FIN_COLS = 256       # columns (or rows, for the means) per finalize tile
NUM_WARPS = 8

# ---- Columns of `meta` (tl.constexpr so @triton.jit code can use them as constants)
C_P = tl.constexpr(0)          # param address (storage dtype)
C_G = tl.constexpr(1)          # grad address (storage dtype)
C_M = tl.constexpr(2)          # exp_avg address (fp32)
C_ROW = tl.constexpr(3)        # exp_avg_sq_row r [B*M] (factored) or exp_avg_sq v [numel] (flat)
C_COL = tl.constexpr(4)        # exp_avg_sq_col c [B*N]
C_RES_ROW = tl.constexpr(5)    # exp_avg_res_row R [B*M]
C_RES_COL = tl.constexpr(6)    # exp_avg_res_col C [B*N]
C_NUMEL = tl.constexpr(7)
C_NROWS = tl.constexpr(8)      # M (0 for flat tensors)
C_NCOLS = tl.constexpr(9)      # N
C_WS_COL = tl.constexpr(10)    # first workspace float of this tensor's column partials (phases 1, 3)
C_WS_BLK = tl.constexpr(11)    # first workspace float of this tensor's block partials (phase 2)
C_STAT = tl.constexpr(12)      # first stats float: mean_M(r)[B], mean_M(R)[B]
C_DIV = tl.constexpr(13)       # stats index of the clip divisor
NCOL = tl.constexpr(14)

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class Plan:
    """The device tables of one parameter set, and what they were built from (to know when to rebuild)."""
    key: tuple                 # data_ptrs and shapes of everything but the grads
    grad_ptrs: tuple
    meta: torch.Tensor
    blocks: torch.Tensor
    fin_blocks: torch.Tensor
    n_tensors: int
    n_blocks: int
    n_fin: int
    ws_floats: int
    stats_floats: int
    dtype: object              # the tl dtype of params and grads
    grad_host: Optional[torch.Tensor] = None  # keeps the pinned source of the last grad-column upload alive

    def update_grads(self, grads) -> None:
        ptrs = tuple(g.data_ptr() for g in grads)
        if ptrs == self.grad_ptrs:
            return
        host = torch.tensor(ptrs, dtype=torch.int64)
        if self.meta.is_cuda:
            host = host.pin_memory()  # a pageable host-to-device copy would synchronize the stream
        self.meta[:, int(C_G)].copy_(host, non_blocking=True)
        self.grad_host, self.grad_ptrs = host, ptrs


def plan_key(params, exp_avgs, rows, cols, res_rows, res_cols, sqs) -> tuple:
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    return tuple((p.data_ptr(), tuple(p.shape), p.dtype, ptr(m), ptr(r), ptr(c), ptr(R), ptr(C), ptr(v))
                 for p, m, r, c, R, C, v in zip(params, exp_avgs, rows, cols, res_rows, res_cols, sqs))


def build_plan(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs) -> Plan:
    """Build the tables for one (device, dtype) group of contiguous tensors (host work, once per param set)."""
    device = params[0].device
    meta, blocks, fin = [], [], []
    ws_col = ws_blk = stat = 0
    for t, (p, g, m, r, c, R, C, v) in enumerate(zip(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs)):
        numel = p.numel()
        if p.ndim >= 2:
            M, N = p.shape[-2], p.shape[-1]
            B = numel // (M * N) if M * N else 0
            n_main = B * _cdiv(M, ROWS)
            colpart = n_main * N
            n_fin = _cdiv(B * N, FIN_COLS) + B
            addr = (r.data_ptr(), c.data_ptr(), R.data_ptr(), C.data_ptr())
        else:
            M = N = B = 0
            n_main = _cdiv(numel, FLAT_CHUNK)
            colpart = n_fin = 0
            addr = (v.data_ptr(), 0, 0, 0)
        meta.append([p.data_ptr(), g.data_ptr(), m.data_ptr(), *addr, numel, M, N, ws_col, ws_blk, stat, stat + 2 * B])
        blocks.append(torch.stack([torch.full((n_main,), t), torch.arange(n_main)], dim=1))
        fin.append(torch.stack([torch.full((n_fin,), t), torch.arange(n_fin)], dim=1))
        ws_col += colpart
        ws_blk += n_main
        stat += 2 * B + 1
    blocks = torch.cat(blocks).to(torch.int64)
    fin = torch.cat(fin).to(torch.int64)
    return Plan(
        key=plan_key(params, exp_avgs, rows, cols, res_rows, res_cols, sqs),
        grad_ptrs=tuple(g.data_ptr() for g in grads),
        meta=torch.tensor(meta, dtype=torch.int64).to(device),
        blocks=blocks.to(device), fin_blocks=fin.to(device),
        n_tensors=len(params), n_blocks=blocks.shape[0], n_fin=fin.shape[0],
        ws_floats=max(ws_col, ws_blk, 1), stats_floats=max(stat, 1), dtype=_TORCH_TO_TL[params[0].dtype])


# ---------------------------------------------------------------------------------- device-side helpers
@triton.jit
def _ptr(meta, t, COLUMN: tl.constexpr, DTYPE: tl.constexpr):
    """The address in column COLUMN of tensor t's row of `meta`, as a pointer to DTYPE."""
    return tl.load(meta + t * NCOL + COLUMN).to(tl.pointer_type(DTYPE))


@triton.jit
def _field(meta, t, COLUMN: tl.constexpr):
    return tl.load(meta + t * NCOL + COLUMN)


@triton.jit
def _this_block(blocks):
    """(tensor, local block index) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    return tl.load(blocks + 2 * pid), tl.load(blocks + 2 * pid + 1)


@triton.jit
def _stripe(meta, t, local, ROWS: tl.constexpr):
    """Geometry of stripe `local` of factored tensor t: (M, N, b, row0, row_end), rows of the [B*M, N] view."""
    M = _field(meta, t, C_NROWS)
    N = _field(meta, t, C_NCOLS)
    per_matrix = (M + ROWS - 1) // ROWS
    b = local // per_matrix
    row0 = b * M + (local - b * per_matrix) * ROWS
    row_end = tl.minimum(row0 + ROWS, (b + 1) * M)
    return M, N, b, row0, row_end


@triton.jit
def _finalize_columns_and_means(meta, fin_blocks, ws, stats, beta, one_minus_beta, eps,
                                COL: tl.constexpr, ROW: tl.constexpr, MEAN_SLOT: tl.constexpr,
                                ROWS: tl.constexpr, FIN_COLS: tl.constexpr):
    """Finalize of phases 1 and 3 for one program (shared by _sq_finalize_kernel and _res_finalize_kernel).

    column programs: col[b, n] = beta*col + (1-beta)*(sum_s partial[s, n] / M + eps), the stripes s of
                     matrix b added in order (deterministic);
    mean programs:   stats[C_STAT + MEAN_SLOT*B + b] = mean_M(row[b, :]) (row already updated in-block).
    """
    t, local = _this_block(fin_blocks)
    M = _field(meta, t, C_NROWS)
    N = _field(meta, t, C_NCOLS)
    B = _field(meta, t, C_NUMEL) // (M * N)
    per_matrix = (M + ROWS - 1) // ROWS
    col_blocks = (B * N + FIN_COLS - 1) // FIN_COLS
    offs = tl.arange(0, FIN_COLS)
    # (Branch-local names differ: compiled Triton wants a name bound in both branches to have one type.)
    if local < col_blocks:
        k = local * FIN_COLS + offs  # index into the [B, N] column statistic
        kmask = k < B * N
        kb = k // N
        part = ws + _field(meta, t, C_WS_COL) + kb * per_matrix * N + (k - kb * N)
        col_sum = tl.zeros([FIN_COLS], dtype=tl.float32)
        for i in range(0, per_matrix):
            col_sum += tl.load(part + i * N, mask=kmask, other=0.0)
        col = _ptr(meta, t, COL, tl.float32)
        c = tl.load(col + k, mask=kmask, other=0.0)
        tl.store(col + k, beta * c + one_minus_beta * (col_sum / M.to(tl.float32) + eps), mask=kmask)
    else:
        mb = local - col_blocks
        row = _ptr(meta, t, ROW, tl.float32) + mb * M
        row_sum = tl.zeros([FIN_COLS], dtype=tl.float32)
        for i0 in range(0, M, FIN_COLS):
            row_sum += tl.load(row + i0 + offs, mask=i0 + offs < M, other=0.0)
        tl.store(stats + _field(meta, t, C_STAT) + MEAN_SLOT * B + mb, tl.sum(row_sum, axis=0) / M.to(tl.float32))
