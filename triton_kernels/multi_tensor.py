"""Multi-tensor plumbing shared by every phase (mirror of csrc/multi_tensor.cuh and csrc/came_ops.h).

One launch covers every tensor of a (device, dtype) group. The host builds, once per parameter set, three
device tables that every phase reads (`build_plan`):

    meta        int64 [T, NCOL]   per tensor: addresses of p, g, m, r|v, c, R, C; numel, M, N (M = 0 for
                                  tensors with ndim < 2); offsets into the workspace and the stats buffer;
                                  the 16-byte-load flag (see below); row tiles per stripe
    blocks      int64 [nblk, 2]   (tensor, local block) of every program of phases 1 and 3, largest first
    tile_blocks int64 [ntb, 2]    the same for phases 2 and 4, whose blocks are always single row tiles (the
                                  same table as `blocks` unless TILES > 1)
    fin_blocks  int64 [nfin, 2]   (tensor, local block) of every finalize program of phases 1 and 3, largest first

Work units, the same in every phase kernel (packed tensors: see PACK_ELEMS below):
    factored tensor [B, M, N]: block s = a stripe of TILES*ROWS whole rows of matrix b = s // cdiv(M,
        TILES*ROWS). The stripe runs its row tiles of ROWS rows one after another, each looping over N in
        tiles of BLOCK_N columns, so row sums are complete inside the program; column sums are per-stripe
        partials in fixed workspace slots (ws[colpart_off + s*N + n]): row tile 0 stores them, row tile j > 0
        adds its sums to them, in that order (one program owns the slots: deterministic).
    tensor with ndim < 2 (0-d included): block k = elements [k*FLAT_CHUNK, (k+1)*FLAT_CHUNK).
TILES (row tiles per stripe) is 1 unless the group's column partials would pass WS_CAP_FLOATS; then it is
the smallest count that fits, the same for every tensor of the group (a tensor's result depends only on
its own data while TILES is 1, i.e. up to about 1e9 parameters per group; above, also on TILES). Only
phases 1 and 3 write column partials, so only they take stripes of TILES row tiles (kernels compiled with
TILED=True); phases 2 and 4 keep one row tile per block (`tile_blocks`) and the registers of the simpler
loop (sm_90 param_step fp32: 80 registers, 127 with the row-tile loop).

Finalize programs of a factored tensor (phases 1 and 3): cdiv(B*N, FIN_COLS) column programs, each adding
the partials of its FIN_COLS columns over the stripes in [FIN_STRIPES, FIN_COLS] tiles (tl.sum over the
stripes at the end: a fixed tree, no serial chain of one load per stripe), then one program per matrix for
mean_M of the row statistic, in tiles of FIN_MEAN rows.

Scheduling: programs are launched largest first (elements per block; finalize: floats read), so that the
last wave on the GPU is made of small blocks, not of the widest stripes. Order changes no result: every
program writes its own slots.

Buffers per step (allocated by the backend, freed after it): the workspace, max(sum of column partials,
number of tile_blocks) floats (each tensor's partials padded to 4 floats), i.e. about numel/(TILES*ROWS) floats
and at most WS_CAP_FLOATS (64 MiB) at any model size, unless the column statistics c themselves (sum of
B*N floats) or the number of blocks pass that (conv weights cut into stripes; packed ones write no partials
and one float per block); shared by phases 1-3 in
turn. And `stats`, 2B+1 floats per tensor: mean_M(r)[B], mean_M(R)[B], clip divisor; one, the clip divisor,
per packed tensor (its blocks hold whole matrices and take the means from r and R themselves: with 2B a
ResNet-50's stats were 102 MiB, B = Cout*Cin matrices per conv weight).

The grad column of `meta` is the only one that changes between steps (zero_grad(set_to_none=True) may
reallocate grads): `Plan.update_grads` compares data_ptr()s on the host and re-uploads that column only when
they moved, from pinned memory, without a host sync.

16-byte loads (as csrc's vec_ok): addresses loaded from a table carry no alignment the compiler can see, so
by default every access is a scalar 4-byte (bf16: 2-byte) load. Per tensor, the host sets C_VEC when every
full-size pointer (p, g, m, v) and column statistic (c, C) is 16-byte aligned and every row or chunk starts
on a 16-byte boundary (N % VEC == 0, flat: numel % VEC == 0; VEC = 16 bytes of the param dtype). The phase
kernels then take a copy of their body in which tl.multiple_of promises that alignment, and Triton emits
ld.global.v4 (tests/test_triton_backend.py reads the PTX). Tensors that fail the test take the scalar body.

Bytes in flight (what a memory-bound kernel lives on): the phase kernels' column loops are software-
pipelined (range(...): the next tiles' loads are issued, as cp.async, before the
current tile is reduced), and the kernels that only read g (phases 1, 2) take BLOCK_N_2B columns for 2-byte
dtypes, so that a tile is 8 KB whatever the dtype.
"""
from __future__ import annotations

import array
import dataclasses
import operator

import torch
import triton
import triton.language as tl

from .came_math import _ema

# ---- Work decomposition (the same numbers as csrc/came_ops.h)
ROWS = 64            # rows per row tile; a stripe is TILES row tiles (column partials: numel/(TILES*ROWS) floats)
BLOCK_N = 32         # columns per tile inside a stripe. From the compiler's resource report (tests/
                     # triton_aot_check.py, no GPU needed): 64 gave 184-255 registers and local-memory
                     # spills in _momentum_res_kernel on sm_80; 32 gives 64-154 registers and no spills.
SLAB_N = 128         # momentum_res's column slab: a [ROWS, SLAB_N] slab per cross-warp column sum, as the
                     # extension's 64 rows x 32 lanes x 4 columns (momentum_res.cu); see _momentum_res_stripe.
BLOCK_N_2B = 64      # phases 1 and 2 (they only read g) with 2-byte grads: the same 8 KB tile as fp32. On
                     # the H100, bf16 sq_stats took as long as fp32 (TinyLlama: 2030 vs 1846 us): its time
                     # goes per [ROWS, BLOCK_N] tile (load, two reductions, a cross-warp exchange through
                     # shared memory, the partials' store), not per byte; its loads were already 16 bytes wide.
                     # 64 columns halve the tiles per byte (sm_90 registers 40 -> 64, no spills).
# Software-pipeline depth of each kernel's main loop (tl.range num_stages; 1: none), passed at launch as
# NUM_STAGES. Above 1, Triton streams the tiles through shared memory with cp.async, but on these loops it
# about doubles the registers (sm_90: momentum_res fp32 108 -> 207, sq_stats bf16 64 -> 128), halving the
# resident programs per SM: off until a GPU measurement (python -m bench.triton_sweep) shows a gain.
# sq_rows: the row loop of phase 1's in-register bodies of one row per tile (NPAD 4096, 8192): at 2 the next
# row's loads are in flight while a row is reduced. sm_90 fp32: NPAD 4096 92 registers and 33 KB of shared
# memory (80 and 4 KB at 1), NPAD 8192 194 and 66 KB (193 and 4 KB); no spills on sm_80 or sm_90.
STAGES = dict(sq_stats=1, sq_rows=1, clip_stats=1, momentum_res=1, param_step=1, finalize=1)
FLAT_CHUNK = 16384   # elements per program for tensors with ndim < 2
FLAT_BLOCK = 1024    # elements per tile inside a flat chunk
FIN_STRIPES = 64     # finalize column programs: stripes per tile (read at each launch) ...
FIN_COLS = 32        # ... and columns (128 bytes: one cache line per stripe). Narrow, so that a wide matrix
                     # makes many programs: GPT-2's wte (768 columns) gives 24, not 3. A plan keeps the value
                     # it was built with (Plan.fin_cols: its finalize programs are cut by it).
                     # bench.triton_sweep --fin tries other tiles.
FIN_MEAN = 4096      # finalize mean programs: rows per tile
FIN_WARPS = 8
NUM_WARPS = 8
WS_CAP_FLOATS = 16 * 1024 * 1024  # 64 MiB of column partials at most (see the docstring for the exceptions)

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
C_STAT = tl.constexpr(12)      # first stats float: mean_M(r)[B], mean_M(R)[B] (packed tensors: none)
C_DIV = tl.constexpr(13)       # stats index of the clip divisor
C_VEC = tl.constexpr(14)       # 1: 16-byte loads are safe for this tensor (see the module docstring)
C_TILES = tl.constexpr(15)     # row tiles of ROWS rows per stripe (factored tensors)
C_MKIND = tl.constexpr(16)     # momentum storage: MK_FP32, MK_BF16 or MK_INT8 (opt-in momentum_dtype)
C_ABSMAX = tl.constexpr(17)    # int8 momentum: exp_avg_absmax address (fp32 [cdiv(numel, QBLOCK)])
C_QOFF = tl.constexpr(18)      # int8 momentum: first slot of this tensor's blocks in the q workspaces
C_COMP = tl.constexpr(19)      # param_rounding="kahan": param_comp address (bf16, param shape)
C_PACK = tl.constexpr(20)      # > 0: a packed tensor (see PACK_ELEMS), its matrices padded to C_PACK x C_PACK
C_NPAD = tl.constexpr(21)      # > 0: phase 1 holds this stripe tensor's rows in registers, N padded to C_NPAD (see
                               # NPAD_SIZES) and also sums the clip's statistic; 0: phase 2 does (see CLIP_IN_PHASE1)
C_WS_P = tl.constexpr(22)      # first workspace float of this tensor's clip partials sum_rows (g*rsqrt(r))^2 (phase 1)
C_WS_W = tl.constexpr(23)      # first `wsd` double of this tensor's sum_s P[s, n] / c[n] (the phase-1 finalize)
C_TILES1 = tl.constexpr(24)    # phase 1's row tiles per stripe (fused plans: its own count, see TILES1)
C_WS_Q1 = tl.constexpr(25)     # first workspace float of phase 1's column partials Q (phase 3's: C_WS_COL)
NCOL = tl.constexpr(26)

# ---- Packed tensors: many small matrices (conv weights [Cout, Cin, kh, kw], as came-pytorch factors them: B =
# Cout*Cin matrices of kh x kw). A stripe never spans matrices, so one block per 3x3 matrix would make millions
# of 9-element programs (ResNet-50: 13.4M per phase). A packed block instead holds PACK_ELEMS // PM^2 whole
# matrices as one [K, PM, PM] tile (PM: M and N padded to a power of two, at most PACK_MAX), whose row and
# column sums are complete in the program: no column partials, no finalize, r, c, R, C and the means are
# written in-block. Tensors with ndim >= 3 and M, N <= PACK_MAX are packed; a group with low-precision state,
# or sharded (DTensor) tensors, is not.
# (csrc/plan.h mirrors these as kPackElems, kPackMax and pack_size: the CUDA extension cuts the same blocks.)
PACK_ELEMS = 4096
PACK_MAX = 8
PACK_SIZES = (1, 4, 8)  # the compiled PM variants (2x2 matrices take the 4x4 tile) ...
PACK_K1 = tl.constexpr(PACK_ELEMS)        # ... and their matrices per block, as kernel constants
PACK_K4 = tl.constexpr(PACK_ELEMS // 16)
PACK_K8 = tl.constexpr(PACK_ELEMS // 64)

# ---- The clip's statistic out of phase 1 (CLIP_IN_PHASE1). Phase 2 used to read g a second time only to sum
# u^2 = (g * rsqrt(r/mean_M(r)) * rsqrt(c))^2 for the RMS clip. With r, c the new EMAs the same sum is
#     sum u^2 = sum_b mean_M(r)[b] * sum_n P[b, n] / c[b, n],   P[b, n] = sum_m (g[b, m, n] * rsqrt(r[b, m]))^2,
# every term positive (nothing cancels; t = g*rsqrt(r) has t^2 <= N/(1-beta2), so nothing under- or
# overflows where u does not). Phase 1 knows r[m] once a row is summed, so a stripe whose rows fit in
# registers (N <= NPAD_MAX) is read once: a [SUB, NPAD] tile of rows, their r, then the column sums of g^2
# and t^2 added into register accumulators, stored once per stripe (column partials Q and P). The finalize
# turns P into W = P / c (fp64: P/c itself can pass fp32's range for tiny, sparse grads), the clip finalize
# adds mean_M(r) * W. Flat and packed tensors compute u right away in phase 1 and store a sum per block.
# Phase 2 then runs only for stripe tensors with N > NPAD_MAX, and for sharded groups (their clip sums are
# reduced with their own all_reduce). Traffic per fp32 param: 32 -> 28 B (bf16 params: 22 -> 20 B).
NPAD_SIZES = (64, 256, 1024, 2048, 4096, 8192)  # the compiled row widths of the in-register body
NPAD_MAX = NPAD_SIZES[-1]
REG_ELEMS = tl.constexpr(4096)  # elements of its [SUB, NPAD] tile: SUB = cdiv(REG_ELEMS, NPAD) rows (64 ... 1;
                                # twice the rows for 16-bit grads at NPAD 256 ... 2048, see sq_stats._sq_reg)
CLIP_IN_PHASE1 = True  # False: every tensor's clip sum comes from phase 2 (the layout before; for comparisons)


def npad_size(N: int) -> int:
    """C_NPAD of a stripe tensor with rows of N elements: the smallest NPAD_SIZES entry >= N, or 0."""
    return next((n for n in NPAD_SIZES if n >= N), 0)


MK_FP32 = tl.constexpr(0)
MK_BF16 = tl.constexpr(1)
MK_INT8 = tl.constexpr(2)
# The phase-3 and phase-4 kernels' LOWBIT launch constant (lowbit_of): which momentum kinds the group has.
LB_FP32 = tl.constexpr(0)   # fp32 only: the default bodies
LB_BF16 = tl.constexpr(1)   # bf16 too: the default bodies, m loaded and stored as bf16 where C_MKIND says so
LB_INT8 = tl.constexpr(2)   # int8 too: the _lp bodies (phase 4 recomputes the new m; more registers)
QBLOCK = 256                   # = came_math.QBLOCK = torch_backend.QBLOCK

WS_ALIGN = 4                   # each tensor's column partials start on a 16-byte boundary of the workspace

# ---- Sharded tensors (DTensor params: came_kernels.distributed). The finalize kernels then run in two
# halves around an all_reduce the host issues: FIN_EXPORT writes each tensor's local sums into a flat `sums`
# buffer, FIN_APPLY finishes the statistics from the summed buffer. Columns of the `dmeta` table [T, DNCOL]:
D_SUM = tl.constexpr(0)        # first `sums` float of phases 1 and 3: B*N column sums, then B row-stat sums
D_CLIP = tl.constexpr(1)       # the `sums` float of sum(u^2) (phase 2)
D_NROWS = tl.constexpr(2)      # M of the whole tensor (the column and row means divide by it)
D_NUMEL = tl.constexpr(3)      # numel of the whole tensor (the RMS of the clip divides by it)
DNCOL = tl.constexpr(4)
FIN_DIRECT, FIN_EXPORT, FIN_APPLY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # MODE of the finalize kernels

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def read_block_n(dtype) -> int:
    """BLOCK_N of the phases that only read g (sq_stats, clip_stats) for a tl dtype: an 8 KB tile."""
    return BLOCK_N if dtype.primitive_bitwidth == 32 else BLOCK_N_2B


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class Plan:
    """The device tables of one parameter set, and what they were built from (to know when to rebuild)."""
    key: tuple                 # data_ptrs and shapes of everything but the grads
    grad_ptrs: tuple
    meta: torch.Tensor
    blocks: torch.Tensor
    tile_blocks: torch.Tensor
    fin_blocks: torch.Tensor
    n_tensors: int
    n_blocks: int
    n_tile_blocks: int
    n_fin: int
    ws_floats: int
    stats_floats: int
    dtype: object              # the tl dtype of params and grads
    tiles: int = 1             # row tiles per stripe (choose_tiles), as large tensors have it in meta[:, C_TILES]
    tiles1: int = 1            # the same for phase 1 (meta[:, C_TILES1]; = tiles unless fused)
    blocks1: torch.Tensor = None  # phase 1's blocks (stripes of tiles1 row tiles; `blocks` when tiles1 == tiles) ...
    n_blocks1: int = 0
    blocks_big: torch.Tensor = None  # ... but those of the widest in-register body (NPAD_SIZES[-1]), launched on
    n_blocks_big: int = 0            # their own: its registers would otherwise cut every other block's occupancy
    vec_base: tuple = ()       # per tensor: C_VEC as far as everything but the grad allows
    vec: tuple = ()            # per tensor: the C_VEC now in `meta` (vec_base and an aligned grad)
    uploads: list = dataclasses.field(default_factory=list)  # pinned sources of the last uploads, kept alive
    numels: tuple = ()         # per tensor: its element count (a moved grad must have it too)
    lowbit: bool = False       # some tensor stores its momentum in bf16 or int8 (kernels take MKIND branches)
    q_blocks: int = 0          # int8 absmax blocks of the group: size of the q workspaces (qmax, qold)
    pack: bool = True          # whether small matrices could be packed (build_plan's `pack`)
    packed: bool = False       # some tensor is packed: the kernels are launched with their packed bodies
    fused: bool = False        # build_plan's `fused`: phase 1 sums the clip statistic where it can (CLIP_IN_PHASE1)
    npads: int = 0             # bit i: some tensor takes the in-register phase-1 body of NPAD_SIZES[i] (compiled in)
    fin_cols: int = FIN_COLS   # the finalize's columns per program (FIN_COLS when the plan was built)
    wide: bool = True          # some stripe tensor takes the phase-1 body that loops over N (C_NPAD = 0)
    clip_blocks: torch.Tensor = None  # phase-2 blocks: those of tile_blocks whose tensors have C_NPAD = 0 ...
    n_clip_blocks: int = 0            # ... (all of them when not fused)
    w_doubles: int = 0         # size of the fp64 scratch `wsd` (W = P / c of the in-register tensors)

    def update_grads(self, grads, ptrs=None) -> None:
        """Point the table at this step's grads: a host-side compare, and uploads only when grads moved.
        `ptrs`: their data_ptr()s, from a caller that has checked their dtype, contiguity and sizes: a
        tuple of ints, or the int64 bytes of the C++ checks (came_kernels._fastpath.grads)."""
        checked = ptrs is not None
        if not checked:
            ptrs = tuple(map(torch.Tensor.data_ptr, grads))
        if ptrs == self.grad_ptrs:
            return
        if not checked:
            _check_grads(grads, self.dtype)
            if tuple(map(torch.Tensor.numel, grads)) != self.numels:  # never read past a grad's end
                raise ValueError("backend='triton': a grad's size differs from its param's: "
                                 f"{[tuple(g.shape) for g in grads]} for params of {self.numels} elements")
        words = array.array("q", ptrs)  # from bytes: a copy of the buffer, no conversion per address
        if len(words) != len(self.numels):
            raise ValueError(f"backend='triton': {len(words)} grad addresses for {len(self.numels)} tensors")
        self.uploads = [self._upload(C_G, words)]
        # Allocators return 16-byte aligned addresses: then C_VEC is what the rest allows (C-level test first).
        vec = self.vec_base if not any(map((15).__and__, words)) else \
            tuple(int(ok and ptr % 16 == 0) for ok, ptr in zip(self.vec_base, words))
        if vec != self.vec:  # a new grad lost (or regained) 16-byte alignment: rare
            self.uploads.append(self._upload(C_VEC, vec))
            self.vec = vec
        self.grad_ptrs = ptrs

    def write_grads_in_graph(self, grads) -> None:
        """Point the table at this step's grads while a CUDA graph is being captured: the addresses travel
        as kernel arguments (`_write_column_kernel`), which the graph replays as captured. A copy from
        pinned host memory, as `update_grads` makes, would replay whatever that memory holds by then. The
        write is captured even when the grads did not move, so that every replay restores the graph's own
        grads whatever eager steps wrote in between; and the next eager step uploads its grads again."""
        ptrs = tuple(g.data_ptr() for g in grads)
        _check_grads(grads, self.dtype)
        if tuple(map(torch.Tensor.numel, grads)) != self.numels:
            raise ValueError("backend='triton': a grad's size differs from its param's: "
                             f"{[tuple(g.shape) for g in grads]} for params of {self.numels} elements")
        vec = tuple(int(ok and ptr % 16 == 0) for ok, ptr in zip(self.vec_base, ptrs))
        for column, values in ((C_G, ptrs), (C_VEC, vec)):
            for row0 in range(0, len(values), WRITE_BATCH):
                chunk = list(values[row0:row0 + WRITE_BATCH])
                _write_column_kernel[(1,)](self.meta, int(column), row0, len(chunk),
                                           *(chunk + [0] * (WRITE_BATCH - len(chunk))))
        self.vec = vec
        self.grad_ptrs = None  # what `meta` holds after a replay is the graph's business: upload next time

    def _upload(self, column, values) -> torch.Tensor:
        # (From an int64 array: a third of torch.tensor's host time for a tuple of a few hundred ints. The
        # tensor keeps the array alive.)
        host = torch.frombuffer(values if isinstance(values, array.array) else array.array("q", values),
                                dtype=torch.int64)
        if self.meta.is_cuda:
            host = host.pin_memory()  # a pageable host-to-device copy would synchronize the stream
        self.meta[:, int(column)].copy_(host, non_blocking=True)
        return host


def plan_key(params, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes=None, comps=None) -> tuple:
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    absmaxes = absmaxes or [None] * len(params)
    comps = comps or [None] * len(params)
    return tuple((p.data_ptr(), tuple(p.shape), p.dtype, ptr(m), m.dtype, ptr(r), ptr(c), ptr(R), ptr(C), ptr(v),
                  ptr(a), ptr(k))
                 for p, m, r, c, R, C, v, a, k in zip(params, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes,
                                                      comps))


_MKINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # MK_FP32, MK_BF16, MK_INT8


def _check_grads(grads, dtype) -> None:
    # The kernels read a grad through a pointer of the param dtype: any other dtype would be misread (and
    # read out of bounds). The optimizer routes such groups to the torch backend; this guards direct calls.
    # Runs whenever grads move (every step after zero_grad(set_to_none=True), often): C-level maps first.
    want = next((k for k, v in _TORCH_TO_TL.items() if v == dtype), None)
    if set(map(operator.attrgetter("dtype"), grads)) <= {want} and all(map(torch.Tensor.is_contiguous, grads)):
        return
    for i, g in enumerate(grads):
        if _TORCH_TO_TL.get(g.dtype) != dtype or not g.is_contiguous():
            raise ValueError(f"backend='triton': grads[{i}] must be a contiguous tensor of the param dtype "
                             f"({dtype}), got {g.dtype}{'' if g.is_contiguous() else ', non-contiguous'}")


def _check_group(params, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes, comps) -> None:
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _TORCH_TO_TL:
        raise ValueError(f"backend='triton' takes float32, bfloat16 or float16 params, got {dtype}")
    for i, (p, m, r, c, R, C, v, a, k) in enumerate(zip(params, exp_avgs, rows, cols, res_rows, res_cols, sqs,
                                                        absmaxes, comps)):
        stats = (r, c, R, C) if p.ndim >= 2 else (v,)
        if p.dtype != dtype or p.device != device or any(
                x is None or x.dtype != torch.float32 or x.device != device or not x.is_contiguous() for x in stats):
            raise ValueError(f"backend='triton': params[{i}] ({p.dtype}, {p.device}) must share the group's dtype "
                             f"{dtype} and device {device}, and its state must be contiguous float32 tensors there")
        # The momentum: fp32, or (factored tensors) bf16, or int8 codes with an fp32 absmax per QBLOCK elements.
        kind = _MKINDS.get(m.dtype) if m is not None else None
        if kind is None or m.device != device or not m.is_contiguous() or (kind != 0 and p.ndim < 2) \
                or (kind == 2) != (a is not None):
            raise ValueError(f"backend='triton': exp_avgs[{i}] must be a contiguous float32 tensor on {device} (or, "
                             f"for ndim >= 2, bfloat16, or int8 with its exp_avg_absmax), got "
                             f"{None if m is None else (m.dtype, m.device)}")
        if a is not None and (a.dtype != torch.float32 or a.device != device or not a.is_contiguous()
                              or a.numel() != _cdiv(p.numel(), QBLOCK)):
            raise ValueError(f"backend='triton': exp_avg_absmaxes[{i}] must be a contiguous float32 tensor of "
                             f"{_cdiv(p.numel(), QBLOCK)} elements on {device}")
        if k is not None and (k.dtype != torch.bfloat16 or p.dtype != torch.bfloat16 or k.device != device
                              or not k.is_contiguous() or k.shape != p.shape):
            raise ValueError(f"backend='triton': param_comps[{i}] must be a contiguous bfloat16 tensor of the bf16 "
                             f"param's shape {tuple(p.shape)} on {device}")


def _vec_ok(p, g, m, c, C, v, k=None) -> int:
    """C_VEC of one tensor (see the module docstring). A bf16 or int8 momentum needs no more: with rows of a
    multiple of VEC elements its row starts fall on multiples of VEC elements too (narrower loads)."""
    vec = 16 // p.element_size()
    run = p.shape[-1] if p.ndim >= 2 else p.numel()  # elements between 16-byte boundaries that must align
    return int(run % vec == 0 and all(x is None or x.data_ptr() % 16 == 0 for x in (p, g, m, c, C, v, k)))


def _matrices(p) -> tuple:
    """(B, M, N) of a factored tensor (B matrices [M, N] over the last two dims); None for ndim < 2."""
    if p.ndim < 2:
        return None
    M, N = p.shape[-2], p.shape[-1]
    return (p.numel() // (M * N) if M * N else 0, M, N)


def _tensor_tiles(M: int, tiles: int) -> int:
    """Row tiles per stripe of one tensor: the group's count, but never more than the matrix has."""
    return max(1, min(tiles, _cdiv(M, ROWS)))


def _colpart_floats(B: int, M: int, N: int, tiles: int) -> int:
    """Workspace floats of one tensor's column partials, padded so that the next tensor's stay aligned."""
    return _cdiv(B * _cdiv(M, ROWS * _tensor_tiles(M, tiles)) * N, WS_ALIGN) * WS_ALIGN


def choose_tiles(mats, copies: int = 1, reserve: int = 0) -> int:
    """Row tiles per stripe for a group, given the (B, M, N) of its factored tensors: 1 while `copies` sets
    of column partials (2 when phase 1 also writes the clip's P) and `reserve` floats of other scratch fit
    WS_CAP_FLOATS, else the smallest count that makes them fit (the largest useful count when none does).
    The partials shrink as the count grows, so a bisection finds it."""
    def floats(tiles):
        return copies * sum(_colpart_floats(B, M, N, tiles) for B, M, N in mats) + reserve
    lo, hi = 1, max([_cdiv(M, ROWS) for _, M, _ in mats] + [1])
    if floats(lo) <= WS_CAP_FLOATS:
        return 1
    while lo < hi:
        mid = (lo + hi) // 2
        if floats(mid) <= WS_CAP_FLOATS:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _largest_first(tensor_ids: list, locals_: list, works: list) -> torch.Tensor:
    """int64 [n, 2] table of (tensor, local block), sorted by work, largest first (stable: ties keep the
    tensor order)."""
    t = torch.cat(tensor_ids) if tensor_ids else torch.zeros(0, dtype=torch.int64)
    loc = torch.cat(locals_) if locals_ else torch.zeros(0, dtype=torch.int64)
    work = torch.cat(works) if works else torch.zeros(0, dtype=torch.int64)
    order = torch.sort(-work, stable=True).indices
    return torch.stack([t[order], loc[order]], dim=1).to(torch.int64)


def pack_size(p) -> int:
    """C_PACK of tensor p: the PM of its packed tile, or 0 when it is cut into stripes (see PACK_ELEMS)."""
    if p.ndim < 3 or p.numel() == 0 or max(p.shape[-2:]) > PACK_MAX:
        return 0
    return next(pm for pm in PACK_SIZES if pm >= max(p.shape[-2:]))


def pack_matrices(pm: int) -> int:
    """Matrices per packed block of tile size pm."""
    return PACK_ELEMS // (pm * pm)


def build_plan(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes=None, comps=None,
               pack: bool = True, fused: bool = True) -> Plan:
    """Build the tables for one (device, dtype) group of contiguous tensors (host work, once per param set;
    no data is read, so meta tensors work: tests build plans for 7B-parameter shape lists that way).
    absmaxes, comps: the opt-in int8 momentum's absmax and the Kahan compensation per tensor (or None).
    pack: whether small-matrix tensors may be packed (see PACK_ELEMS); the backend says no for groups whose
    kernels take the low-precision bodies, and for sharded tensors. fused: whether phase 1 may sum the clip's
    statistic (see CLIP_IN_PHASE1; the backend says no for sharded tensors).

    Workspace layout: [column partials Q | fused: clip partials P, the same offsets + n_q | block sums]; the
    block sums (phase 2's, and phase 1's for flat and packed tensors) follow the partials when phase 1 writes
    both at once, else they reuse the partials' floats (phase 2 runs after the finalize has read them)."""
    absmaxes = absmaxes or [None] * len(params)
    comps = comps or [None] * len(params)
    _check_group(params, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes, comps)
    _check_grads(grads, _TORCH_TO_TL[params[0].dtype])
    device = params[0].device
    fused = fused and CLIP_IN_PHASE1
    packs = [pack_size(p) if pack and fused else 0 for p in params]  # phase 2 has no packed body
    mats = [mat for mat, pm in zip(map(_matrices, params), packs) if mat is not None and not pm]
    # Fused plans also hold the fp64 W (2 floats per column of the in-register tensors) from phase 1 to 2.
    w_floats = sum(2 * B * N for B, M, N in mats if npad_size(N)) if fused else 0
    tiles = choose_tiles(mats, 1, w_floats)  # phase 3's stripes: its column partials
    tiles1 = tiles
    if fused:  # phase 1's stripes: Q and P, and the block sums after them
        reserve = w_floats + sum(B * _cdiv(M, ROWS) for B, M, N in mats) + sum(
            _cdiv(mat[0], pack_matrices(pm)) if pm else _cdiv(p.numel(), FLAT_CHUNK)
            for p, mat, pm in zip(params, map(_matrices, params), packs) if mat is None or pm)
        tiles1 = choose_tiles(mats, 2, reserve)
    n_q = sum(_colpart_floats(B, M, N, tiles1) for B, M, N in mats)  # floats of all of phase 1's Q partials
    meta, vec_base, vec = [], [], []
    clip = ([], [], [])  # phase 2's blocks: tile blocks of the tensors whose clip sum phase 1 does not make
    npads, wide, ws_w = 0, False, 0
    blk = ([], [], [])   # tensor ids, local indices, work (elements) of the blocks of phase 3 (and 1: blk1)
    blk1 = ([], [], [])
    big = ([], [], [])   # phase 1's blocks of the widest in-register body
    tblk = ([], [], [])  # the same for phases 2 and 4 (single row tiles)
    fin = ([], [], [])   # the same for the finalize programs (work: floats read)
    ws_col = ws_q1 = stat = q_blocks = 0
    ws_blk = 2 * n_q if fused else 0
    for t, (p, g, m, r, c, R, C, v) in enumerate(zip(params, grads, exp_avgs, rows, cols, res_rows, res_cols, sqs)):
        numel = p.numel()
        mat = _matrices(p)
        pm = packs[t]
        if pm:  # whole matrices per block, the same blocks in every phase, statistics complete in-block
            B, M, N = mat
            t_tiles, t_tiles1, colpart, colpart1 = 1, 1, 0, 0
            k = pack_matrices(pm)
            n_main = n_tile = _cdiv(B, k)
            local = tlocal = torch.arange(n_main)
            work = twork = torch.clamp(B - local * k, max=k) * M * N
            addr = (r.data_ptr(), c.data_ptr(), R.data_ptr(), C.data_ptr())
            npad = 0
        elif mat is not None:
            B, M, N = mat
            t_tiles = _tensor_tiles(M, tiles)
            stripe_rows = ROWS * t_tiles
            per_matrix = _cdiv(M, stripe_rows)
            n_main = B * per_matrix
            local = torch.arange(n_main)
            work = torch.clamp(M - (local % per_matrix) * stripe_rows, max=stripe_rows) * N
            n_tile = B * _cdiv(M, ROWS)
            tlocal = torch.arange(n_tile)
            twork = torch.clamp(M - (tlocal % _cdiv(M, ROWS)) * ROWS, max=ROWS) * N
            colpart = _colpart_floats(B, M, N, tiles)
            npad = npad_size(N) if fused else 0
            dest = big if npad == NPAD_SIZES[-1] else blk1
            t_tiles1 = _tensor_tiles(M, tiles1)
            colpart1 = _colpart_floats(B, M, N, tiles1)
            per_matrix1 = _cdiv(M, ROWS * t_tiles1)
            local1 = torch.arange(B * per_matrix1)
            dest[0].append(torch.full((B * per_matrix1,), t))
            dest[1].append(local1)
            dest[2].append(torch.clamp(M - (local1 % per_matrix1) * ROWS * t_tiles1, max=ROWS * t_tiles1) * N)
            n_col = _cdiv(B * N, FIN_COLS)
            fin[0].append(torch.full((n_col + B,), t))
            fin[1].append(torch.arange(n_col + B))
            fin[2].append(torch.cat([torch.full((n_col,), per_matrix * min(FIN_COLS, B * N)), torch.full((B,), M)]))
            addr = (r.data_ptr(), c.data_ptr(), R.data_ptr(), C.data_ptr())
        else:
            B = M = N = colpart = colpart1 = 0
            t_tiles = t_tiles1 = 1
            n_main = _cdiv(numel, FLAT_CHUNK)
            local = torch.arange(n_main)
            work = torch.clamp(numel - local * FLAT_CHUNK, max=FLAT_CHUNK)
            n_tile, tlocal, twork = n_main, local, work
            addr = (v.data_ptr(), 0, 0, 0)
            npad = 0
        if mat is not None and not pm:
            if npad:
                npads |= 1 << NPAD_SIZES.index(npad)
            else:
                wide = True
        if not fused or (mat is not None and not pm and not npad):
            clip[0].append(torch.full((n_tile,), t))
            clip[1].append(tlocal)
            clip[2].append(twork)
        blk[0].append(torch.full((n_main,), t))
        blk[1].append(local)
        blk[2].append(work)
        if mat is None or pm:  # phase 1 cuts only stripes differently
            for i, x in enumerate((torch.full((n_main,), t), local, work)):
                blk1[i].append(x)
        tblk[0].append(torch.full((n_tile,), t))
        tblk[1].append(tlocal)
        tblk[2].append(twork)
        vec_base.append(_vec_ok(p, None, m, c, C, v, comps[t]))
        vec.append(_vec_ok(p, g, m, c, C, v, comps[t]))
        kind = _MKINDS[m.dtype]
        n_means = 0 if pm else 2 * B  # packed blocks compute their means in-block, in every phase
        meta.append([p.data_ptr(), g.data_ptr(), m.data_ptr(), *addr, numel, M, N, ws_col, ws_blk, stat, stat + n_means,
                     vec[-1], t_tiles, kind, 0 if absmaxes[t] is None else absmaxes[t].data_ptr(), q_blocks,
                     0 if comps[t] is None else comps[t].data_ptr(), pm, npad, ws_q1 + n_q, ws_w, t_tiles1, ws_q1])
        if kind == 2:  # MK_INT8
            q_blocks += _cdiv(numel, QBLOCK)
        ws_col += colpart
        ws_q1 += colpart1
        ws_blk += n_tile  # phase 2 (or phase 1: flat, packed) writes one sum per row-tile block
        if npad:
            ws_w += B * N
        stat += n_means + 1
    blocks = _largest_first(*blk)
    tile_blocks = blocks if tiles == 1 else _largest_first(*tblk)
    blocks_dev = blocks.to(device)
    same = tiles1 == tiles and not big[0]  # phase 1's table is phase 3's
    blocks1 = blocks if same else _largest_first(*blk1)
    blocks1_dev = blocks_dev if same else blocks1.to(device)
    blocks_big = _largest_first(*big)
    fin_blocks = _largest_first(*fin)
    clip_blocks = _largest_first(*clip)
    return Plan(
        key=plan_key(params, exp_avgs, rows, cols, res_rows, res_cols, sqs, absmaxes, comps),
        grad_ptrs=tuple(g.data_ptr() for g in grads),
        meta=torch.tensor(meta, dtype=torch.int64).to(device),
        blocks=blocks_dev, fin_blocks=fin_blocks.to(device),
        tile_blocks=blocks_dev if tiles == 1 else tile_blocks.to(device),
        n_tensors=len(params), n_blocks=blocks.shape[0], n_tile_blocks=tile_blocks.shape[0], n_fin=fin_blocks.shape[0],
        ws_floats=max(ws_col, 2 * ws_q1 if fused else ws_q1, ws_blk, 1), stats_floats=max(stat, 1),
        dtype=_TORCH_TO_TL[params[0].dtype],
        tiles=tiles, tiles1=tiles1, blocks1=blocks1_dev, n_blocks1=blocks1.shape[0], blocks_big=blocks_big.to(device),
        n_blocks_big=blocks_big.shape[0], vec_base=tuple(vec_base),
        vec=tuple(vec), numels=tuple(p.numel() for p in params),
        lowbit=any(m.dtype != torch.float32 for m in exp_avgs), q_blocks=q_blocks, pack=pack, packed=any(packs),
        fin_cols=FIN_COLS,
        fused=fused, npads=npads, wide=wide, clip_blocks=clip_blocks.to(device), n_clip_blocks=clip_blocks.shape[0],
        w_doubles=max(ws_w, 1))


def lowbit_of(plan) -> int:
    """LB_FP32, LB_BF16 or LB_INT8 for this plan's launches (q_blocks counts the int8 momenta's blocks)."""
    return int(LB_FP32) if not plan.lowbit else int(LB_INT8) if plan.q_blocks else int(LB_BF16)


def finalize(plan, ws, launch, shards, phase: str) -> None:
    """Run a phase's finalize: `launch(MODE, dmeta, sums)` once, or, for sharded tensors (`shards`: the
    backend's object with the device table `dmeta` [T, DNCOL], the flat fp32 `sums` buffer and
    `reduce(phase)`, which sums that phase's slices of `sums` across processes), export, reduce, apply.
    `reduce` runs even when this process has no finalize program: every process must join each collective."""
    if shards is None:
        if plan.n_fin:
            launch(int(FIN_DIRECT), ws, ws)
        return
    if plan.n_fin:
        launch(int(FIN_EXPORT), shards.dmeta, shards.sums)
    shards.reduce(phase)
    if plan.n_fin:
        launch(int(FIN_APPLY), shards.dmeta, shards.sums)


# ---------------------------------------------------------------------------------- device-side helpers
WRITE_BATCH = 16  # table entries per _write_column_kernel launch


@triton.jit
def _put(meta, row0, i, n, column, value):
    if i < n:
        tl.store(meta + (row0 + i) * NCOL + column, value.to(tl.int64))


# Not specialized on the values (Triton would compile a variant for every pattern of ones and multiples of
# 16 among addresses and flags).
@triton.jit(do_not_specialize=["row0", "n", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10",
                               "v11", "v12", "v13", "v14", "v15"])
def _write_column_kernel(meta, column, row0, n, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14,
                         v15):
    """meta[row0 + i, column] = v_i for i < n, the values given by value (see Plan.write_grads_in_graph)."""
    _put(meta, row0, 0, n, column, v0)
    _put(meta, row0, 1, n, column, v1)
    _put(meta, row0, 2, n, column, v2)
    _put(meta, row0, 3, n, column, v3)
    _put(meta, row0, 4, n, column, v4)
    _put(meta, row0, 5, n, column, v5)
    _put(meta, row0, 6, n, column, v6)
    _put(meta, row0, 7, n, column, v7)
    _put(meta, row0, 8, n, column, v8)
    _put(meta, row0, 9, n, column, v9)
    _put(meta, row0, 10, n, column, v10)
    _put(meta, row0, 11, n, column, v11)
    _put(meta, row0, 12, n, column, v12)
    _put(meta, row0, 13, n, column, v13)
    _put(meta, row0, 14, n, column, v14)
    _put(meta, row0, 15, n, column, v15)


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
def _ws_col(meta, t, ALIGNED: tl.constexpr, COLUMN: tl.constexpr = C_WS_COL):
    """First workspace float of tensor t's column partials (meta column COLUMN: C_WS_COL for phase 3,
    C_WS_Q1 for phase 1; a multiple of WS_ALIGN, see build_plan)."""
    off = _field(meta, t, COLUMN)
    if ALIGNED:
        off = tl.multiple_of(off, 4)
    return off


@triton.jit
def _amp_found_inf(amp, AMP: tl.constexpr):
    """GradScaler found an inf/NaN this step (amp = [found_inf, 1/scale]): every kernel then returns before
    writing anything. Without a GradScaler (AMP=False) the check is compiled away."""
    if AMP:
        return tl.load(amp) != 0.0
    else:
        return False


@triton.jit
def _amp_inv_scale(amp, AMP: tl.constexpr):
    """1/scale that GradScaler's grads are multiplied by (1.0 without one: then no multiply is emitted)."""
    if AMP:
        return tl.load(amp + 1)
    else:
        return 1.0


@triton.jit
def _this_block(blocks):
    """(tensor, local block index) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    return tl.load(blocks + 2 * pid), tl.load(blocks + 2 * pid + 1)


@triton.jit
def _stripe(meta, t, local, ROWS: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, TILED: tl.constexpr):
    """_stripe_of with phases 2-4's row tiles per stripe (C_TILES)."""
    return _stripe_of(meta, t, local, ROWS, DTYPE, ALIGNED, TILED, C_TILES)


@triton.jit
def _stripe_of(meta, t, local, ROWS: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, TILED: tl.constexpr,
               TILES_COL: tl.constexpr):
    """Geometry of stripe `local` of factored tensor t: (M, N, b, row0, row_end, n_tiles), rows of the [B*M, N]
    view; the stripe's row tiles start at row0 + j*ROWS for j < n_tiles, meta[t, TILES_COL] of them at most.
    TILED (a launch constant: the plan's TILES > 1) False makes n_tiles the constant 1: the compiler then
    drops the row-tile loop, which otherwise costs registers (sm_90 param_step fp32: 80 -> 127) in the
    groups that never need it."""
    M = _field(meta, t, C_NROWS)
    N = _vec_run(meta, t, C_NCOLS, DTYPE, ALIGNED)
    if TILED:
        stripe_rows = _field(meta, t, TILES_COL) * ROWS
    else:
        stripe_rows = ROWS
    per_matrix = (M + stripe_rows - 1) // stripe_rows
    b = local // per_matrix
    row0 = b * M + (local - b * per_matrix) * stripe_rows
    row_end = tl.minimum(row0 + stripe_rows, (b + 1) * M)
    if TILED:
        n_tiles = (row_end - row0 + ROWS - 1) // ROWS
    else:
        n_tiles = 1
    return M, N, b, row0, row_end, n_tiles


@triton.jit
def _packed(meta, t, local, PM: tl.constexpr, PK: tl.constexpr):
    """Geometry of packed block `local` of tensor t (see PACK_ELEMS): matrices local*PK + [0, PK) of its B
    [M, N] matrices as a [PK, PM, PM] tile. Returns (M, N, base, k, kmask, idx, mask, rows, rmask, cols, cmask):
    base, the int64 offsets of the block's first element, row and column statistic ([3]: element, row, col);
    then int32 offsets from those: the block's matrices k [PK] (of the stats slots), elements idx [PK, PM, PM],
    the row statistic's rows [PK, PM] (kk*M + i), the column statistic's cols [PK, PM] (kk*N + j), and masks
    for what exists. (int32 tiles: int64 ones cost registers, sq_stats sm_90 80 and a spill -> 64, none.)"""
    M = _field(meta, t, C_NROWS)
    N = _field(meta, t, C_NCOLS)
    B = _field(meta, t, C_NUMEL) // (M * N)
    k0 = local * PK
    M32 = M.to(tl.int32)
    N32 = N.to(tl.int32)
    kk = tl.arange(0, PK)
    i = tl.arange(0, PM)
    kmask = kk < B - k0
    if PM == 1:  # M = N = 1 (1x1 convs): one index for all
        rows = kk[:, None] + i[None, :]
        rmask = kmask[:, None]
        cols = rows
        cmask = rmask
        idx = rows[:, :, None]
        mask = rmask[:, :, None]
    else:
        rows = kk[:, None] * M32 + i[None, :]
        rmask = kmask[:, None] & (i < M32)[None, :]
        cols = kk[:, None] * N32 + i[None, :]
        cmask = kmask[:, None] & (i < N32)[None, :]
        idx = rows[:, :, None] * N32 + i[None, None, :]
        mask = rmask[:, :, None] & (i < N32)[None, None, :]
    return M, N, k0 * M * N, k0 * M, k0 * N, k0, kk, kmask, idx, mask, rows, rmask, cols, cmask


@triton.jit
def _packed_factors(meta, t, x, rb, cb, rows, rmask, cols, cmask, M, N, beta, one_minus_beta, eps,
                    ROW: tl.constexpr, COL: tl.constexpr):
    """The factored EMAs of a packed block ([K, PM, PM] tile x, zero where masked; geometry from _packed):
    row = beta*row + (1-beta)*(mean_N(x) + eps) and col likewise with mean_M, stored in meta columns ROW and
    COL; returns (row, col, mean_M(row) [K]). Phase 1 passes g^2 (r, c), phase 3 the residual (R, C)."""
    row_ptr = _ptr(meta, t, ROW, tl.float32, False) + rb
    row = _ema(tl.load(row_ptr + rows, mask=rmask, other=0.0), beta, one_minus_beta,
               tl.sum(x, axis=2) / N.to(tl.float32) + eps)
    tl.store(row_ptr + rows, row, mask=rmask)
    col_ptr = _ptr(meta, t, COL, tl.float32, False) + cb
    col = _ema(tl.load(col_ptr + cols, mask=cmask, other=0.0), beta, one_minus_beta,
               tl.sum(x, axis=1) / M.to(tl.float32) + eps)
    tl.store(col_ptr + cols, col, mask=cmask)
    return row, col, _packed_mean(row, rmask, M)


@triton.jit
def _packed_mean(row, rmask, M):
    """mean_M of each matrix's row statistic ([K, PM] tile): packed tensors keep no means in `stats`, every
    phase takes them from the rows (the same sum in the same order as phase 1's, of the values it stored)."""
    return tl.sum(tl.where(rmask, row, 0.0), axis=1) / M.to(tl.float32)


@triton.jit
def _stripes_per_matrix(meta, t, ROWS: tl.constexpr, TILES_COL: tl.constexpr):
    stripe_rows = _field(meta, t, TILES_COL) * ROWS
    return (_field(meta, t, C_NROWS) + stripe_rows - 1) // stripe_rows


@triton.jit
def _add_column_partials(part, cols, cmask, tile, sums):
    """Column partials of row tile `tile` of a stripe: tile 0 stores its sums, later tiles add theirs to the
    stored ones (the same fixed order every run). Run _row_tile_done after each row tile, so that the
    threads that read a slot here see what other threads of the program stored there one tile before."""
    prev = tl.load(part + cols, mask=cmask & (tile > 0), other=0.0)
    tl.store(part + cols, prev + sums, mask=cmask)


@triton.jit
def _row_tile_done():
    # A barrier orders the program's global stores before its later loads (PTX bar.sync semantics); the
    # column partials of a row tile are re-read by other threads in the next one.
    tl.debug_barrier()


@triton.jit
def _stripe_sums(q_base, p_base, poff, N, per_matrix, kmask, pmask, FIN_STRIPES: tl.constexpr,
                 FIN_COLS: tl.constexpr, NUM_STAGES: tl.constexpr, CLIP: tl.constexpr):
    """Sums over the stripes of the column partials at q_base + poff (and, CLIP, of P at p_base + poff), the
    partial of stripe s of a column at +s*N: [FIN_STRIPES, FIN_COLS] tiles added elementwise, then tl.sum
    over the stripes. Contiguous poff (a single matrix) gives loads along the columns, one 128-byte line per
    stripe and warp; otherwise the compiler may lay the lanes along the stripes, one line each."""
    acc = tl.zeros([FIN_STRIPES, FIN_COLS], dtype=tl.float32)
    pacc = tl.zeros([FIN_STRIPES, FIN_COLS], dtype=tl.float32)
    for s0 in tl.range(0, per_matrix, FIN_STRIPES, num_stages=NUM_STAGES):
        s = s0 + tl.arange(0, FIN_STRIPES)
        smask = (s < per_matrix)[:, None]
        acc += tl.load(q_base + poff[None, :] + s[:, None] * N, mask=smask & kmask[None, :], other=0.0)
        if CLIP:
            pacc += tl.load(p_base + poff[None, :] + s[:, None] * N, mask=smask & pmask[None, :], other=0.0)
    return tl.sum(acc, axis=0), tl.sum(pacc, axis=0)


@triton.jit
def _finalize_columns_and_means(meta, fin_blocks, ws, stats, beta, one_minus_beta, eps, dmeta, sums, wsd,
                                COL: tl.constexpr, ROW: tl.constexpr, MEAN_SLOT: tl.constexpr,
                                ROWS: tl.constexpr, FIN_STRIPES: tl.constexpr, FIN_COLS: tl.constexpr,
                                FIN_MEAN: tl.constexpr, NUM_STAGES: tl.constexpr, MODE: tl.constexpr,
                                CLIP: tl.constexpr, TILES_COL: tl.constexpr, WS_COL: tl.constexpr):
    """Finalize of phases 1 and 3 for one program (shared by _sq_finalize_kernel and _res_finalize_kernel).

    column programs: col[b, n] = beta*col + (1-beta)*(sum_s partial[s, n] / M + eps) for FIN_COLS columns
                     of the flattened [B, N] statistic: [FIN_STRIPES, FIN_COLS] tiles of partials added
                     elementwise (tile after tile), then tl.sum over the stripes: a fixed order, so the
                     result is the same every run, and no serial chain of one dependent load per stripe;
    mean programs:   stats[C_STAT + MEAN_SLOT*B + b] = mean_M(row[b, :]) (row already updated in-block),
                     FIN_MEAN rows per tile, the same way.
    MODE (sharded tensors, see D_SUM): FIN_EXPORT stores the two sums (column sum, sum_M(row)) into `sums`
    and changes nothing else; FIN_APPLY takes them from `sums` (summed over processes by then) and divides by
    the whole tensor's M (dmeta). FIN_DIRECT does both at once, with this tensor's own M.
    TILES_COL, WS_COL: the meta columns of the phase's stripes (C_TILES1, C_WS_Q1 or C_TILES, C_WS_COL).
    CLIP (phase 1 of a fused plan, FIN_DIRECT only): column programs of tensors with C_NPAD > 0 also add the
    clip partials P the same way and store wsd[C_WS_W + k] = sum_s P[s, k] / col[k] in fp64 (CLIP_IN_PHASE1).
    """
    t, local = _this_block(fin_blocks)
    M = _field(meta, t, C_NROWS)
    N = _field(meta, t, C_NCOLS)
    B = _field(meta, t, C_NUMEL) // (M * N)
    col_blocks = (B * N + FIN_COLS - 1) // FIN_COLS
    if MODE == FIN_DIRECT:
        M_all = M.to(tl.float32)
    else:
        out = sums + tl.load(dmeta + t * DNCOL + D_SUM)
        M_all = tl.load(dmeta + t * DNCOL + D_NROWS).to(tl.float32)
    # (Branch-local names differ: compiled Triton wants a name bound in both branches to have one type.)
    if local < col_blocks:
        k = local * FIN_COLS + tl.arange(0, FIN_COLS)  # index into the [B, N] column statistic
        kmask = k < B * N
        if MODE == FIN_APPLY:
            col_sum = tl.load(out + k, mask=kmask, other=0.0)
        else:
            per_matrix = _stripes_per_matrix(meta, t, ROWS, TILES_COL)
            q_base = ws + _field(meta, t, WS_COL)
            p_base = q_base
            pmask = kmask
            if CLIP:
                p_base = ws + _field(meta, t, C_WS_P)
                pmask = kmask & (_field(meta, t, C_NPAD) > 0)
            if B == 1:  # one matrix (the usual case): offsets the compiler sees contiguous, so coalesced loads
                col_sum, p_sum = _stripe_sums(q_base, p_base, k, N, per_matrix, kmask, pmask, FIN_STRIPES,
                                              FIN_COLS, NUM_STAGES, CLIP)
            else:
                kb = k // N
                col_sum, p_sum = _stripe_sums(q_base, p_base, kb * per_matrix * N + (k - kb * N), N, per_matrix,
                                              kmask, pmask, FIN_STRIPES, FIN_COLS, NUM_STAGES, CLIP)
        if MODE == FIN_EXPORT:
            tl.store(out + k, col_sum, mask=kmask)
        else:
            col = _ptr(meta, t, COL, tl.float32, False)
            c = tl.load(col + k, mask=kmask, other=0.0)
            c = beta * c + one_minus_beta * (col_sum / M_all + eps)
            tl.store(col + k, c, mask=kmask)
            if CLIP:
                w = p_sum.to(tl.float64) / c.to(tl.float64)
                tl.store(wsd + _field(meta, t, C_WS_W) + k, w, mask=pmask)
    else:
        mb = local - col_blocks
        if MODE == FIN_APPLY:
            row_total = tl.load(out + B * N + mb)
        else:
            row = _ptr(meta, t, ROW, tl.float32, False) + mb * M
            row_acc = tl.zeros([FIN_MEAN], dtype=tl.float32)
            for i0 in tl.range(0, M, FIN_MEAN, num_stages=NUM_STAGES):
                offs = i0 + tl.arange(0, FIN_MEAN)
                row_acc += tl.load(row + offs, mask=offs < M, other=0.0)
            row_total = tl.sum(row_acc, axis=0)
        if MODE == FIN_EXPORT:
            tl.store(out + B * N + mb, row_total)
        else:
            tl.store(stats + _field(meta, t, C_STAT) + MEAN_SLOT * B + mb, row_total / M_all)
