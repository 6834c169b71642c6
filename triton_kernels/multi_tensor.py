"""Multi-tensor plumbing shared by every phase (mirror of csrc/multi_tensor.cuh and csrc/came_ops.h).

One launch covers every tensor of a (device, dtype) group. The host builds, once per parameter set, three
device tables that every phase reads (`build_plan`):

    meta        int64 [T, NCOL]   per tensor: addresses of p, g, m, r|v, c, R, C; numel, M, N (M = 0 for
                                  tensors with ndim < 2); offsets into the workspace and the stats buffer;
                                  the 16-byte-load flag (see below)
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
sum of blocks) floats (each tensor's partials padded to 4 floats), i.e. about numel/ROWS floats (1/64 of
the params: 69 MB for 1.1B params, any dtype), shared by phases 1-3 in turn; and `stats`, 2B+1 floats per
tensor: mean_M(r)[B], mean_M(R)[B], clip divisor.

The grad column of `meta` is the only one that changes between steps (zero_grad(set_to_none=True) may
reallocate grads): `Plan.update_grads` compares data_ptr()s on the host and re-uploads that column only when
they moved, from pinned memory, without a host sync.

16-byte loads (as csrc's vec_ok): addresses loaded from a table carry no alignment the compiler can see, so
by default every access is a scalar 4-byte (bf16: 2-byte) load. Per tensor, the host sets C_VEC when every
full-size pointer (p, g, m, v) and column statistic (c, C) is 16-byte aligned and every row or chunk starts
on a 16-byte boundary (N % VEC == 0, flat: numel % VEC == 0; VEC = 16 bytes of the param dtype). The phase
kernels then take a copy of their body in which tl.multiple_of promises that alignment, and Triton emits
ld.global.v4 (tests/test_triton_backend.py reads the PTX). Tensors that fail the test take the scalar body.
"""
from __future__ import annotations

import dataclasses

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
C_VEC = tl.constexpr(14)       # 1: 16-byte loads are safe for this tensor (see the module docstring)
NCOL = tl.constexpr(15)

WS_ALIGN = 4                   # each tensor's column partials start on a 16-byte boundary of the workspace

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
    vec_base: tuple = ()       # per tensor: C_VEC as far as everything but the grad allows
    vec: tuple = ()            # per tensor: the C_VEC now in `meta` (vec_base and an aligned grad)
    uploads: list = dataclasses.field(default_factory=list)  # pinned sources of the last uploads, kept alive

    def update_grads(self, grads) -> None:
        """Point the table at this step's grads: a host-side compare, and uploads only when grads moved."""
        ptrs = tuple(g.data_ptr() for g in grads)
        if ptrs == self.grad_ptrs:
            return
        _check_grads(grads, self.dtype)
        self.uploads = [self._upload(C_G, ptrs)]
        vec = tuple(int(ok and ptr % 16 == 0) for ok, ptr in zip(self.vec_base, ptrs))
        if vec != self.vec:  # a new grad lost (or regained) 16-byte alignment: rare
            self.uploads.append(self._upload(C_VEC, vec))
            self.vec = vec
        self.grad_ptrs = ptrs

    def _upload(self, column, values) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.int64)
        if self.meta.is_cuda:
            host = host.pin_memory()  # a pageable host-to-device copy would synchronize the stream
        self.meta[:, int(column)].copy_(host, non_blocking=True)
        return host


def plan_key(params, exp_avgs, rows, cols, res_rows, res_cols, sqs) -> tuple:
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    return tuple((p.data_ptr(), tuple(p.shape), p.dtype, ptr(m), ptr(r), ptr(c), ptr(R), ptr(C), ptr(v))
                 for p, m, r, c, R, C, v in zip(params, exp_avgs, rows, cols, res_rows, res_cols, sqs))


def _check_grads(grads, dtype) -> None:
    # The kernels read a grad through a pointer of the param dtype: any other dtype would be misread (and
    # read out of bounds). The optimizer routes such groups to the torch backend; this guards direct calls.
    for i, g in enumerate(grads):
        if _TORCH_TO_TL.get(g.dtype) != dtype or not g.is_contiguous():
            raise ValueError(f"backend='triton': grads[{i}] must be a contiguous tensor of the param dtype "
                             f"({dtype}), got {g.dtype}{'' if g.is_contiguous() else ', non-contiguous'}")


def _check_group(params, exp_avgs, rows, cols, res_rows, res_cols, sqs) -> None:
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _TORCH_TO_TL:
        raise ValueError(f"backend='triton' takes float32, bfloat16 or float16 params, got {dtype}")
    for i, (p, m, r, c, R, C, v) in enumerate(zip(params, exp_avgs, rows, cols, res_rows, res_cols, sqs)):
        stats = (m, r, c, R, C) if p.ndim >= 2 else (m, v)
        if p.dtype != dtype or p.device != device or any(
                x is None or x.dtype != torch.float32 or x.device != device or not x.is_contiguous() for x in stats):
            raise ValueError(f"backend='triton': params[{i}] ({p.dtype}, {p.device}) must share the group's dtype "
                             f"{dtype} and device {device}, and its state must be contiguous float32 tensors there")


def _vec_ok(p, g, m, c, C, v) -> int:
    """C_VEC of one tensor (see the module docstring)."""
    vec = 16 // p.element_size()
    run = p.shape[-1] if p.ndim >= 2 else p.numel()  # elements between 16-byte boundaries that must align
    return int(run % vec == 0 and all(x is None or x.data_ptr() % 16 == 0 for x in (p, g, m, c, C, v)))


def build_plan(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs) -> Plan:
    """Build the tables for one (device, dtype) group of contiguous tensors (host work, once per param set)."""
    _check_group(params, exp_avgs, rows, cols, res_rows, res_cols, sqs)
    _check_grads(grads, _TORCH_TO_TL[params[0].dtype])
    device = params[0].device
    meta, blocks, fin, vec_base, vec = [], [], [], [], []
    ws_col = ws_blk = stat = 0
    for t, (p, g, m, r, c, R, C, v) in enumerate(zip(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs)):
        numel = p.numel()
        if p.ndim >= 2:
            M, N = p.shape[-2], p.shape[-1]
            B = numel // (M * N) if M * N else 0
            n_main = B * _cdiv(M, ROWS)
            colpart = _cdiv(n_main * N, WS_ALIGN) * WS_ALIGN  # padded: the next tensor's partials stay aligned
            n_fin = _cdiv(B * N, FIN_COLS) + B
            addr = (r.data_ptr(), c.data_ptr(), R.data_ptr(), C.data_ptr())
        else:
            M = N = B = 0
            n_main = _cdiv(numel, FLAT_CHUNK)
            colpart = n_fin = 0
            addr = (v.data_ptr(), 0, 0, 0)
        vec_base.append(_vec_ok(p, None, m, c, C, v))
        vec.append(_vec_ok(p, g, m, c, C, v))
        meta.append([p.data_ptr(), g.data_ptr(), m.data_ptr(), *addr, numel, M, N, ws_col, ws_blk, stat, stat + 2 * B,
                     vec[-1]])
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
        ws_floats=max(ws_col, ws_blk, 1), stats_floats=max(stat, 1), dtype=_TORCH_TO_TL[params[0].dtype],
        vec_base=tuple(vec_base), vec=tuple(vec))


# ---------------------------------------------------------------------------------- device-side helpers
@triton.jit
def _ptr(meta, t, COLUMN: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in column COLUMN of tensor t's row of `meta`, as a pointer to DTYPE; ALIGNED promises
    the compiler 16-byte alignment (only where the host set C_VEC for this tensor)."""
    p = tl.load(meta + t * NCOL + COLUMN).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _field(meta, t, COLUMN: tl.constexpr):
    return tl.load(meta + t * NCOL + COLUMN)


@triton.jit
def _vec_run(meta, t, COLUMN: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Field COLUMN (a row length N or a flat numel) of tensor t, promised a multiple of 16 bytes of DTYPE
    when ALIGNED, so that row starts and the masks `cols < N` are known to fall on 16-byte boundaries.
    (The load happens here on purpose: tl.multiple_of marks the op that defines its operand, and a value
    passed in as an argument has none in this function, so the hint would be dropped.)"""
    x = tl.load(meta + t * NCOL + COLUMN)
    if ALIGNED:
        if DTYPE == tl.float32:
            x = tl.multiple_of(x, 4)
        else:
            x = tl.multiple_of(x, 8)
    return x


@triton.jit
def _ws_col(meta, t, ALIGNED: tl.constexpr):
    """First workspace float of tensor t's column partials (a multiple of WS_ALIGN, see build_plan)."""
    off = _field(meta, t, C_WS_COL)
    if ALIGNED:
        off = tl.multiple_of(off, 4)
    return off


@triton.jit
def _this_block(blocks):
    """(tensor, local block index) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    return tl.load(blocks + 2 * pid), tl.load(blocks + 2 * pid + 1)


@triton.jit
def _stripe(meta, t, local, ROWS: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Geometry of stripe `local` of factored tensor t: (M, N, b, row0, row_end), rows of the [B*M, N] view."""
    M = _field(meta, t, C_NROWS)
    N = _vec_run(meta, t, C_NCOLS, DTYPE, ALIGNED)
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
        col = _ptr(meta, t, COL, tl.float32, False)
        c = tl.load(col + k, mask=kmask, other=0.0)
        tl.store(col + k, beta * c + one_minus_beta * (col_sum / M.to(tl.float32) + eps), mask=kmask)
    else:
        mb = local - col_blocks
        row = _ptr(meta, t, ROW, tl.float32, False) + mb * M
        row_sum = tl.zeros([FIN_COLS], dtype=tl.float32)
        for i0 in range(0, M, FIN_COLS):
            row_sum += tl.load(row + i0 + offs, mask=i0 + offs < M, other=0.0)
        tl.store(stats + _field(meta, t, C_STAT) + MEAN_SLOT * B + mb, tl.sum(row_sum, axis=0) / M.to(tl.float32))
