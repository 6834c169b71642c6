// Phase 1, sq_stats: the EMAs of g^2, and the clip statistics of every tensor it can hold (mirror of
// triton_kernels/sq_stats.py and of "phase 1" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor; factored = ndim >= 2, viewed as [B, M, N]):
//   factored:  r[b, i] = b2*r + (1-b2)*(mean_N(g^2)[b, i] + eps1)     sq_stats_reg_kernel (N <= clip_cols) or
//                                                                      sq_stats_kernel (row sums in-block)
//              c[b, j] = b2*c + (1-b2)*(mean_M(g^2)[b, j] + eps1)     sq_finalize_kernel (stripe partials Q)
//              mean_M(r)[b] -> stats                                   sq_finalize_kernel
//     N <= clip_cols (8192): also the clip's P[b, j] = sum_i (g * rsqrt(r_i))^2 with the new r (stripe
//              partials), and W[b, j] = P / c with the new c, fp64      sq_stats_reg_kernel, sq_finalize_kernel
//              (clip_stats.cu adds mean_M(r) * W into sum(u^2): came_math.cuh's identity, exact)
//   packed (plan.h: ndim >= 3, M, N <= 8; a block = K whole matrices), all in the block, sq_stats_packed_kernel:
//              r and c as above (row sums over N, column sums over M, both complete), mean_M(r)[b] (not
//              stored: phase 3 sums it again from r), and the block's sum of u^2,
//              u = g * rsqrt(r / mean_M(r)) * rsqrt(c) with the new r, c, into its clip slot (as a flat
//              chunk's; u itself, not the W identity: no fp64 needed per column)
//   ndim < 2:  v = b2*v + (1-b2)*(g^2 + eps1); one sum of (g * rsqrt(v))^2 per block  sq_stats_kernel
// maximize does not matter here: g^2 is even in g. GradScaler (amp = [found_inf, 1/scale]): g = g * (1/scale)
// as it is loaded; every kernel returns before writing anything when found_inf != 0.
//
// Memory per element: factored reads g once (fp32 4 B, bf16/fp16 2 B) and writes two column partials (Q, P)
// per stripe of tiles*kRows rows (8/64 B at most); N > clip_cols: g once, Q only (4/64 B). Flat reads g and v
// and writes v (fp32 12 B, bf16 10 B). Packed reads g once and r, c (rows and columns: (M + N)/(M*N) of the
// elements, 8 B each read and written): fp32 3x3 4 + 5.3 B, 1x1 (every element its own row, column and
// matrix) 4 + 16 = 20 B. GradScaler: amp, 8 B per block.
// Register path (N <= clip_cols): a block runs its whole stripe in waves of kRW rows, each thread owning
// kG groups of VEC consecutive columns (32 values of g per thread per wave: 32 KB per block in fp32, 16 KB in
// 16-bit dtypes) and their Q and P accumulators in registers for the whole stripe: a wave's g is loaded once,
// its row sums reduced across the block (one barrier per wave), r updated, then Q and P accumulated from the
// same registers; at the stripe's end Q and P are stored to its partial slots (plain stores).
// Launch: one sq_stats_reg_kernel over the group's factored tensors with N <= clip_cols, one block per stripe
// (the register path), and one sq_stats_kernel over the others, one block per stripe (N > clip_cols) or
// kFlatChunk chunk (flat), each with its own block prefix sums in the table (plan.h's reg_start, rest_start)
// and launched only when it has blocks; 256 threads, __launch_bounds__(256, 2) both. Two kernels because the
// register path, inlined with the other bodies, pushed the one kernel past 128 registers (spills); apart
// each is spill-free. Packed tensors: one sq_stats_packed_kernel over their blocks (the end of the phase-kernel
// numbering, plan.h), a kernel of its own for the same reason (inlined into sq_stats_kernel, its body made the
// 16-bit instantiations spill): g to shared memory (16 KB), then one thread per row, per column, per matrix
// (multi_tensor.cuh's packed blocks), 4 barriers; 1x1 matrices elementwise. Then one sq_finalize_kernel,
// column tiles summed over their stripes by 8 warps, and the means of r (multi_tensor.cuh). All grids are
// independent of the tensor count (plan.h).
// Determinism: every sum has a fixed order (per-thread loops, shuffle trees, the stripes in a fixed pattern):
// two runs are bitwise identical.
#include "multi_tensor.cuh"

namespace came {
namespace {

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_flat(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                              const Hyper& h, float inv) {
  constexpr int kUnroll = 16 / VEC;  // 16 elements per thread per batch: the loads go out together
  __shared__ float scratch[kWarps];
  const T* __restrict__ g = static_cast<const T*>(d.g);
  float* __restrict__ v = d.row;
  const int64_t end = std::min(d.numel, (local + 1) * kFlatChunk);
  float acc = 0.0f;  // this thread's share of sum (g * rsqrt(v))^2 over the block, with the new v
  for (int64_t i0 = local * kFlatChunk + threadIdx.x * VEC; i0 < end; i0 += kUnroll * kThreads * VEC) {
    float gv[kUnroll][VEC], vv[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vec<VEC, kVec>(g, i0 + u * kThreads * VEC, end, gv[u]);
      load_vec<VEC, kVec>(v, i0 + u * kThreads * VEC, end, vv[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float gx = unscaled(gv[u][e], inv);
        vv[u][e] = ema(vv[u][e], h.beta2, h.one_minus_beta2, gx * gx + h.eps1);
        if (i0 + u * kThreads * VEC + e < end) {
          const float x = vector_u(gx, vv[u][e]);
          acc += x * x;
        }
      }
      store_vec<VEC, kVec>(v, i0 + u * kThreads * VEC, end, vv[u]);
    }
  }
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) ws[d.ws_clip + local] = total;
}

// Factored, N > clip_cols: r and the Q partials only, row tile by row tile (phase 2 gathers the clip).
template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_row_tile(const Stripe& s, const T* __restrict__ g, float* __restrict__ r,
                                                  float* __restrict__ colpart, bool add, int& buf,
                                                  float (&tiles)[2][kWarps][32 * VEC], const Hyper& h, float inv) {
  constexpr int kB = kReadBatch<kVec>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float row_acc[kRowsPerWarp];  // this lane's share of sum_j g^2[row, j] for the warp's rows
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) row_acc[j] = 0.0f;

  for (int64_t col0 = 0; col0 < s.N; col0 += 32 * VEC, buf ^= 1) {
    const int64_t col = col0 + lane * VEC;
    float col_acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) col_acc[e] = 0.0f;
#pragma unroll
    for (int j0 = 0; j0 < kRowsPerWarp; j0 += kB) {
      RowTile<T, VEC, kVec, kB> x;
      x.load(g, s, warp, j0, col);  // zeros outside the stripe: they add nothing
#pragma unroll
      for (int jj = 0; jj < kB; ++jj) {
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float gx = unscaled(x.at(jj, e), inv);
          const float sq = gx * gx;
          col_acc[e] += sq;
          sum += sq;
        }
        row_acc[j0 + jj] += sum;
      }
    }
    write_column_partials<VEC>(col_acc, tiles[buf], colpart, col0, s.N, add);
  }

  // Row sums are complete: update r in place.
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    const float sum = warp_sum(row_acc[j]);
    if (lane == 0 && row < s.row_end) {
      r[row] = ema(r[row], h.beta2, h.one_minus_beta2, mean_plus_eps(sum, static_cast<float>(s.N), h.eps1));
    }
  }
}

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_stripe(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                const Hyper& h, float inv, float* smem) {
  auto& tiles = *reinterpret_cast<float (*)[2][kWarps][32 * VEC]>(smem);
  const Stripe s = stripe_of(d.M, d.N, local, d.tiles);
  float* __restrict__ colpart = ws + d.ws_col + local * s.N;  // this stripe's partials of sum_i g^2[i, :]
  int buf = 0;
  const int64_t nt = row_tiles_of(s);
  for (int64_t t = 0; t < nt; ++t) {
    sq_stats_row_tile<T, VEC, kVec>(row_tile(s, t), static_cast<const T*>(d.g), d.row, colpart, t > 0, buf, tiles,
                                    h, inv);
  }
}

// Factored, N <= clip_cols (the register path, see the header): thread x owns the column groups
// x + q*kThreads (q < kG) of VEC consecutive columns, i.e. columns [(x + q*kThreads)*VEC, +VEC); a wave is
// kRW consecutive rows of the stripe, 32 elements of g per thread (fp32: 32 KB per block, 16-bit: 16 KB).
// Addresses: one row pointer per row, the groups at constant offsets from it (q * kThreads * VEC).
template <typename T, int VEC, bool kVec, int kG>
__device__ __forceinline__ void sq_stats_stripe_reg(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                    const Hyper& h, float inv, float* __restrict__ smem) {
  // Rows per wave: 32 values of g per thread in every dtype. 64 for 16-bit rows of at most 2048 (as many bytes
  // in flight as fp32) measured slower on an H200: bf16 TinyLlama 1300 us against 1039, GPT-2 286 against 217.
  constexpr int kRW = 32 / (kG * VEC) > 0 ? 32 / (kG * VEC) : 1;
  constexpr int kStride = kThreads * VEC;                           // columns between a thread's groups
  // The widest class (32 columns per thread): Q in shared memory, each thread its own columns (no barrier),
  // so that 32 g values, 32 P and the addressing fit 128 registers; narrower classes keep Q in registers.
  constexpr bool kQShared = kG * VEC == 32;
  __shared__ float red[2][kRW][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t N = d.N;
  const Stripe s = stripe_of(d.M, N, local, d.tiles);
  const T* __restrict__ g = static_cast<const T*>(d.g);
  float* __restrict__ r = d.row;
  const float n_f = static_cast<float>(N);
  const int c0 = threadIdx.x * VEC;  // first column of this thread's group 0 (N <= 8192: int is enough)
  const int ncols = static_cast<int>(N);
  // groups of this thread that start inside the row: q < nq
  const int nq = c0 < ncols ? min(kG, (ncols - c0 + kStride - 1) / kStride) : 0;

  float qa[kQShared ? 1 : kG][VEC], pa[kG][VEC];  // sum g^2 and sum t^2 over the stripe's rows, per column
  float* __restrict__ qs = smem + c0;  // kQShared: Q of group q, element e at qs[q * kStride + e]
#pragma unroll
  for (int q = 0; q < kG; ++q) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      pa[q][e] = 0.0f;
      if constexpr (kQShared) qs[q * kStride + e] = 0.0f;
      else qa[q][e] = 0.0f;
    }
  }

  int buf = 0;
  for (int64_t row0 = s.row0; row0 < s.row_end; row0 += kRW, buf ^= 1) {
    Pack<T, VEC> x[kRW][kG];
    float r_old[kRW];
#pragma unroll
    for (int jj = 0; jj < kRW; ++jj) {
      const bool row_ok = row0 + jj < s.row_end;
      r_old[jj] = row_ok ? r[row0 + jj] : 0.0f;
      const T* __restrict__ gr = g + (row0 + jj) * N + c0;  // only read where row_ok
#pragma unroll
      for (int q = 0; q < kG; ++q) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[jj][q].v[e] = static_cast<T>(0.0f);  // zeros add nothing below
        if (row_ok && q < nq) {
          if constexpr (kVec) {  // N % VEC == 0: a group is all in the row
            x[jj][q] = *reinterpret_cast<const Pack<T, VEC>*>(gr + q * kStride);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              if (c0 + q * kStride + e < ncols) x[jj][q].v[e] = gr[q * kStride + e];
            }
          }
        }
      }
    }
    // g^2: into Q and this thread's share of each row sum
#pragma unroll
    for (int jj = 0; jj < kRW; ++jj) {
      float sum = 0.0f;
#pragma unroll
      for (int q = 0; q < kG; ++q) {
        float sq[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float gx = unscaled(static_cast<float>(x[jj][q].v[e]), inv);
          sq[e] = gx * gx;
          sum += sq[e];
        }
        if constexpr (kQShared) {
#pragma unroll
          for (int e = 0; e < VEC; e += 4) {
            float4* p4 = reinterpret_cast<float4*>(qs + q * kStride + e);
            float4 v = *p4;
            v.x += sq[e];
            v.y += sq[e + 1];
            v.z += sq[e + 2];
            v.w += sq[e + 3];
            *p4 = v;
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) qa[q][e] += sq[e];
        }
      }
      sum = warp_sum(sum);
      if (lane == 0) red[buf][jj][warp] = sum;
    }
    // One barrier per wave: the next wave writes the other buffer; the one after it writes this one again,
    // when every thread has passed the next wave's barrier, i.e. read this one.
    __syncthreads();
    float r_inv[kRW];  // inv * rsqrt(r_new): t = g * (1/scale) * rsqrt(r_new) from the stored g (1/scale = 1
                       // without a GradScaler: then exactly g * rsqrt(r_new)); not g*inv again, which would keep
                       // 32 unscaled copies of g live across the barrier
#pragma unroll
    for (int jj = 0; jj < kRW; ++jj) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[buf][jj][w];
      // every thread computes the same r_new from the same values; one stores it
      const float r_new = ema(r_old[jj], h.beta2, h.one_minus_beta2, mean_plus_eps(sum, n_f, h.eps1));
      const bool row_ok = row0 + jj < s.row_end;
      if (row_ok && threadIdx.x == 0) r[row0 + jj] = r_new;
      r_inv[jj] = row_ok ? inv * rsqrt_(r_new) : 0.0f;
    }
    // t = g * rsqrt(r_new): into P (columns past N skipped: r_new may be 0, and 0 * inf is NaN)
#pragma unroll
    for (int jj = 0; jj < kRW; ++jj) {
#pragma unroll
      for (int q = 0; q < kG; ++q) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (q < nq && (kVec || c0 + q * kStride + e < ncols)) {
            const float t = clip_t(static_cast<float>(x[jj][q].v[e]), r_inv[jj]);
            pa[q][e] += t * t;
          }
        }
      }
    }
  }

  // The stripe's partials: plain stores of the owned columns (16-byte stores when N % VEC == 0).
  const Shape shape{d.numel, d.B, d.M, N};
  float* __restrict__ qpart = ws + d.ws_col + local * N + c0;
  float* __restrict__ ppart = qpart + colpart_floats_of(shape, d.tiles);
#pragma unroll
  for (int q = 0; q < kG; ++q) {
    if constexpr (kQShared) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) qa[0][e] = qs[q * kStride + e];
    }
    float (&qv)[VEC] = qa[kQShared ? 0 : q];
    if (q < nq) {
      if constexpr (kVec) {
#pragma unroll
        for (int e = 0; e < VEC; e += 4) {
          *reinterpret_cast<float4*>(qpart + q * kStride + e) =
              make_float4(qv[e], qv[e + 1], qv[e + 2], qv[e + 3]);
          *reinterpret_cast<float4*>(ppart + q * kStride + e) =
              make_float4(pa[q][e], pa[q][e + 1], pa[q][e + 2], pa[q][e + 3]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (c0 + q * kStride + e < ncols) {
            qpart[q * kStride + e] = qv[e];
            ppart[q * kStride + e] = pa[q][e];
          }
        }
      }
    }
  }
}

// The register path's column groups per thread (plan.h's reg_groups): N <= kClipCols gives kG <= 8 (fp32) or
// 4 (16-bit dtypes): 32 columns per thread at most.
template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_stripe_reg_any(const TensorDesc& d, int64_t local, float* ws,
                                                        const Hyper& h, float inv, float* smem) {
  switch (reg_groups(d.N, VEC)) {
    case 1: sq_stats_stripe_reg<T, VEC, kVec, 1>(d, local, ws, h, inv, smem); break;
    case 2: sq_stats_stripe_reg<T, VEC, kVec, 2>(d, local, ws, h, inv, smem); break;
    case 4: sq_stats_stripe_reg<T, VEC, kVec, 4>(d, local, ws, h, inv, smem); break;
    default:
      if constexpr (VEC == 4) sq_stats_stripe_reg<T, VEC, kVec, 8>(d, local, ws, h, inv, smem);
      break;
  }
}
static_assert(kClipCols <= 8 * kThreads * 4 && kClipCols <= 4 * kThreads * 8, "kG of the register path");

// Phase 1 of the factored tensors with N <= clip_cols (the register path), a launch of its own: inlined into
// sq_stats_kernel with the other bodies its 32 live columns per thread pushed the kernel past 128 registers.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sq_stats_reg_kernel(DeviceTable tab, float* ws, Hyper h,
                                                                   const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ __align__(16) float smem[kClipCols];  // Q of the widest class
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_reg(tab);
  const TensorDesc& d = *blk.d;
  if (d.vec_ok) sq_stats_stripe_reg_any<T, VEC, true>(d, blk.local, ws, h, inv, smem);
  else sq_stats_stripe_reg_any<T, VEC, false>(d, blk.local, ws, h, inv, smem);
}

// A packed block of PM >= 4 (multi_tensor.cuh): its whole matrices' r, c and mean_M(r), then the block's sum
// of u^2 = (g * rsqrt(r / mean_M(r)) * rsqrt(c))^2 with the new r and c into its clip slot (as a flat chunk's).
// Every load at once (g once, unscaled into shared memory; the rows' r, the columns' c), then sums from there.
template <typename T, int VEC, bool kVec, int PM>
__device__ __forceinline__ void sq_stats_packed(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                const Hyper& h, float inv, float* __restrict__ smem) {
  constexpr int kU = kPackVecs<VEC>, kIt = kPackIters<PM>;
  const Packed p = packed_of(d, local, PM);
  float* __restrict__ val = smem;                    // g * (1/scale), [n]
  float* __restrict__ rs = smem + kPackElems;        // the rows' new r, then rsqrt(r / mean_M(r))
  float* __restrict__ cs = rs + kPackRows;           // the columns' rsqrt(c), new c
  float* __restrict__ scratch = cs + kPackRows;      // block_sum's
  const T* __restrict__ g = static_cast<const T*>(d.g) + p.e0;
  float* __restrict__ r = d.row + p.k0 * p.M;
  float* __restrict__ c = d.col + p.k0 * p.N;
  const int tid = static_cast<int>(threadIdx.x);
  float rv[kIt], cv[kIt];
  {
    float x[kU][VEC];
#pragma unroll
    for (int u = 0; u < kU; ++u) load_vec<VEC, kVec>(g, packed_vec_start<VEC>(u), p.n, x[u]);
#pragma unroll
    for (int t = 0; t < kIt; ++t) {
      const int q = t * kThreads + tid;
      rv[t] = q < p.rows ? r[q] : 0.0f;
      cv[t] = q < p.cols ? c[q] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int i = packed_vec_start<VEC>(u) + e;
        if (i < p.n) val[i] = unscaled(x[u][e], inv);
      }
    }
  }
  __syncthreads();
  const float n_f = static_cast<float>(p.N), m_f = static_cast<float>(p.M);
#pragma unroll
  for (int t = 0; t < kIt; ++t) {
    const int q = t * kThreads + tid;
    if (q < p.rows) {  // r[b, i] = b2*r + (1-b2)*(mean_N(g^2) + eps1)
      const float r_new = ema(rv[t], h.beta2, h.one_minus_beta2,
                              mean_plus_eps(packed_row_sum<PM>(p, val, q, Square{}), n_f, h.eps1));
      r[q] = r_new;
      rs[q] = r_new;
    }
    if (q < p.cols) {  // c[b, j] = b2*c + (1-b2)*(mean_M(g^2) + eps1)
      const float c_new = ema(cv[t], h.beta2, h.one_minus_beta2,
                              mean_plus_eps(packed_col_sum<PM>(p, val, q, Square{}), m_f, h.eps1));
      c[q] = c_new;
      cs[q] = col_factor(c_new);
    }
  }
  __syncthreads();
  if (tid < p.nk) {  // mean_M(r) of matrix tid, and its rows' factors
    const float mean = packed_mean<PM>(p, rs, tid);
#pragma unroll
    for (int i = 0; i < PM; ++i) {
      if (i < p.M) rs[tid * p.M + i] = row_factor(rs[tid * p.M + i], mean);
    }
  }
  __syncthreads();
  float acc = 0.0f;  // u^2 over this thread's rows
#pragma unroll
  for (int t = 0; t < kIt; ++t) {
    const int q = t * kThreads + tid;
    if (q < p.rows) {
      const float rf = rs[q];
      const float* __restrict__ x = val + packed_row_elem(p.N, q, 0);        // x[j]: element (q, j) ...
      const float* __restrict__ cf = cs + packed_col_of(p.M, p.N, q, 0);  // ... in column cf[j]
#pragma unroll
      for (int j = 0; j < PM; ++j) {
        if (j < p.N) {
          const float u = factored_u(x[j], rf, cf[j]);
          acc += u * u;
        }
      }
    }
  }
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) ws[d.ws_clip + local] = total;
}

// A packed block of 1x1 matrices (PM = 1): element i is row, column and matrix k0 + i, so every sum above is
// the element itself (0 + x) and mean_M(r) = r / 1 = r: the same values, elementwise, without shared memory.
// Scalar loads (r and c carry no alignment promise), kB elements of g, r, c in flight per thread.
template <typename T>
__device__ __forceinline__ void sq_stats_packed_1x1(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                    const Hyper& h, float inv, float* __restrict__ scratch) {
  constexpr int kU = static_cast<int>(kPackElems) / kThreads, kB = 8;
  const Packed p = packed_of(d, local, 1);
  const T* __restrict__ g = static_cast<const T*>(d.g) + p.e0;
  float* __restrict__ r = d.row + p.k0;
  float* __restrict__ c = d.col + p.k0;
  float acc = 0.0f;
#pragma unroll
  for (int u0 = 0; u0 < kU; u0 += kB) {
    float gv[kB], rv[kB], cv[kB];
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int i = (u0 + b) * kThreads + threadIdx.x;
      const bool ok = i < p.n;
      gv[b] = ok ? static_cast<float>(g[i]) : 0.0f;
      rv[b] = ok ? r[i] : 0.0f;
      cv[b] = ok ? c[i] : 0.0f;
    }
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int i = (u0 + b) * kThreads + threadIdx.x;
      if (i < p.n) {
        const float gx = unscaled(gv[b], inv);
        const float sq = gx * gx;
        const float r_new = ema(rv[b], h.beta2, h.one_minus_beta2, mean_plus_eps(sq, 1.0f, h.eps1));
        const float c_new = ema(cv[b], h.beta2, h.one_minus_beta2, mean_plus_eps(sq, 1.0f, h.eps1));
        r[i] = r_new;
        c[i] = c_new;
        const float x = factored_u(gx, row_factor(r_new, r_new), col_factor(c_new));
        acc += x * x;
      }
    }
  }
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) ws[d.ws_clip + local] = total;
}

// One packed block, by its tile size (plan.h's pack sizes 1, 4, 8) and 16-byte loads (vec_ok).
template <typename T, int VEC>
__device__ __forceinline__ void sq_stats_packed_any(const TensorDesc& d, int pm, int64_t local, float* ws,
                                                    const Hyper& h, float inv, float* smem) {
  if (pm == 1) {
    sq_stats_packed_1x1<T>(d, local, ws, h, inv, smem + kPackSmemFloats - kWarps);
  } else if (pm == 4) {
    if (d.vec_ok) sq_stats_packed<T, VEC, true, 4>(d, local, ws, h, inv, smem);
    else sq_stats_packed<T, VEC, false, 4>(d, local, ws, h, inv, smem);
  } else {
    if (d.vec_ok) sq_stats_packed<T, VEC, true, 8>(d, local, ws, h, inv, smem);
    else sq_stats_packed<T, VEC, false, 8>(d, local, ws, h, inv, smem);
  }
}

// Phase 1 of the other tensors: flat chunks, and stripes of N > clip_cols row tile by row tile.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sq_stats_kernel(DeviceTable tab, float* ws, Hyper h,
                                                               const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ __align__(16) float smem[2 * kWarps * 32 * VEC];  // the row-tile path's column tiles
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_rest(tab);
  const TensorDesc& d = *blk.d;
  // Branches below are uniform per block.
  if (d.M == 0) {
    if (d.vec_ok) sq_stats_flat<T, VEC, true>(d, blk.local, ws, h, inv);
    else sq_stats_flat<T, VEC, false>(d, blk.local, ws, h, inv);
  } else {
    if (d.vec_ok) sq_stats_stripe<T, VEC, true>(d, blk.local, ws, h, inv, smem);
    else sq_stats_stripe<T, VEC, false>(d, blk.local, ws, h, inv, smem);
  }
}

// Phase 1 of the packed tensors (plan.h), a launch of their own: the blocks [first, first + grid) of the
// phase-kernel numbering (packed slots come last), so the other phase-1 kernels keep their registers.
template <typename T>
__global__ void __launch_bounds__(kThreads, kPackedMinBlocks) sq_stats_packed_kernel(DeviceTable tab, int32_t first,
                                                                                      float* ws, Hyper h,
                                                                                      const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ __align__(16) float smem[kPackSmemFloats];
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_main_from(tab, first);
  sq_stats_packed_any<T, VEC>(*blk.d, pack_of(*blk.d), blk.local, ws, h, inv, smem);
}

__global__ void __launch_bounds__(kThreads) sq_finalize_kernel(DeviceTable tab, float* ws, Hyper h,
                                                               const float* amp) {
  if (amp_found_inf(amp)) return;  // a skipped step: the partials are stale, c must not change
  const BlockRef blk = find_fin(tab);
  const TensorDesc& d = *blk.d;
  finalize_columns_and_means(d, blk.local, ws, d.col, d.row, d.stat, h.beta2, h.one_minus_beta2, h.eps1,
                             clip_from_w(d, tab));
}

}  // namespace

void sq_stats_launch(const Group& grp, const Hyper& h, float* ws, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "sq_stats", [&] {
    if (grp.reg_blocks > 0) {
      sq_stats_reg_kernel<scalar_t><<<grp.reg_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grp.rest_blocks > grp.packed_blocks) {  // the packed blocks end the numbering: not in this grid
      sq_stats_kernel<scalar_t><<<grp.rest_blocks - grp.packed_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grp.packed_blocks > 0) {
      sq_stats_packed_kernel<scalar_t><<<grp.packed_blocks, kThreads, 0, stream>>>(
          grp.tab, static_cast<int32_t>(grp.main_blocks - grp.packed_blocks), ws, h, amp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (grp.fin_blocks > 0) {
    sq_finalize_kernel<<<grp.fin_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace came
