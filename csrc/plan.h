// plan.h: how one launch's blocks cover a (device, dtype) group of tensors, written once for host and device.
//
// Every phase kernel is ONE launch over the whole group, whatever its tensor count (phase 1: two kernels, one
// launch each, over disjoint sets of the group's tensors; packed tensors: one more launch per phase; see
// below): the per-tensor table (TensorDesc below) lives in device memory and each block finds its tensor by
// a search over the table's prefix sums of blocks. Blocks are laid out largest-first: tensors are ordered by
// the bytes one of their blocks moves, largest first (stable, so the order is fixed), so the last wave of a
// launch holds the smallest blocks instead of, say, GPT-2's wte stripes; packed tensors come after all the
// others (again largest first), so that their blocks end every numbering they are in.
//
// Work units ("blocks"):
//   phase kernels (phases 1, 3, 4): factored tensor [B, M, N]: block s = stripe of tiles*kRows whole rows of
//     matrix b = s / ceil(M/(tiles*kRows)), run as `tiles` row tiles of kRows rows (phase 1's register path
//     runs the whole stripe in waves of rows); packed tensor (below): block s = the whole matrices
//     [s*K, (s+1)*K) (K = kPackElems / PM^2), i.e. the contiguous elements [s*K*M*N, (s+1)*K*M*N); flat
//     tensor (ndim < 2): block k = elements [k*kFlatChunk, (k+1)*kFlatChunk).
//   packed blocks run in kernels of their own (one launch per phase: the last packed_blocks blocks of the
//     phase-kernel numbering, past an offset), so the stripe kernels, and their registers, stay as they are;
//     the other kernels' grids stop before them.
//   phase 1 (sq_stats) splits the other phase-kernel blocks over two launches, each with its own prefix sums
//     in slot order: the register path (factored tensors with N <= clip_cols, not packed,
//     sq_stats_reg_kernel) and the rest (flat tensors and factored ones with N > clip_cols, sq_stats_kernel;
//     the packed tensors' blocks end this numbering, outside its grid); a tensor's block `local` is the same
//     stripe, matrices or chunk in every numbering.
//   phase 2 (clip_stats): the phase-kernel blocks of the factored tensors with N > clip_cols only (phase 1
//     gathers the clip statistics of every other tensor, see below); no blocks, no launch, without them.
//   column finalize (phases 1 and 3), factored tensors cut into stripes only: first the column blocks, each
//     one tile of fin_cols(N) consecutive entries of the [B, N] column statistic, summed over all stripes of
//     their matrix; then the mean blocks, mean_M of the row statistic: one block per matrix when
//     M >= kBlockMeanRows, else one warp per matrix (kWarps matrices per block).
//
// tiles (row tiles per stripe) is 1 unless the group's workspace would pass kWsCapFloats (64 MiB); then it is
// the smallest count that fits, the same for the whole group (tensor t: min(tiles, ceil(M/kRows))), as
// triton_kernels/multi_tensor.py's choose_tiles. Only the column partials shrink with it: the fp64 W and
// the c, C statistics are B*N per tensor whatever the stripes, so the cap holds for any model whose sum of
// B*N over matrices is below about 4M (16 B each at one stripe per matrix; LLaMA-7B: 0.8M).
//
// Packed tensors (mirror of triton_kernels/multi_tensor.py's PACK_ELEMS, PACK_MAX, PACK_SIZES): a stripe never
// spans matrices, so a conv weight [Cout, Cin, kh, kw], factored as B = Cout*Cin matrices of kh x kw, would
// make B blocks of kh*kw elements (ResNet-50: 13.4M per phase). Tensors with ndim >= 3 whose matrices have
// M, N <= kPackMax are packed instead: PM (pack_size) is the smallest of the pack sizes 1, 4, 8 that covers
// max(M, N), and a block holds K = kPackElems / PM^2 whole matrices (the last block of a tensor fewer): the
// same blocks as Triton's [K, PM, PM] tiles, though the kernels keep the matrices' M x N elements unpadded
// (the block's elements are one contiguous run of at most kPackElems). Their row and column statistics and
// the means are complete in the block (the means are not stored: each phase sums them from r or R), so a
// packed tensor has no column partials, no finalize blocks, no register-path or phase-2 blocks; phase 1 also
// computes u and stores the block's sum of u^2 in one clip slot per block (as flat tensors do). Groups with
// low-precision state (came_step_lowbit) are not packed.
//
// Workspace (floats; phases 1-3 in turn, disjoint regions where two phases' data live at once):
//   column partials, per factored tensor cut into stripes, from ws_col: phase 1's Q[s, n] = sum g^2 over
//     stripe s, then (clip in phase 1) P[s, n] = sum (g*rsqrt(r_i))^2, each colpart_floats_of floats; phase 3
//     reuses the first array.
//   clip inputs, per tensor from ws_clip (after all partials): W[b, n] = P[b, n] / c[b, n] as fp64 (tensors
//     of phase 1's register path: clip_from_w), or one float of sum(u^2) per phase-kernel block (flat and
//     packed tensors, written by phase 1; factored tensors with N > clip_cols, written by phase 2).
//
// Pure C++ (no torch, no CUDA headers): tests/test_cuda_plan_host.py compiles it with g++ and checks the
// layout and the search without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#ifndef CAME_HD
#if defined(__CUDACC__)
#define CAME_HD __host__ __device__ __forceinline__
#else
#define CAME_HD inline
#endif
#endif

namespace came {

// ---- Work decomposition (mirrors triton_kernels/): constants shared by host and device code.
constexpr int kThreads = 256;                  // threads per block: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 64;                      // rows per row tile; a stripe is `tiles` row tiles
constexpr int kRowsPerWarp = kRows / kWarps;   // each warp walks 8 rows of a row tile
constexpr int64_t kFlatChunk = 16384;          // elements per block for tensors with ndim < 2
constexpr int kWsAlign = 4;                    // each tensor's column partials start on a 16-byte boundary
constexpr int64_t kBlockMeanRows = 2048;       // mean_M of a matrix with at least this many rows: one block
constexpr int64_t kClipCols = 8192;            // widest N whose clip statistics phase 1 keeps in registers
                                               // (256 threads x 32 columns x 2 accumulators)
constexpr int64_t kWsCapFloats = 16 * 1024 * 1024;  // 64 MiB of workspace at most (see tiles above)
constexpr int64_t kPackElems = 4096;           // PACK_ELEMS: a packed block holds kPackElems / PM^2 matrices
constexpr int64_t kPackMax = 8;                // PACK_MAX: matrices with M, N <= kPackMax are packed (ndim >= 3)
                                               // PACK_SIZES (1, 4, 8): pack_size below
constexpr int kPackRows = kPackElems / 4;      // rows (and columns) of a packed block with PM >= 4, at most

CAME_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The shape of one non-empty tensor as the kernels see it: factored = [B, M, N] (M > 0), flat: M = N = B = 0.
// pm: a packed tensor's tile size PM (pack_size: 1, 4 or 8), else 0 (stripes, or flat).
struct Shape {
  int64_t numel = 0, B = 0, M = 0, N = 0;
  int64_t pm = 0;
};

// PM of a tensor with ndim dims whose last two are M, N: the smallest pack size (1, 4, 8) that covers
// max(M, N) when ndim >= 3 and M, N <= kPackMax, else 0 (cut into stripes). triton_kernels' pack_size.
CAME_HD int64_t pack_size(int64_t ndim, int64_t M, int64_t N) {
  const int64_t most = M > N ? M : N;
  if (ndim < 3 || M <= 0 || N <= 0 || most > kPackMax) return 0;
  return most <= 1 ? 1 : (most <= 4 ? 4 : 8);
}
// Matrices per packed block of tile size pm (K).
CAME_HD int64_t pack_matrices(int64_t pm) { return kPackElems / (pm * pm); }

// Row tiles per stripe of one tensor: the group's count, but never more than its matrices have.
CAME_HD int64_t tiles_of(const Shape& s, int64_t tiles) {
  if (s.M == 0 || s.pm > 0) return 1;
  const int64_t most = ceil_div(s.M, kRows);
  return tiles < most ? tiles : most;
}
CAME_HD int64_t stripes_per_matrix(int64_t M, int64_t tiles) { return ceil_div(M, kRows * tiles); }
// `tiles` below is the tensor's own count (tiles_of).
CAME_HD int64_t main_blocks_of(const Shape& s, int64_t tiles) {
  if (s.pm > 0) return ceil_div(s.B, pack_matrices(s.pm));
  return s.M > 0 ? s.B * stripes_per_matrix(s.M, tiles) : ceil_div(s.numel, kFlatChunk);
}
// Whether phase 1 gathers this tensor's clip statistics (flat and packed tensors always; factored ones with
// N <= clip_cols: their stripe's columns fit the registers of one block). The others take phase 2.
CAME_HD bool clip_in_phase1(const Shape& s, int64_t clip_cols) { return s.M == 0 || s.pm > 0 || s.N <= clip_cols; }
// Whether a tensor's clip inputs are phase 1's fp64 W (factored tensors cut into stripes with N <= clip_cols,
// which take phase 1's register path), rather than one sum of u^2 per block.
CAME_HD bool clip_from_w(const Shape& s, int64_t clip_cols) { return s.M > 0 && s.pm == 0 && s.N <= clip_cols; }
// One array of column partials (Q, P, or phase 3's): one float per (stripe, column), padded to kWsAlign;
// none for flat and packed tensors.
CAME_HD int64_t colpart_floats_of(const Shape& s, int64_t tiles) {
  return s.M > 0 && s.pm == 0 ? ceil_div(main_blocks_of(s, tiles) * s.N, kWsAlign) * kWsAlign : 0;
}
// Arrays of column partials a tensor needs: Q and P (clip in phase 1), Q (clip in phase 2), none (flat, packed).
CAME_HD int64_t colpart_arrays_of(const Shape& s, int64_t clip_cols) {
  return s.M == 0 || s.pm > 0 ? 0 : (clip_in_phase1(s, clip_cols) ? 2 : 1);
}
// Clip inputs (floats): fp64 W[B*N] (clip_from_w) or one float per block (flat, packed, or phase 2), padded
// to an even count so that every W starts 8-byte aligned.
CAME_HD int64_t clip_floats_of(const Shape& s, int64_t tiles, int64_t clip_cols) {
  if (clip_from_w(s, clip_cols)) return 2 * s.B * s.N;
  return ceil_div(main_blocks_of(s, tiles), 2) * 2;
}
// Phase-1 blocks of the register path (clip_from_w: factored, not packed, N <= clip_cols): its phase-kernel
// blocks, else none.
CAME_HD int64_t reg_blocks_of(const Shape& s, int64_t tiles, int64_t clip_cols) {
  return clip_from_w(s, clip_cols) ? main_blocks_of(s, tiles) : 0;
}
// Phase-2 blocks: the phase-kernel blocks of the factored tensors phase 1 does not cover.
CAME_HD int64_t clip_blocks_of(const Shape& s, int64_t tiles, int64_t clip_cols) {
  return clip_in_phase1(s, clip_cols) ? 0 : main_blocks_of(s, tiles);
}
// Column finalize: a tile is 32 lanes x fin_vec(N) columns; 16-byte loads of the partials need N % 4 == 0
// (then a lane's 4 columns lie in one matrix and every partial row starts 16-byte aligned).
CAME_HD int fin_vec(int64_t N) { return N % 4 == 0 ? 4 : 1; }
// Packed tensors have none: their statistics are complete in their phase-kernel blocks.
CAME_HD int64_t fin_col_blocks_of(const Shape& s) {
  return s.M > 0 && s.pm == 0 ? ceil_div(s.B * s.N, 32 * fin_vec(s.N)) : 0;
}
CAME_HD bool block_per_mean(int64_t M) { return M >= kBlockMeanRows; }
CAME_HD int64_t fin_mean_blocks_of(const Shape& s) {
  if (s.M == 0 || s.pm > 0) return 0;
  return block_per_mean(s.M) ? s.B : ceil_div(s.B, kWarps);
}
CAME_HD int64_t fin_blocks_of(const Shape& s) { return fin_col_blocks_of(s) + fin_mean_blocks_of(s); }
// Elements one phase-kernel block of this tensor moves (its first block): the largest-first sort key.
CAME_HD int64_t block_elems_of(const Shape& s, int64_t tiles) {
  if (s.pm > 0) {
    const int64_t k = pack_matrices(s.pm);
    return (s.B < k ? s.B : k) * s.M * s.N;
  }
  if (s.M > 0) return (s.M < kRows * tiles ? s.M : kRows * tiles) * s.N;
  return s.numel < kFlatChunk ? s.numel : kFlatChunk;
}

// Geometry of stripe `local` of a factored tensor with `tiles` row tiles per stripe. Rows are global over the
// batch: row i of matrix b is b*M + i, which is also its index in r and R.
struct Stripe {
  int64_t M, N, b;
  int64_t row0, row_end;  // rows [row0, row_end) of the flattened [B*M, N] view
};
CAME_HD Stripe stripe_of(int64_t M, int64_t N, int64_t local, int64_t tiles) {
  Stripe s;
  s.M = M;
  s.N = N;
  const int64_t rows = kRows * tiles;
  const int64_t per_matrix = stripes_per_matrix(M, tiles);
  s.b = local / per_matrix;
  s.row0 = s.b * M + (local - s.b * per_matrix) * rows;
  const int64_t matrix_end = (s.b + 1) * M;
  s.row_end = s.row0 + rows < matrix_end ? s.row0 + rows : matrix_end;
  return s;
}
// Row tile t of a stripe: its rows [row0 + t*kRows, +kRows) that lie in the stripe (none past its end).
CAME_HD Stripe row_tile(const Stripe& s, int64_t t) {
  Stripe x = s;
  x.row0 = s.row0 + t * kRows;
  x.row_end = x.row0 + kRows < s.row_end ? x.row0 + kRows : s.row_end;
  return x;
}
// Row tiles of a stripe (its last one may be short).
CAME_HD int64_t row_tiles_of(const Stripe& s) { return ceil_div(s.row_end - s.row0, kRows); }
// Block `local` of a packed tensor of B matrices [M, N] with tile size pm: its matrices [k0, k0 + nk) (nk <= K),
// i.e. the elements [e0, e0 + n) of the tensor, the rows [k0*M, k0*M + nk*M) of its row statistics (r, R)
// and the columns [k0*N, k0*N + nk*N) of its column statistics (c, C). e0 is a multiple of K*M*N, and K is a
// multiple of 64, so a block's elements start 16-byte aligned wherever the tensor does.
struct PackBlock {
  int64_t k0, e0;  // first matrix, first element
  int nk, n;       // matrices, elements (n <= kPackElems)
};
CAME_HD PackBlock pack_block_of(int64_t B, int64_t M, int64_t N, int64_t pm, int64_t local) {
  const int64_t k = pack_matrices(pm);
  PackBlock p;
  p.k0 = local * k;
  p.nk = static_cast<int>(B - p.k0 < k ? B - p.k0 : k);
  p.e0 = p.k0 * M * N;
  p.n = static_cast<int>(p.nk * M * N);
  return p;
}

// Inside a packed block (its nk matrices [M, N] as elements [0, n), n = nk*M*N): row q (< nk*M) holds the
// elements q*N + j (j < N); column q (< nk*N), of matrix kk = q / N, holds kk*M*N + i*N + (q - kk*N) (i < M);
// element q*N + j lies in column (q / M)*N + j.
CAME_HD int packed_row_elem(int N, int q, int j) { return q * N + j; }
CAME_HD int packed_col_elem(int M, int N, int q, int i) {
  const int kk = q / N;
  return kk * M * N + i * N + (q - kk * N);
}
CAME_HD int packed_col_of(int M, int N, int q, int j) { return (q / M) * N + j; }
// Element i of a packed block as its row q and column col() (those above), for a run of consecutive elements:
// two divisions for the first, then next() walks on (j, the column in the matrix; rq, the row in the matrix).
struct PackedAt {
  int q, rq, col0, j;
  CAME_HD PackedAt(int M, int N, int i) {
    q = i / N;
    const int kk = q / M;
    rq = q - kk * M;
    col0 = kk * N;
    j = i - q * N;
  }
  CAME_HD int col() const { return col0 + j; }
  CAME_HD void next(int M, int N) {
    if (++j == N) {
      j = 0;
      ++q;
      if (++rq == M) {
        rq = 0;
        col0 += N;
      }
    }
  }
};

// Phase 1's register path (N <= kClipCols): thread x of a block owns the column groups x + q*kThreads, q < kG,
// of vec consecutive columns each; kG is the smallest power of two that covers N (<= 32 columns per thread).
CAME_HD int reg_groups(int64_t N, int vec) {
  int g = 1;
  while (static_cast<int64_t>(g) * kThreads * vec < N) g *= 2;
  return g;
}

CAME_HD int count_leading_zeros(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __clz(static_cast<int>(x));
#else
  return x == 0 ? 32 : __builtin_clz(x);
#endif
}

// The slot owning block b of a launch: the last slot k < n with start[k] <= b (start is a prefix sum of
// blocks over the n slots; a slot with no blocks shares its start with its successor and is skipped).
CAME_HD int owner_of(const int32_t* start, int n, int32_t b) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The same search, 32 slots per round (two rounds up to 1024 slots instead of ~log2(n) dependent loads): in
// each round lane l probes the first slot of the l-th of 32 equal segments of the remaining range, and the
// last segment whose first start is <= b holds the owner (start is nondecreasing, start[lo] <= b always).
// `ballot(pred)` returns the 32-lane mask of pred(lane): __ballot_sync on the device, a loop over the lanes
// in the host test, so both run this very code.
template <typename Ballot>
CAME_HD int owner_of_32(const int32_t* start, int n, int32_t b, Ballot ballot) {
  int lo = 0, len = n;
  while (len > 1) {
    const int step = (len + 31) / 32;
    const uint32_t mask = ballot([&](int lane) {
      const int k = lo + lane * step;
      return k < lo + len && start[k] <= b;
    });
    const int last = 31 - count_leading_zeros(mask);  // lane 0 is always set: start[lo] <= b
    const int end = lo + len;
    lo += last * step;
    len = (end - lo) < step ? (end - lo) : step;
  }
  return lo;
}

// Workspace floats of a group at `tiles` row tiles per stripe (the regions of the header comment).
inline int64_t ws_floats_of(const std::vector<Shape>& shapes, int64_t tiles, int64_t clip_cols) {
  int64_t col = 0, clip = 0;
  for (const Shape& s : shapes) {
    const int64_t t = tiles_of(s, tiles);
    col += colpart_arrays_of(s, clip_cols) * colpart_floats_of(s, t);
    clip += clip_floats_of(s, t, clip_cols);
  }
  return col + clip;
}

// Row tiles per stripe for a group: 1 while the workspace fits cap_floats, else the smallest count that makes
// it fit (the largest useful count when none does: W and the block slots do not shrink below one stripe per
// matrix). The workspace shrinks as the count grows, so a bisection finds it.
inline int64_t choose_tiles(const std::vector<Shape>& shapes, int64_t clip_cols, int64_t cap_floats) {
  int64_t lo = 1, hi = 1;
  for (const Shape& s : shapes) hi = std::max(hi, s.M > 0 ? ceil_div(s.M, kRows) : 1);
  if (ws_floats_of(shapes, lo, clip_cols) <= cap_floats) return 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ws_floats_of(shapes, mid, clip_cols) <= cap_floats) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// The host-side layout of a group: row tiles, slot order, workspace offsets, block prefix sums. Built from
// the shapes alone; ops.cpp fills the device table from it.
struct Layout {
  int64_t tiles = 1;                // row tiles per stripe of the group (choose_tiles)
  int64_t clip_cols = kClipCols;    // factored tensors with N above this take phase 2
  std::vector<int32_t> order;       // slot -> index of the tensor in the group (largest blocks first)
  std::vector<int64_t> tiles_t;     // per slot: its row tiles per stripe (tiles_of)
  std::vector<int64_t> pm;          // per slot: PM of a packed tensor (Shape::pm), else 0
  std::vector<int64_t> ws_col;      // per slot: first workspace float of its column partials (phases 1, 3)
  std::vector<int64_t> ws_clip;     // per slot: first workspace float of its clip inputs (W or block sums)
  std::vector<int64_t> main_start;  // per slot + 1: prefix sum of phase-kernel blocks
  std::vector<int64_t> reg_start;   // per slot + 1: prefix sum of phase-1 register-path blocks (reg_blocks_of)
  std::vector<int64_t> rest_start;  // per slot + 1: prefix sum of the other phase-1 blocks (main - reg)
  std::vector<int64_t> fin_start;   // per slot + 1: prefix sum of column-finalize blocks
  std::vector<int64_t> clip_start;  // per slot + 1: prefix sum of phase-2 blocks
  int64_t ws_floats = 0;            // all regions (>= 1)
  bool packed = false;              // some slot is packed
  int64_t packed_blocks = 0;        // phase-kernel blocks of the packed slots, which come last: the last
                                    // packed_blocks of main_start's numbering (and of rest_start's)
};

// clip_cols <= kClipCols (the kernels' register bound); lower values are for tests, which then run phase 2 on
// small shapes (never for packed tensors: phase 1 sums their u^2). cap_floats: the workspace cap (kWsCapFloats;
// lower for tests of tall stripes). Which tensors are packed is in the shapes (Shape::pm).
inline Layout make_layout(const std::vector<Shape>& shapes, int64_t clip_cols = kClipCols,
                          int64_t cap_floats = kWsCapFloats) {
  Layout L;
  const size_t n = shapes.size();
  L.clip_cols = std::min(clip_cols, kClipCols);
  L.tiles = choose_tiles(shapes, L.clip_cols, cap_floats);
  L.order.resize(n);
  std::iota(L.order.begin(), L.order.end(), 0);
  std::stable_sort(L.order.begin(), L.order.end(), [&](int32_t a, int32_t b) {
    if ((shapes[a].pm > 0) != (shapes[b].pm > 0)) return shapes[b].pm > 0;  // packed slots last
    return block_elems_of(shapes[a], tiles_of(shapes[a], L.tiles)) >
           block_elems_of(shapes[b], tiles_of(shapes[b], L.tiles));
  });
  L.main_start.assign(n + 1, 0);
  L.reg_start.assign(n + 1, 0);
  L.rest_start.assign(n + 1, 0);
  L.fin_start.assign(n + 1, 0);
  L.clip_start.assign(n + 1, 0);
  int64_t col = 0;
  for (size_t k = 0; k < n; ++k) {
    const Shape& s = shapes[L.order[k]];
    const int64_t t = tiles_of(s, L.tiles);
    L.tiles_t.push_back(t);
    L.pm.push_back(s.pm);
    L.packed = L.packed || s.pm > 0;
    if (s.pm > 0) L.packed_blocks += main_blocks_of(s, t);
    L.ws_col.push_back(col);
    col += colpart_arrays_of(s, L.clip_cols) * colpart_floats_of(s, t);
    L.main_start[k + 1] = L.main_start[k] + main_blocks_of(s, t);
    const int64_t reg = reg_blocks_of(s, t, L.clip_cols);
    L.reg_start[k + 1] = L.reg_start[k] + reg;
    L.rest_start[k + 1] = L.rest_start[k] + main_blocks_of(s, t) - reg;
    L.fin_start[k + 1] = L.fin_start[k] + fin_blocks_of(s);
    L.clip_start[k + 1] = L.clip_start[k] + clip_blocks_of(s, t, L.clip_cols);
  }
  int64_t clip = col;  // a multiple of kWsAlign, and every clip region is of even length: W is 8-byte aligned
  for (size_t k = 0; k < n; ++k) {
    const Shape& s = shapes[L.order[k]];
    L.ws_clip.push_back(clip);
    clip += clip_floats_of(s, L.tiles_t[k], L.clip_cols);
  }
  L.ws_floats = std::max<int64_t>(clip, 1);
  return L;
}

// ---- The device table: one 128-byte entry per slot, then main_start, fin_start, clip_start, reg_start and
// rest_start as int32 [n + 1] each (kStartArrays).
struct alignas(16) TensorDesc {
  void* p;            // param (storage dtype)
  const void* g;      // grad (storage dtype)
  float* m;           // exp_avg
  float* row;         // exp_avg_sq_row r [B*M] (factored) or exp_avg_sq v [numel] (flat)
  float* col;         // exp_avg_sq_col c [B*N]
  float* res_row;     // exp_avg_res_row R [B*M]
  float* res_col;     // exp_avg_res_col C [B*N]
  float* stat;        // its slice of stats: mean_M(r)[B], mean_M(R)[B], clip divisor (packed: the divisor)
  int64_t numel, B, M, N;  // M = N = B = 0 for flat tensors
  int64_t ws_col, ws_clip;  // workspace offsets (Layout)
  int32_t vec_ok;          // 16-byte loads allowed: every pointer aligned, N % VEC == 0 (packed: pointers only)
  int32_t tiles;           // row tiles per stripe (Layout::tiles_t; 1 for flat tensors); packed tensors: -PM
                           // (desc_tiles; no stripes there, and the entry has no spare room for a field)
  int64_t index;           // its position in the op's lists: its row [s_u, s_m] of DeviceTable::scales
};
static_assert(sizeof(TensorDesc) == 128, "TensorDesc is one 128-byte line");

// TensorDesc::tiles of a slot, and a packed tensor's PM from it (0: stripes or flat).
CAME_HD int32_t desc_tiles(int64_t tiles, int64_t pm) { return static_cast<int32_t>(pm > 0 ? -pm : tiles); }
CAME_HD int pack_of(const TensorDesc& d) { return d.tiles < 0 ? -d.tiles : 0; }
// The clip divisor's index in a slot's stats slice: after the 2B means, or the only float of a packed tensor.
CAME_HD int64_t div_slot(const TensorDesc& d) { return pack_of(d) ? 0 : 2 * d.B; }

// The opt-in low-precision state of one slot (momentum_dtype, param_rounding): a second array of the table,
// uploaded only for groups that use it (DeviceTable::lp is nullptr otherwise), so the default path's
// entries, and kernels, stay as they are.
struct alignas(16) LowbitDesc {
  float* absmax;        // int8 momentum: exp_avg_absmax [ceil(numel / 256)] (TensorDesc::m holds the codes)
  int32_t* qmax;        // int8 momentum: this tensor's slots of the new block absmax (|m| bits, atomic max)
  float* qold;          // int8 momentum: this tensor's slots of the old block absmax (copied by phase 3)
  void* comp;           // param_rounding="kahan": param_comp (bf16, the param's shape), else nullptr
  const int64_t* rng;   // its row (Philox key, step) of the rng table
  int32_t mkind;        // momentum storage: kMomFp32, kMomBf16 (TensorDesc::m holds bf16) or kMomInt8
  int32_t rounding;     // bf16 params: kRoundNearest, kRoundStochastic or kRoundKahan
  int64_t pad_[2];
};
static_assert(sizeof(LowbitDesc) == 64, "LowbitDesc is half a 128-byte line");

// What a kernel gets by value: the table in device memory.
struct DeviceTable {
  const TensorDesc* t;
  const int32_t* main_start;
  const int32_t* fin_start;
  const int32_t* clip_start;  // phase-2 blocks
  const int32_t* reg_start;   // phase-1 blocks of the register path (sq_stats_reg_kernel)
  const int32_t* rest_start;  // the other phase-1 blocks (sq_stats_kernel)
  int32_t n;
  int32_t clip_cols;     // Layout::clip_cols: factored tensors with N <= clip_cols have their clip in phase 1
  const LowbitDesc* lp;  // [n], in slot order, or nullptr (the default state)
  // Per call, not uploaded (the table itself stays valid from one step to the next, see ops.cpp's Plan):
  const float* scales;   // bias correction: bias_scales [n_lists, 2], row TensorDesc::index; nullptr without
};

// Bytes of the uploaded table for n slots: the entries, then the prefix sums.
constexpr int64_t kStartArrays = 5;
inline int64_t table_bytes(int64_t n) {
  return n * static_cast<int64_t>(sizeof(TensorDesc)) + kStartArrays * (n + 1) * 4;
}
// ... with the low-precision entries after them, 16-byte aligned.
inline int64_t lowbit_offset(int64_t n) { return ceil_div(table_bytes(n), 16) * 16; }
inline int64_t table_bytes_lowbit(int64_t n) {
  return lowbit_offset(n) + n * static_cast<int64_t>(sizeof(LowbitDesc));
}

}  // namespace came
