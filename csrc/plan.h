// plan.h: how one launch's blocks cover a (device, dtype) group of tensors, written once for host and device.
//
// Every phase kernel is ONE launch over the whole group, whatever its tensor count: the per-tensor table
// (TensorDesc below) lives in device memory and each block finds its tensor by a binary search over the
// table's prefix sums of blocks. Blocks are laid out largest-first: tensors are ordered by the bytes one of
// their blocks moves, largest first (stable, so the order is fixed), so the last wave of a launch holds the
// smallest blocks instead of, say, GPT-2's wte stripes.
//
// Work units ("blocks"):
//   phase kernels (all four): factored tensor [B, M, N]: block s = stripe of kRows whole rows of matrix
//     b = s / ceil(M/kRows); flat tensor (ndim < 2): block k = elements [k*kFlatChunk, (k+1)*kFlatChunk).
//   column finalize (phases 1 and 3), factored tensors only: first the column blocks, each one tile of
//     fin_cols(N) consecutive entries of the [B, N] column statistic, summed over all stripes of their
//     matrix; then the mean blocks, mean_M of the row statistic: one block per matrix when M >= kBlockMeanRows,
//     else one warp per matrix (kWarps matrices per block).
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
constexpr int kRows = 64;                      // rows per stripe of a factored matrix; column partials
                                               // take numel/kRows floats (<= 4 B/param / 64 at peak)
constexpr int kRowsPerWarp = kRows / kWarps;   // each warp walks 8 rows of its stripe
constexpr int64_t kFlatChunk = 16384;          // elements per block for tensors with ndim < 2
constexpr int kWsAlign = 4;                    // each tensor's column partials start on a 16-byte boundary
constexpr int64_t kBlockMeanRows = 2048;       // mean_M of a matrix with at least this many rows: one block

CAME_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The shape of one non-empty tensor as the kernels see it: factored = [B, M, N] (M > 0), flat: M = N = B = 0.
struct Shape {
  int64_t numel = 0, B = 0, M = 0, N = 0;
};

CAME_HD int64_t stripes_per_matrix(int64_t M) { return ceil_div(M, kRows); }
CAME_HD int64_t main_blocks_of(const Shape& s) {
  return s.M > 0 ? s.B * stripes_per_matrix(s.M) : ceil_div(s.numel, kFlatChunk);
}
// Column partials of phases 1 and 3: one float per (stripe, column), padded to kWsAlign.
CAME_HD int64_t colpart_floats_of(const Shape& s) {
  return s.M > 0 ? ceil_div(main_blocks_of(s) * s.N, kWsAlign) * kWsAlign : 0;
}
// Column finalize: a tile is 32 lanes x fin_vec(N) columns; 16-byte loads of the partials need N % 4 == 0
// (then a lane's 4 columns lie in one matrix and every partial row starts 16-byte aligned).
CAME_HD int fin_vec(int64_t N) { return N % 4 == 0 ? 4 : 1; }
CAME_HD int64_t fin_col_blocks_of(const Shape& s) { return s.M > 0 ? ceil_div(s.B * s.N, 32 * fin_vec(s.N)) : 0; }
CAME_HD bool block_per_mean(int64_t M) { return M >= kBlockMeanRows; }
CAME_HD int64_t fin_mean_blocks_of(const Shape& s) {
  if (s.M == 0) return 0;
  return block_per_mean(s.M) ? s.B : ceil_div(s.B, kWarps);
}
CAME_HD int64_t fin_blocks_of(const Shape& s) { return fin_col_blocks_of(s) + fin_mean_blocks_of(s); }
// Elements one phase-kernel block of this tensor moves (its first block): the largest-first sort key.
CAME_HD int64_t block_elems_of(const Shape& s) {
  if (s.M > 0) return (s.M < kRows ? s.M : kRows) * s.N;
  return s.numel < kFlatChunk ? s.numel : kFlatChunk;
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

// The host-side layout of a group: slot order, workspace offsets, block prefix sums. Built from the shapes
// alone; ops.cpp fills the device table from it.
struct Layout {
  std::vector<int32_t> order;       // slot -> index of the tensor in the group (largest blocks first)
  std::vector<int64_t> ws_col;      // per slot: first workspace float of its column partials (phases 1, 3)
  std::vector<int64_t> ws_blk;      // per slot: first workspace float of its block partials (phase 2)
  std::vector<int64_t> main_start;  // per slot + 1: prefix sum of phase-kernel blocks
  std::vector<int64_t> fin_start;   // per slot + 1: prefix sum of column-finalize blocks
  int64_t ws_floats = 0;            // max(column partials, block partials): phases 1-3 share the buffer
};

inline Layout make_layout(const std::vector<Shape>& shapes) {
  Layout L;
  const size_t n = shapes.size();
  L.order.resize(n);
  std::iota(L.order.begin(), L.order.end(), 0);
  std::stable_sort(L.order.begin(), L.order.end(), [&](int32_t a, int32_t b) {
    return block_elems_of(shapes[a]) > block_elems_of(shapes[b]);
  });
  L.main_start.assign(n + 1, 0);
  L.fin_start.assign(n + 1, 0);
  int64_t col = 0, blk = 0;
  for (size_t k = 0; k < n; ++k) {
    const Shape& s = shapes[L.order[k]];
    L.ws_col.push_back(col);
    L.ws_blk.push_back(blk);
    col += colpart_floats_of(s);
    blk += main_blocks_of(s);
    L.main_start[k + 1] = L.main_start[k] + main_blocks_of(s);
    L.fin_start[k + 1] = L.fin_start[k] + fin_blocks_of(s);
  }
  L.ws_floats = std::max<int64_t>(std::max(col, blk), 1);
  return L;
}

// ---- The device table: one 128-byte entry per slot, then main_start and fin_start as int32 [n + 1] each.
struct alignas(16) TensorDesc {
  void* p;            // param (storage dtype)
  const void* g;      // grad (storage dtype)
  float* m;           // exp_avg
  float* row;         // exp_avg_sq_row r [B*M] (factored) or exp_avg_sq v [numel] (flat)
  float* col;         // exp_avg_sq_col c [B*N]
  float* res_row;     // exp_avg_res_row R [B*M]
  float* res_col;     // exp_avg_res_col C [B*N]
  float* stat;        // its slice of stats: mean_M(r)[B], mean_M(R)[B], clip divisor
  int64_t numel, B, M, N;  // M = N = B = 0 for flat tensors
  int64_t ws_col, ws_blk;  // workspace offsets (Layout)
  int32_t vec_ok;          // 16-byte loads allowed: every pointer aligned, N % VEC == 0
  int32_t pad_;
  const float* scales;     // bias correction: its row [s_u, s_m] of bias_scales (nullptr without; then unread)
};
static_assert(sizeof(TensorDesc) == 128, "TensorDesc is one 128-byte line");

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
  int32_t n;
  const LowbitDesc* lp;  // [n], in slot order, or nullptr (the default state)
};

// Bytes of the uploaded table for n slots: the entries, then the two prefix sums.
inline int64_t table_bytes(int64_t n) { return n * static_cast<int64_t>(sizeof(TensorDesc)) + 2 * (n + 1) * 4; }
// ... with the low-precision entries after them, 16-byte aligned.
inline int64_t lowbit_offset(int64_t n) { return ceil_div(table_bytes(n), 16) * 16; }
inline int64_t table_bytes_lowbit(int64_t n) {
  return lowbit_offset(n) + n * static_cast<int64_t>(sizeof(LowbitDesc));
}

}  // namespace came
