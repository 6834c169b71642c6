// multi_tensor.cuh: the multi-tensor plumbing every phase shares, written once.
//
// One launch covers up to kMaxTensors tensors of one (device, dtype) group. Their addresses, shapes and
// workspace offsets travel by value in a kernel argument (TensorTable), as in PyTorch's
// MultiTensorApply.cuh, so a step needs no host-to-device copy and no device-side table to keep in sync
// with the parameters. Unlike MultiTensorApply the table holds one prefix sum of blocks per tensor, not one
// entry per block: a block finds its tensor by a binary search over <= 36 entries, so a launch may hold any
// number of blocks and a large group needs ceil(tensors / 36) launches per kernel, not one per 320 chunks.
//
// Work units ("blocks"), the same in every phase kernel:
//   factored tensor [B, M, N]: block s = stripe of kRows whole rows of matrix b = s / ceil(M/kRows);
//     8 warps, warp w walks rows w, w+8, ... of the stripe; the stripe loops over N in tiles of 32*VEC
//     columns (VEC = 16 bytes of the param dtype), so row sums are complete in the block and column sums
//     are per-stripe partials written to fixed workspace slots.
//   flat tensor (ndim < 2, 0-d included): block k = elements [k*kFlatChunk, (k+1)*kFlatChunk).
// Finalize kernels use their own block counts over the same table (set by fill_blocks).
#pragma once

#include <algorithm>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "came_math.cuh"
#include "came_ops.h"

namespace came {

// ---- Compile-time switches: BOOL_SWITCH(cond, kName, [&] { kernel<kName><<<...>>>(...); });
// The runtime bool picks one of two instantiations, in which kName is a constexpr.
#define CAME_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                         \
    if (COND) {                                 \
      constexpr bool CONST_NAME = true;         \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr bool CONST_NAME = false;        \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// ---- dtype dispatch for the storage dtype of params and grads (arithmetic is always fp32).
#define CAME_DISPATCH_PARAM_DTYPE(DTYPE, OP_NAME, ...)                                         \
  [&] {                                                                                        \
    switch (DTYPE) {                                                                           \
      case at::ScalarType::Float: {                                                            \
        using scalar_t = float;                                                                \
        return __VA_ARGS__();                                                                  \
      }                                                                                        \
      case at::ScalarType::BFloat16: {                                                         \
        using scalar_t = c10::BFloat16;                                                        \
        return __VA_ARGS__();                                                                  \
      }                                                                                        \
      case at::ScalarType::Half: {                                                             \
        using scalar_t = c10::Half;                                                            \
        return __VA_ARGS__();                                                                  \
      }                                                                                        \
      default:                                                                                 \
        TORCH_CHECK(false, OP_NAME, ": params must be float32, bfloat16 or float16, got ", DTYPE); \
    }                                                                                          \
  }()

// ---- The kernel-argument table (about 3.6 KiB for 36 tensors; see kMaxTensors).
struct TensorTable {
  void* p[kMaxTensors];              // param (storage dtype)
  const void* g[kMaxTensors];        // grad (storage dtype)
  float* m[kMaxTensors];             // exp_avg
  float* row[kMaxTensors];           // exp_avg_sq_row r [B*M] (factored) or exp_avg_sq v [numel] (flat)
  float* col[kMaxTensors];           // exp_avg_sq_col c [B*N]
  float* res_row[kMaxTensors];       // exp_avg_res_row R [B*M]
  float* res_col[kMaxTensors];       // exp_avg_res_col C [B*N]
  float* stat[kMaxTensors];          // slice of stats: mean_M(r)[B], mean_M(R)[B], clip divisor
  int64_t numel[kMaxTensors];
  int64_t M[kMaxTensors];            // 0 for flat tensors
  int64_t N[kMaxTensors];
  int64_t ws_off[kMaxTensors];       // first workspace float of this tensor
  int32_t block_start[kMaxTensors + 1];  // prefix sum of blocks; block_start[ntensors] = grid size
  uint8_t vec_ok[kMaxTensors];       // 16-byte loads allowed: every pointer aligned, N % VEC == 0
  int32_t ntensors;
};

// Which workspace layout a launch uses: column partials (phases 1 and 3) or one float per block (phase 2).
enum class WsLayout { kColumnPartials, kBlockPartials, kNone };

// Fill everything but block_start for tensors [first, last) of the group.
inline TensorTable make_table(const Group& grp, size_t first, size_t last, at::Tensor& stats, WsLayout ws) {
  TensorTable tab;
  tab.ntensors = static_cast<int32_t>(last - first);
  const int vec = 16 / static_cast<int>(c10::elementSize(grp.dtype));
  int64_t ws_off = 0;
  float* stats_base = stats.data_ptr<float>();
  for (size_t i = first; i < last; ++i) {
    const TensorRef& t = grp.ts[i];
    const int k = static_cast<int>(i - first);
    auto addr = [](const at::Tensor& x) -> void* { return x.defined() ? x.data_ptr() : nullptr; };
    tab.p[k] = t.p.data_ptr();
    tab.g[k] = t.g.data_ptr();
    tab.m[k] = t.m.data_ptr<float>();
    tab.row[k] = static_cast<float*>(t.factored() ? addr(t.r) : addr(t.v));
    tab.col[k] = static_cast<float*>(addr(t.c));
    tab.res_row[k] = static_cast<float*>(addr(t.R));
    tab.res_col[k] = static_cast<float*>(addr(t.C));
    tab.stat[k] = stats_base + t.stat_off;
    tab.numel[k] = t.numel;
    tab.M[k] = t.M;
    tab.N[k] = t.N;
    tab.ws_off[k] = ws_off;
    if (ws == WsLayout::kColumnPartials) ws_off += colpart_floats_of(t);
    if (ws == WsLayout::kBlockPartials) ws_off += main_blocks_of(t);
    // 16-byte loads need every full-size row (or chunk) to start on a 16-byte boundary.
    bool ok = t.factored() ? (t.N % vec == 0) : true;
    for (const void* ptr : {addr(t.p), addr(t.g), addr(t.m), addr(t.c), addr(t.C), addr(t.v)}) {
      ok = ok && (reinterpret_cast<uintptr_t>(ptr) % 16 == 0);
    }
    tab.vec_ok[k] = ok ? 1 : 0;
  }
  return tab;
}

// Set block_start from a per-tensor block count; returns the grid size (0: nothing to launch).
template <typename BlocksOf>
inline int64_t fill_blocks(TensorTable& tab, const Group& grp, size_t first, BlocksOf blocks_of) {
  int64_t total = 0;
  for (int k = 0; k < tab.ntensors; ++k) {
    tab.block_start[k] = static_cast<int32_t>(total);
    total += blocks_of(grp.ts[first + k]);
    TORCH_CHECK(total <= INT32_MAX, "came_kernels: more than 2^31-1 blocks in one launch");
  }
  tab.block_start[tab.ntensors] = static_cast<int32_t>(total);
  return total;
}

// Run fn(first, last) for each launch-chunk of at most kMaxTensors tensors, in list order.
template <typename Fn>
inline void for_each_chunk(const Group& grp, Fn fn) {
  for (size_t first = 0; first < grp.ts.size(); first += kMaxTensors) {
    const size_t last = std::min(grp.ts.size(), first + static_cast<size_t>(kMaxTensors));
    fn(first, last);
  }
}

// Finalize kernels of phases 1 and 3: the column EMAs (one thread per column of every matrix) and the
// per-matrix means of the row statistic (one warp per matrix).
inline int64_t finalize_blocks_of(const TensorRef& t) {
  return t.factored() ? ceil_div(t.B * t.N, kThreads) + ceil_div(t.B, kWarps) : 0;
}

#if defined(__CUDACC__)

struct BlockRef {
  int t;          // tensor slot in the table
  int64_t local;  // block index within that tensor
};

// The tensor owning this block: the last slot whose block_start <= blockIdx.x (tensors with zero blocks
// share a start with their successor and are skipped this way).
__device__ __forceinline__ BlockRef find_block(const TensorTable& tab) {
  const int32_t b = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = tab.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.block_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return {lo, static_cast<int64_t>(b) - tab.block_start[lo]};
}

// Geometry of stripe `local` of a factored tensor. Rows are global over the batch: row i of matrix b is
// b*M + i, which is also its index in r and R.
struct Stripe {
  int64_t M, N, b;
  int64_t row0, row_end;  // rows [row0, row_end) of the flattened [B*M, N] view
};
__device__ __forceinline__ Stripe stripe_of(const TensorTable& tab, int t, int64_t local) {
  Stripe s;
  s.M = tab.M[t];
  s.N = tab.N[t];
  const int64_t per_matrix = (s.M + kRows - 1) / kRows;
  s.b = local / per_matrix;
  s.row0 = s.b * s.M + (local - s.b * per_matrix) * kRows;
  const int64_t matrix_end = (s.b + 1) * s.M;
  s.row_end = s.row0 + kRows < matrix_end ? s.row0 + kRows : matrix_end;
  return s;
}

// ---- Loads and stores of VEC consecutive elements as fp32 registers. kVec: 16-byte accesses allowed
// (the caller checked alignment); the last partial vector of a row or tensor falls back to scalars.
template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

template <int VEC, bool kVec, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ base, int64_t i, int64_t end, float (&x)[VEC]) {
  if (kVec && i + VEC <= end) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(base + i);
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = static_cast<float>(pk.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = i + e < end ? static_cast<float>(base[i + e]) : 0.0f;
  }
}

template <int VEC, bool kVec, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ base, int64_t i, int64_t end, const float (&x)[VEC]) {
  if (kVec && i + VEC <= end) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int e = 0; e < VEC; ++e) pk.v[e] = static_cast<T>(x[e]);
    *reinterpret_cast<Pack<T, VEC>*>(base + i) = pk;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (i + e < end) base[i + e] = static_cast<T>(x[e]);
    }
  }
}

// ---- Fixed-order reductions (deterministic: no atomics; the tree shape depends only on the launch).
// Sum over the warp, valid in lane 0.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block, valid in thread 0. Ends with a barrier so `scratch` may be reused right after.
__device__ __forceinline__ float block_sum(float x, float* scratch /* [kWarps] shared */) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float s = 0.0f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += scratch[w];
  }
  __syncthreads();
  return s;
}

// Cross-warp column sums of a tile: each warp holds its rows' sums of columns [col0 + lane*VEC, +VEC) in
// `acc`; the 8 warps' values are added in warp order and written to out[col0 + k] (k < 32*VEC, < N).
template <int VEC>
__device__ __forceinline__ void write_column_partials(const float (&acc)[VEC], float (*tile)[32 * VEC],
                                                      float* __restrict__ out, int64_t col0, int64_t N) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < VEC; ++e) tile[warp][lane * VEC + e] = acc[e];
  __syncthreads();
  for (int k = threadIdx.x; k < 32 * VEC; k += kThreads) {
    if (col0 + k < N) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += tile[w][k];
      out[col0 + k] = s;
    }
  }
  __syncthreads();  // the tile is rewritten by the next column tile
}

// Finalize of phases 1 and 3 for one block of a factored tensor:
//   column blocks: col[b, n] = beta*col + (1-beta)*(sum over the stripes of matrix b of partial[s, n] / M + eps),
//                  the stripes added in order;
//   mean blocks:   means[b] = mean_M(row[b, :]) (row already updated in-block by the phase kernel).
__device__ __forceinline__ void finalize_columns_and_means(const TensorTable& tab, int t, int64_t local,
                                                           const float* __restrict__ ws, float* __restrict__ col,
                                                           const float* __restrict__ row, float* __restrict__ means,
                                                           float beta, float one_minus_beta, float eps) {
  const int64_t M = tab.M[t], N = tab.N[t];
  const int64_t B = tab.numel[t] / (M * N);
  const int64_t per_matrix = (M + kRows - 1) / kRows;
  const int64_t col_blocks = (B * N + kThreads - 1) / kThreads;
  if (local < col_blocks) {
    const int64_t k = local * kThreads + threadIdx.x;  // index into the [B, N] column statistic
    if (k < B * N) {
      const int64_t b = k / N, n = k - b * N;
      const float* part = ws + tab.ws_off[t] + b * per_matrix * N + n;
      float s = 0.0f;
      for (int64_t i = 0; i < per_matrix; ++i) s += part[i * N];
      col[k] = ema(col[k], beta, one_minus_beta, mean_plus_eps(s, static_cast<float>(M), eps));
    }
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t b = (local - col_blocks) * kWarps + warp;
    if (b < B) {
      float s = 0.0f;
      for (int64_t i = lane; i < M; i += 32) s += row[b * M + i];
      s = warp_sum(s);
      if (lane == 0) means[b] = s / static_cast<float>(M);
    }
  }
}

#endif  // __CUDACC__

}  // namespace came
