// multi_tensor.cuh: the multi-tensor plumbing every phase shares, written once (device side of plan.h).
//
// One launch covers a whole (device, dtype) group: the per-tensor table (plan.h's TensorDesc, uploaded by
// ops.cpp) is in device memory, and a block finds its tensor with a 32-wide search over the table's block
// prefix sums (find_main / find_fin / find_clip, and phase 1's find_reg / find_rest: two dependent loads up
// to 1024 tensors). Blocks are ordered largest first (plan.h).
//
// Phase-kernel blocks: factored tensor [B, M, N]: block s = stripe of tiles*kRows whole rows of matrix
// b = s / ceil(M/(tiles*kRows)) (tiles = 1 unless the workspace cap asks for taller stripes, plan.h), run
// as row tiles of kRows rows (row_tile); in a row tile, 8 warps, warp w owns rows w, w+8, ... and the tile
// loops over N in tiles of 32*VEC columns (VEC = 16 bytes of the param dtype). Per column tile a thread
// first loads a batch of its rows (RowTile: 4-8 back-to-back 16-byte loads per array, 32-48 KB per block in
// flight), then computes. Row sums are complete in the block; column sums are per-stripe partials written
// to fixed workspace slots (row tile 0 stores them, later row tiles add to them: the same thread, in order)
// and added by the column finalize (finalize_columns_and_means). Phase 1's register path (sq_stats.cu) runs
// a stripe in waves of whole rows instead. Flat tensor (ndim < 2, 0-d included): block k = elements
// [k*kFlatChunk, (k+1)*kFlatChunk). Packed tensor (plan.h: ndim >= 3, matrices of at most 8x8): block s = its
// whole matrices [s*K, (s+1)*K), every statistic complete in the block (packed blocks, at the end).
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
#include "check.h"
#include "plan.h"

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
        CAME_CHECK(false, OP_NAME, ": params must be float32, bfloat16 or float16, got ", DTYPE); \
    }                                                                                          \
  }()

#if defined(__CUDACC__)

// ---- GradScaler (mirror of triton_kernels/multi_tensor.py's _amp_found_inf / _amp_inv_scale). `amp` is
// [found_inf, 1/scale], 2 fp32 floats on the device, or nullptr without a GradScaler: then nothing is loaded
// and g is multiplied by 1.0f, which is exact, so results are bitwise those of a step without the flags.
// A uniform kernel argument rather than a template: a third switch would double the instantiations (nvcc
// time on 2 cores) for one multiply per element of a memory-bound kernel.
// A step with found_inf != 0 changes nothing: every kernel calls this first and returns (the whole block,
// before any barrier, search or write).
__device__ __forceinline__ bool amp_found_inf(const float* amp) { return amp != nullptr && amp[0] != 0.0f; }
__device__ __forceinline__ float amp_inv_scale(const float* amp) { return amp != nullptr ? amp[1] : 1.0f; }

// ---- Which tensor a block works on.
struct BlockRef {
  const TensorDesc* d;  // its table entry
  int64_t local;        // block index within that tensor
};

// Every warp runs the search (all 32 lanes must be active: call it first thing in a kernel). b: the block's
// number in the launch's numbering (blockIdx.x, or past an offset: find_main_from).
__device__ __forceinline__ BlockRef find_block(const DeviceTable& tab, const int32_t* __restrict__ start,
                                               int32_t b) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int k = owner_of_32(start, tab.n, b, [&](auto pred) { return __ballot_sync(0xffffffffu, pred(lane)); });
  return {tab.t + k, static_cast<int64_t>(b) - start[k]};
}
__device__ __forceinline__ BlockRef find_in(const DeviceTable& tab, const int32_t* __restrict__ start) {
  return find_block(tab, start, static_cast<int32_t>(blockIdx.x));
}
// Phase-kernel blocks (stripes / flat chunks), column-finalize blocks and phase-2 blocks.
__device__ __forceinline__ BlockRef find_main(const DeviceTable& tab) { return find_in(tab, tab.main_start); }
__device__ __forceinline__ BlockRef find_fin(const DeviceTable& tab) { return find_in(tab, tab.fin_start); }
__device__ __forceinline__ BlockRef find_clip(const DeviceTable& tab) { return find_in(tab, tab.clip_start); }
// Phase 1's two launches: the register path's blocks, and the others (plan.h).
__device__ __forceinline__ BlockRef find_reg(const DeviceTable& tab) { return find_in(tab, tab.reg_start); }
__device__ __forceinline__ BlockRef find_rest(const DeviceTable& tab) { return find_in(tab, tab.rest_start); }
// The packed kernels' blocks: phase-kernel blocks first, first + 1, ... (the packed slots come last, plan.h).
__device__ __forceinline__ BlockRef find_main_from(const DeviceTable& tab, int32_t first) {
  return find_block(tab, tab.main_start, first + static_cast<int32_t>(blockIdx.x));
}

// Whether this tensor's clip inputs are phase 1's fp64 W (plan.h's clip_from_w with the group's bound: the
// factored tensors of phase 1's register path); else one sum of u^2 per block (flat, packed, phase 2's).
__device__ __forceinline__ bool clip_from_w(const TensorDesc& d, const DeviceTable& tab) {
  return d.M > 0 && pack_of(d) == 0 && d.N <= tab.clip_cols;
}

// Row j (0 <= j < kRowsPerWarp) of this warp in the stripe (may be >= row_end in a matrix's last stripe).
__device__ __forceinline__ int64_t warp_row(const Stripe& s, int warp, int j) { return s.row0 + warp + j * kWarps; }

// ---- Loads and stores of VEC consecutive elements as fp32 registers. kVec: 16-byte accesses allowed
// (the host checked alignment); the last partial vector of a row or tensor falls back to scalars.
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

// kBatch of the warp's rows of a stripe, j0 .. j0 + kBatch - 1, at columns [col, col + VEC), loaded with
// every load issued before any value is used (kBatch 16-byte loads in flight per thread and array) and kept
// in the storage dtype until read (bf16/fp16: half the registers of fp32 copies). at(jj, e) is 0 outside
// the stripe or past N. kVec: a row past the stripe or a lane past N loads row0's first vector, a valid
// address, and drops it, so the loads need no branch. Otherwise (unaligned, or N % VEC != 0): guarded
// scalar loads; use kBatch = 1 there (a batch of scalar loads costs a register per element).
template <typename T, int VEC, bool kVec, int kBatch>
struct RowTile {
  Pack<T, VEC> pk[kBatch];
  bool ok[kBatch];

  __device__ __forceinline__ void load(const T* __restrict__ base, const Stripe& s, int warp, int j0, int64_t col) {
#pragma unroll
    for (int jj = 0; jj < kBatch; ++jj) {
      const int64_t row = warp_row(s, warp, j0 + jj);
      ok[jj] = row < s.row_end && col < s.N;
      if constexpr (kVec) {
        pk[jj] = *reinterpret_cast<const Pack<T, VEC>*>(base + (ok[jj] ? row * s.N + col : s.row0 * s.N));
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          pk[jj].v[e] = ok[jj] && col + e < s.N ? base[row * s.N + col + e] : static_cast<T>(0.0f);
        }
      }
    }
  }
  __device__ __forceinline__ float at(int jj, int e) const {
    return ok[jj] ? static_cast<float>(pk[jj].v[e]) : 0.0f;
  }
};

// kB rows of a bf16 momentum at columns [col, col + VEC) as raw bits, every load issued before any is used
// (scalar 2-byte loads: a RowTile's 16-byte-aligned Pack would not fit 4 bf16 values of an fp32 tensor's
// vector); 0 outside the stripe or past N.
template <int VEC, int kB>
struct Bf16Rows {
  uint16_t v[kB][VEC];
  __device__ __forceinline__ void load(const uint16_t* __restrict__ m, const Stripe& s, int warp, int j0,
                                       int64_t col) {
#pragma unroll
    for (int jj = 0; jj < kB; ++jj) {
      const int64_t row = warp_row(s, warp, j0 + jj);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[jj][e] = row < s.row_end && col + e < s.N ? m[row * s.N + col + e] : uint16_t{0};
      }
    }
  }
};

// Rows per load batch: all the warp's rows with 16-byte loads, else one row at a time.
template <bool kVec>
constexpr int kReadBatch = kVec ? kRowsPerWarp : 1;

// ---- Fixed-order reductions (deterministic: no atomics; the tree shape depends only on the launch).
// Sum over the warp, valid in lane 0 (float, or double for the clip total).
template <typename F>
__device__ __forceinline__ F warp_sum(F x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block, valid in thread 0. Ends with a barrier so `scratch` may be reused right after.
template <typename F>
__device__ __forceinline__ F block_sum(F x, F* scratch /* [kWarps] shared */) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  F s = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += scratch[w];
  }
  __syncthreads();
  return s;
}

// Cross-warp column sums of a tile: each warp holds its rows' sums of columns [col0 + lane*VEC, +VEC) in
// `acc`; the 8 warps' values are added in warp order and written to out[col0 + k] (k < 32*VEC, < N), or,
// with `add` (row tiles after a stripe's first), added to it: the same thread owns out[col0 + k] in every
// row tile, so it reads its own earlier store.
// One barrier per tile: the caller alternates between two `tile` buffers, so a warp that runs ahead into
// the next tile writes the other buffer (the one read two tiles ago, which every warp has passed since);
// the alternation goes on across a stripe's row tiles.
template <int VEC>
__device__ __forceinline__ void write_column_partials(const float (&acc)[VEC], float (&tile)[kWarps][32 * VEC],
                                                      float* __restrict__ out, int64_t col0, int64_t N,
                                                      bool add) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < VEC; ++e) tile[warp][lane * VEC + e] = acc[e];
  __syncthreads();
  for (int k = threadIdx.x; k < 32 * VEC; k += kThreads) {
    if (col0 + k < N) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += tile[w][k];
      out[col0 + k] = add ? out[col0 + k] + s : s;
    }
  }
}

// ---- Column finalize of phases 1 and 3 (plan.h: column blocks, then mean blocks) for one block:
//   column blocks: col[b, n] = beta*col + (1-beta)*(sum over the S stripes of matrix b of partial[s, n] / M + eps)
//     kW (phase 1, clip in phase 1): also W[b, n] = (double)(sum over the stripes of P[s, n]) / (double)col[b, n]
//     (the new col, as stored), in fp64: P/c passes fp32's range for tiny grads (c ~ (1-b2)*eps1), fp64 not
//   mean blocks:   means[b] = mean_M(row[b, :]) (row already updated in-block by the phase kernel).
// No serial chain: warp w of a column block adds stripes w, w+8, w+16, ... of the block's 32*FV columns
// (kFinBatch loads in flight per thread, added in stripe order), then the 8 warps' sums are added in warp
// order. The order depends on the shape only: bitwise reproducible.
constexpr int kFinBatch = 8;

// FV consecutive partials as fp32: one 16-byte load for FV = 4 (the host padded every tensor's partials
// to 16 bytes and N % 4 == 0), one 4-byte load for FV = 1.
template <int FV>
__device__ __forceinline__ void load_partials(const float* __restrict__ p, float (&x)[FV]) {
  if constexpr (FV == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  } else {
    x[0] = *p;
  }
}

// This warp's share (stripes warp, warp + 8, ...) of the sums over the S stripes of part[s * N + e], e < FV.
template <int FV>
__device__ __forceinline__ void sum_stripes(const float* __restrict__ part, int64_t S, int64_t N, int warp,
                                            float (&acc)[FV]) {
  int64_t s = warp;
  for (; s + (kFinBatch - 1) * kWarps < S; s += kFinBatch * kWarps) {
    float x[kFinBatch][FV];
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) load_partials<FV>(part + (s + u * kWarps) * N, x[u]);
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) {
#pragma unroll
      for (int e = 0; e < FV; ++e) acc[e] += x[u][e];
    }
  }
  for (; s < S; s += kWarps) {
    float x[FV];
    load_partials<FV>(part + s * N, x);
#pragma unroll
    for (int e = 0; e < FV; ++e) acc[e] += x[e];
  }
}

template <int FV, bool kW>
__device__ __forceinline__ void finalize_columns(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                 float* __restrict__ col, float beta, float one_minus_beta,
                                                 float eps, float (&red)[2][kWarps][128]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Shape shape{d.numel, d.B, d.M, d.N};
  const int64_t M = d.M, N = d.N, total = d.B * N;
  const int64_t S = stripes_per_matrix(M, d.tiles);
  const int64_t k0 = local * (32 * FV) + lane * FV;  // this lane's first entry of the [B, N] column statistic
  float acc[FV], pacc[FV];
#pragma unroll
  for (int e = 0; e < FV; ++e) acc[e] = pacc[e] = 0.0f;
  if (k0 < total) {  // FV = 4: N % 4 == 0, so the lane's 4 entries are all < total and in one matrix
    const int64_t b = k0 / N, n = k0 - b * N;
    const float* __restrict__ part = ws + d.ws_col + b * S * N + n;  // partial[s, n] = part[s * N]
    sum_stripes<FV>(part, S, N, warp, acc);
    if constexpr (kW) sum_stripes<FV>(part + colpart_floats_of(shape, d.tiles), S, N, warp, pacc);
  }
#pragma unroll
  for (int e = 0; e < FV; ++e) {
    red[0][warp][lane * FV + e] = acc[e];
    if constexpr (kW) red[1][warp][lane * FV + e] = pacc[e];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < 32 * FV; c += kThreads) {
    const int64_t k = local * (32 * FV) + c;
    if (k < total) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[0][w][c];
      const float c_new = ema(col[k], beta, one_minus_beta, mean_plus_eps(sum, static_cast<float>(M), eps));
      col[k] = c_new;
      if constexpr (kW) {
        float psum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) psum += red[1][w][c];
        reinterpret_cast<double*>(ws + d.ws_clip)[k] = clip_col_term(psum, c_new);
      }
    }
  }
}

// Sum of x[0, n) over groups of 4 consecutive elements: this thread takes groups first, first + stride, ...,
// kFinBatch of them in flight, each added in element order. 16-byte loads when x is 16-byte aligned, else
// scalar loads of the same elements: the order of the additions does not depend on the alignment.
__device__ __forceinline__ float grouped_sum(const float* __restrict__ x, int64_t first, int64_t stride, int64_t n) {
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int64_t full = n / 4;  // whole groups; the last partial group goes to its owner after them
  float acc = 0.0f;
  int64_t g = first;
  for (; g + (kFinBatch - 1) * stride < full; g += kFinBatch * stride) {
    float v[kFinBatch][4];
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) {
      const int64_t i = (g + u * stride) * 4;
      if (aligned) {
        load_partials<4>(x + i, v[u]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[u][e] = x[i + e];
      }
    }
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc += v[u][e];
    }
  }
  for (; g < full; g += stride) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc += x[g * 4 + e];
  }
  if (g == full) {  // this thread owns the partial group (if any)
    for (int64_t i = full * 4; i < n; ++i) acc += x[i];
  }
  return acc;
}

// with_w: phase 1 of a tensor whose clip phase 1 covers (W from the P partials, see finalize_columns).
// ws is written only there, at W (disjoint from every partial).
__device__ __forceinline__ void finalize_columns_and_means(const TensorDesc& d, int64_t local,
                                                           float* __restrict__ ws, float* __restrict__ col,
                                                           const float* __restrict__ row, float* __restrict__ means,
                                                           float beta, float one_minus_beta, float eps,
                                                           bool with_w) {
  __shared__ float red[2][kWarps][128];
  const Shape shape{d.numel, d.B, d.M, d.N};
  const int64_t col_blocks = fin_col_blocks_of(shape);
  if (local < col_blocks) {
    if (fin_vec(shape.N) == 4) {
      if (with_w) finalize_columns<4, true>(d, local, ws, col, beta, one_minus_beta, eps, red);
      else finalize_columns<4, false>(d, local, ws, col, beta, one_minus_beta, eps, red);
    } else {
      if (with_w) finalize_columns<1, true>(d, local, ws, col, beta, one_minus_beta, eps, red);
      else finalize_columns<1, false>(d, local, ws, col, beta, one_minus_beta, eps, red);
    }
  } else if (block_per_mean(shape.M)) {  // a tall matrix: the whole block, then a fixed block tree
    const int64_t b = local - col_blocks;
    const float s = block_sum(grouped_sum(row + b * shape.M, threadIdx.x, kThreads, shape.M), &red[0][0][0]);
    if (threadIdx.x == 0) means[b] = s / static_cast<float>(shape.M);
  } else {  // one warp per matrix
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t b = (local - col_blocks) * kWarps + warp;
    if (b < shape.B) {
      const float s = warp_sum(grouped_sum(row + b * shape.M, lane, 32, shape.M));
      if (lane == 0) means[b] = s / static_cast<float>(shape.M);
    }
  }
}

// ---- Packed blocks (plan.h: a tensor with ndim >= 3 and matrices of at most kPackMax x kPackMax; block s holds
// its whole matrices [s*K, s*K + nk), K = kPackElems / PM^2). The block's elements are one contiguous run of
// at most kPackElems, loaded and stored as a flat chunk is (thread x takes the vectors x, x + kThreads, ...,
// 16-byte accesses where vec_ok: every load coalesced). Its row and column statistics are complete in the
// block: the values go to shared memory (kPackElems floats), then one thread per row adds its N values in
// column order, one thread per column its M values in row order, one thread per matrix its M rows (the
// mean): fixed orders, no atomics, bitwise reproducible. The row and column results (at most kPackRows each
// for PM >= 4) stay in shared memory for the elementwise pass that needs them. PM = 1 (M = N = 1) needs none
// of it: element i is row, column and matrix k0 + i, and its sums are the value itself.
// Shared memory of a packed block (PM >= 4): the values, the rows' and the columns' statistics, block_sum's
// scratch.
constexpr int kPackSmemFloats = static_cast<int>(kPackElems) + 2 * kPackRows + kWarps;
// Resident blocks per SM the packed kernels are compiled for (__launch_bounds__), as the stripe kernels: 128
// registers at most. (3 or 4 blocks, i.e. 80 or 64 registers, spill in phases 3 and 4 on sm_90.)
constexpr int kPackedMinBlocks = 2;

struct Packed {
  int M, N;        // matrix dims (<= kPackMax)
  int nk;          // matrices in the block
  int rows, cols;  // rows (nk*M) and columns (nk*N) of the block's statistics
  int n;           // elements (nk*M*N <= kPackElems)
  int64_t k0;      // first matrix: the block's stats slots from k0, its rows from k0*M, its columns from k0*N
  int64_t e0;      // first element
};
__device__ __forceinline__ Packed packed_of(const TensorDesc& d, int64_t local, int pm) {
  const PackBlock b = pack_block_of(d.B, d.M, d.N, pm, local);
  Packed p;
  p.M = static_cast<int>(d.M);
  p.N = static_cast<int>(d.N);
  p.nk = b.nk;
  p.rows = b.nk * p.M;
  p.cols = b.nk * p.N;
  p.n = b.n;
  p.k0 = b.k0;
  p.e0 = b.e0;
  return p;
}

// Sum of f(x) over the N values of row q of a packed block's values v, in column order.
// (Element indices: plan.h's packed_row_elem, packed_col_elem, packed_col_of, PackedAt.)
template <int PM, typename F>
__device__ __forceinline__ float packed_row_sum(const Packed& p, const float* __restrict__ v, int q, F f) {
  const float* __restrict__ x = v + packed_row_elem(p.N, q, 0);  // x[j]: element (q, j)
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < PM; ++j) {
    if (j < p.N) s += f(x[j]);
  }
  return s;
}
// Sum of f(x) over the M values of column q (matrix q / N) of a packed block's values v, in row order.
template <int PM, typename F>
__device__ __forceinline__ float packed_col_sum(const Packed& p, const float* __restrict__ v, int q, F f) {
  const float* __restrict__ x = v + packed_col_elem(p.M, p.N, q, 0);  // x[i * N]: element i of the column
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < PM; ++i) {
    if (i < p.M) s += f(x[i * p.N]);
  }
  return s;
}
// mean_M of matrix kk's row statistic, from the block's rows (in row order; shared or global memory).
template <int PM>
__device__ __forceinline__ float packed_mean(const Packed& p, const float* __restrict__ rows, int kk) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < PM; ++i) {
    if (i < p.M) s += rows[kk * p.M + i];
  }
  return s / static_cast<float>(p.M);
}
struct Square {
  __device__ __forceinline__ float operator()(float x) const { return x * x; }
};
struct Same {
  __device__ __forceinline__ float operator()(float x) const { return x; }
};

// Elements of a packed block per thread: kPackElems / kThreads, as kPackVecs<VEC> vectors of VEC; the first
// element of this thread's vector u. Rows (and columns) per thread, at most: kPackIters<PM> (a block of PM >= 4
// has at most kPackElems / PM of each), row or column t*kThreads + threadIdx.x for t < kPackIters<PM>. Matrices:
// at most kPackElems / PM^2 <= kThreads, one per thread.
template <int VEC>
constexpr int kPackVecs = static_cast<int>(kPackElems) / (kThreads * VEC);
template <int PM>
constexpr int kPackIters = static_cast<int>(kPackElems) / (PM * kThreads);
static_assert(kPackElems / 16 <= kThreads, "a packed block of PM >= 4 holds at most kThreads matrices");
template <int VEC>
__device__ __forceinline__ int packed_vec_start(int u) { return (u * kThreads + static_cast<int>(threadIdx.x)) * VEC; }

// The row factors rsqrt(row / mean_M(row)) and column factors rsqrt(col) of a packed block into shared memory
// (rs [p.rows], cs [p.cols]): phase 3 takes them of r, c, phase 4 of R, C. mean_M(row) is summed from the
// matrix's rows as phase 1 sums it (packed_mean: same order, the values it stored, so the same float); a row's
// M <= 8 neighbours come from L1. All loads are issued before the first store.
template <int PM>
__device__ __forceinline__ void packed_factors(const Packed& p, const float* __restrict__ row,
                                               const float* __restrict__ col, float* __restrict__ rs,
                                               float* __restrict__ cs) {
  constexpr int kIt = kPackIters<PM>;
  const int tid = static_cast<int>(threadIdx.x);
  float rv[kIt], av[kIt], cv[kIt];
#pragma unroll
  for (int t = 0; t < kIt; ++t) {
    const int q = t * kThreads + tid;
    rv[t] = q < p.rows ? row[q] : 1.0f;
    av[t] = q < p.rows ? packed_mean<PM>(p, row, q / p.M) : 1.0f;
    cv[t] = q < p.cols ? col[q] : 1.0f;
  }
#pragma unroll
  for (int t = 0; t < kIt; ++t) {
    const int q = t * kThreads + tid;
    if (q < p.rows) rs[q] = row_factor(rv[t], av[t]);
    if (q < p.cols) cs[q] = col_factor(cv[t]);
  }
}

#endif  // __CUDACC__

}  // namespace came
