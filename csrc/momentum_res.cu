// Phase 3, momentum_res: the clipped update, the momentum and the confidence residual (mirror of
// triton_kernels/momentum_res.py and of "phase 3" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor; divisor from clip_stats, u recomputed from g (no phase stores it); with bias correction the
// divisor already holds s_u, so u / divisor = s_u*u_clipped and m, the residual and R, C use it as it is):
//   u_hat = u / divisor;  m = b1*m + (1-b1)*u_hat                         momentum_res_kernel
//   factored:  res = (u_hat - m)^2 (new m)
//              R[b, i] = b3*R + (1-b3)*(mean_N(res)[b, i] + eps2)         momentum_res_kernel (row sums in-block)
//              C[b, j] = b3*C + (1-b3)*(mean_M(res)[b, j] + eps2)         res_finalize_kernel (stripe partials)
//              mean_M(R)[b] -> stats                                      res_finalize_kernel
//   packed (plan.h: ndim >= 3, M, N <= 8; a block = K whole matrices): u_hat, m, res as above (mean_M(r)
//              summed from r), then R, C of the block's matrices, all in the block  momentum_res_packed_kernel
//   ndim < 2:  momentum only (no confidence step).
// maximize: u is linear in g, so g is negated as it is loaded (compile-time switch). GradScaler (amp =
// [found_inf, 1/scale]): g = g * (1/scale) as it is loaded; both kernels return before writing anything when
// found_inf != 0.
//
// Opt-in low-precision momentum (came_step_lowbit; factored tensors whose m is bf16 or int8 codes): see
// momentum_res_stripe_lp. Groups with bf16 momenta but no int8 one take the default bodies with m loaded and
// stored as bf16 (kLowBf16, as triton_kernels' LB_BF16); the default kernels (kLowNone) are compiled as before.
//
// Memory per element: reads g (fp32 4 B, bf16/fp16 2 B), reads and writes m (8 B): fp32 12 B, bf16 10 B;
// flat tensors also read v (4 B). Column partials: 4/(64*tiles) B per element (a stripe's row tiles add
// into its partials). Packed: g and m as above, plus r, c read and R, C read and written per row and column
// ((M + N)/(M*N) of the elements, 12 B each): fp32 3x3 12 + 8 B, 1x1 12 + 24 = 36 B (every element its own
// row, column and matrix). GradScaler: amp, 8 B per block.
// Launch: one momentum_res_kernel over the whole group but its packed tensors, one block per stripe (tiles
// row tiles, run one after another) / flat chunk, 256 threads; one momentum_res_packed_kernel over the packed
// blocks (the end of the numbering, plan.h; a kernel of its own so that the stripe kernel keeps its
// registers): the rows' and columns' factors to shared memory, u_hat, m and the residual elementwise (16-byte
// loads, the residual to shared memory, 16 KB), then one thread per row, column and matrix; one
// res_finalize_kernel, column tiles summed over their stripes by 8 warps, and the means of R
// (multi_tensor.cuh). Both grids are independent of the tensor count (plan.h).
// Determinism: fixed-order sums throughout: bitwise reproducible.
#include "multi_tensor.cuh"

namespace came {
namespace {

template <typename T, int VEC, bool kVec, bool kMaximize>
__device__ __forceinline__ void momentum_flat(const TensorDesc& d, int64_t local, const Hyper& h, float inv) {
  constexpr int kUnroll = 16 / VEC;  // 16 elements per thread per batch: the loads go out together
  const T* __restrict__ g = static_cast<const T*>(d.g);
  const float* __restrict__ v = d.row;
  float* __restrict__ m = d.m;
  const float divisor = d.stat[0];  // flat tensors: B = 0, the divisor is the only stat
  const int64_t end = std::min(d.numel, (local + 1) * kFlatChunk);
  for (int64_t i0 = local * kFlatChunk + threadIdx.x * VEC; i0 < end; i0 += kUnroll * kThreads * VEC) {
    float gv[kUnroll][VEC], vv[kUnroll][VEC], mv[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vec<VEC, kVec>(g, i0 + u * kThreads * VEC, end, gv[u]);
      load_vec<VEC, kVec>(v, i0 + u * kThreads * VEC, end, vv[u]);
      load_vec<VEC, kVec>(m, i0 + u * kThreads * VEC, end, mv[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float gu = unscaled(gv[u][e], inv);
        const float gx = kMaximize ? -gu : gu;
        mv[u][e] = ema(mv[u][e], h.beta1, h.one_minus_beta1, clipped(vector_u(gx, vv[u][e]), divisor));
      }
      store_vec<VEC, kVec>(m, i0 + u * kThreads * VEC, end, mv[u]);
    }
  }
}

// One row tile s of a stripe; colpart: the stripe's partials of sum_i res[i, :] (add: after its first tile).
// MK: the momentum's storage, fp32 or (kMomBf16, with L: its rng) bf16, loaded as such and stored rounded
// stochastically (Philox stream 0, counter = element index) after the residual takes the unrounded m, as the
// _lp body does; the default kernels take MK = kMomFp32 only.
template <typename T, int VEC, bool kVec, bool kMaximize, int MK = kMomFp32>
__device__ __forceinline__ void momentum_res_row_tile(const TensorDesc& d, const Stripe& s,
                                                      float* __restrict__ colpart, bool add, int& buf,
                                                      float (&tiles)[2][kWarps][32 * VEC], const Hyper& h,
                                                      float inv, const LowbitDesc* L = nullptr) {
  // Two batches of 4 rows: g and m of 4 rows are 128-192 B in flight per thread, 64-96 KB per SM at two
  // blocks per SM; 8 rows at once would need more than the 128 registers that two blocks allow.
  constexpr int kB = kVec ? kRowsPerWarp / 2 : 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* __restrict__ g = static_cast<const T*>(d.g);
  float* __restrict__ m = d.m;
  [[maybe_unused]] int64_t key = 0, step = 0;
  if constexpr (MK == kMomBf16) {
    key = L->rng[0];
    step = L->rng[1];
  }
  const float* __restrict__ r = d.row;
  const float* __restrict__ c = d.col + s.b * s.N;
  const float mean_r = d.stat[s.b];
  const float divisor = d.stat[div_slot(d)];

  float row_f[kRowsPerWarp], row_acc[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    row_f[j] = row < s.row_end ? row_factor(r[row], mean_r) : 0.0f;
    row_acc[j] = 0.0f;
  }

  for (int64_t col0 = 0; col0 < s.N; col0 += 32 * VEC, buf ^= 1) {
    const int64_t col = col0 + lane * VEC;
    float col_f[VEC], col_acc[VEC];
    load_vec<VEC, kVec>(c, col, s.N, col_f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      col_f[e] = col_factor(col_f[e]);
      col_acc[e] = 0.0f;
    }
#pragma unroll
    for (int j0 = 0; j0 < kRowsPerWarp; j0 += kB) {
      RowTile<T, VEC, kVec, kB> gt;
      // fp32 m: 16-byte loads whenever the tensor's are
      std::conditional_t<MK == kMomBf16, Bf16Rows<VEC, kB>, RowTile<float, VEC, kVec, kB>> mt;
      gt.load(g, s, warp, j0, col);
      if constexpr (MK == kMomBf16) {
        mt.load(reinterpret_cast<const uint16_t*>(m), s, warp, j0, col);
      } else {
        mt.load(m, s, warp, j0, col);
      }
#pragma unroll
      for (int jj = 0; jj < kB; ++jj) {
        if (gt.ok[jj]) {
          float mv[VEC];
          float sum = 0.0f;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            if constexpr (MK == kMomBf16) {
              mv[e] = bf16_bits_to_float(mt.v[jj][e]);
            } else {
              mv[e] = mt.at(jj, e);
            }
            if (col + e < s.N) {  // padding lanes would compute 0 * rsqrt(0) = NaN
              const float gu = unscaled(gt.at(jj, e), inv);
              const float gx = kMaximize ? -gu : gu;
              const float u_hat = clipped(factored_u(gx, row_f[j0 + jj], col_f[e]), divisor);
              mv[e] = ema(mv[e], h.beta1, h.one_minus_beta1, u_hat);
              const float res = residual(u_hat, mv[e]);
              col_acc[e] += res;
              sum += res;
            }
          }
          row_acc[j0 + jj] += sum;
          if constexpr (MK == kMomBf16) {
            uint16_t* __restrict__ mb = reinterpret_cast<uint16_t*>(m);
            const int64_t base = warp_row(s, warp, j0 + jj) * s.N + col;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              if (col + e < s.N) {
                mb[base + e] = sr_bf16_bits(mv[e], random_bits(key, step, base + e, kStreamMomentum));
              }
            }
          } else {
            store_vec<VEC, kVec>(m + warp_row(s, warp, j0 + jj) * s.N, col, s.N, mv);
          }
        }
      }
    }
    write_column_partials<VEC>(col_acc, tiles[buf], colpart, col0, s.N, add);
  }

  // Row sums of the residual are complete: update R in place.
  float* __restrict__ R = d.res_row;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    const float sum = warp_sum(row_acc[j]);
    if (lane == 0 && row < s.row_end) {
      R[row] = ema(R[row], h.beta3, h.one_minus_beta3, mean_plus_eps(sum, static_cast<float>(s.N), h.eps2));
    }
  }
}

// `tiles`: the kernel's one shared buffer for every instantiation (each its own would pass the 48 KB of static
// shared memory a block may have once the bf16 bodies are compiled in too).
template <typename T, int VEC, bool kVec, bool kMaximize, int MK = kMomFp32>
__device__ __forceinline__ void momentum_res_stripe(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                    const Hyper& h, float inv, float (&tiles)[2][kWarps][32 * VEC],
                                                    const LowbitDesc* L = nullptr) {
  const Stripe s = stripe_of(d.M, d.N, local, d.tiles);
  float* __restrict__ colpart = ws + d.ws_col + local * s.N;
  int buf = 0;
  const int64_t nt = row_tiles_of(s);
  for (int64_t t = 0; t < nt; ++t) {
    momentum_res_row_tile<T, VEC, kVec, kMaximize, MK>(d, row_tile(s, t), colpart, t > 0, buf, tiles, h, inv, L);
  }
}

// The opt-in low-precision momentum of a factored tensor (MK: kMomBf16 or kMomInt8; L: its LowbitDesc):
// momentum_res_stripe's math and sums in the same order, one row at a time, with m loaded from its storage:
//   bf16: the new m is stored rounded stochastically (sr_bf16_bits, Philox stream 0, counter = element index)
//   int8: m = q * (absmax * fp32(1/127)); the new m is not stored here (its block's new absmax is known only
//         when every block is done): its |m| bits go to qmax by atomic max (exact in any order), the element
//         that starts a block copies the block's old absmax to qold, and param_step recomputes the new m and
//         stores its codes (triton_kernels/momentum_res.py does the same).
// The residual uses the new m before it is rounded, as the spec.
// `tiles`: one shared buffer for all four instantiations (each its own would pass the 48 KB of static
// shared memory a block may have).
template <typename T, int VEC, bool kVec, bool kMaximize, int MK>
__device__ __forceinline__ void momentum_res_row_tile_lp(const TensorDesc& d, const LowbitDesc& L, const Stripe& s,
                                                         float* __restrict__ colpart, bool add, int& buf,
                                                         const Hyper& h, float inv,
                                                         float (&tiles)[2][kWarps][32 * VEC]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* __restrict__ g = static_cast<const T*>(d.g);
  const float* __restrict__ r = d.row;
  const float* __restrict__ c = d.col + s.b * s.N;
  const float mean_r = d.stat[s.b];
  const float divisor = d.stat[div_slot(d)];
  int64_t key = 0, step = 0;
  if constexpr (MK == kMomBf16) {
    key = L.rng[0];
    step = L.rng[1];
  }

  float row_f[kRowsPerWarp], row_acc[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    row_f[j] = row < s.row_end ? row_factor(r[row], mean_r) : 0.0f;
    row_acc[j] = 0.0f;
  }

  for (int64_t col0 = 0; col0 < s.N; col0 += 32 * VEC, buf ^= 1) {
    const int64_t col = col0 + lane * VEC;
    float col_f[VEC], col_acc[VEC];
    load_vec<VEC, kVec>(c, col, s.N, col_f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      col_f[e] = col_factor(col_f[e]);
      col_acc[e] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      RowTile<T, VEC, kVec, 1> gt;
      gt.load(g, s, warp, j, col);
      if (gt.ok[0]) {
        const int64_t base = warp_row(s, warp, j) * s.N + col;
        float sum = 0.0f;
        int64_t qblk = -1;  // int8: the block of the elements gathered in qbits so far
        int32_t qbits = 0;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (col + e < s.N) {
            const int64_t i = base + e;
            float m_old;
            if constexpr (MK == kMomBf16) {
              m_old = bf16_bits_to_float(reinterpret_cast<const uint16_t*>(d.m)[i]);
            } else {
              m_old = dequantize(reinterpret_cast<const int8_t*>(d.m)[i], L.absmax[i / kQBlock]);
            }
            const float gu = unscaled(gt.at(0, e), inv);
            const float gx = kMaximize ? -gu : gu;
            const float u_hat = clipped(factored_u(gx, row_f[j], col_f[e]), divisor);
            const float mv = ema(m_old, h.beta1, h.one_minus_beta1, u_hat);
            const float res = residual(u_hat, mv);
            col_acc[e] += res;
            sum += res;
            if constexpr (MK == kMomBf16) {
              reinterpret_cast<uint16_t*>(d.m)[i] = sr_bf16_bits(mv, random_bits(key, step, i, kStreamMomentum));
            } else {
              const int64_t blk = i / kQBlock;
              if (blk != qblk) {
                if (qblk >= 0) atomicMax(L.qmax + qblk, qbits);
                qblk = blk;
                qbits = 0;
              }
              qbits = max(qbits, absmax_key(mv));
              if (i % kQBlock == 0) L.qold[blk] = L.absmax[blk];
            }
          }
        }
        if constexpr (MK == kMomInt8) {
          if (qblk >= 0) atomicMax(L.qmax + qblk, qbits);
        }
        row_acc[j] += sum;
      }
    }
    write_column_partials<VEC>(col_acc, tiles[buf], colpart, col0, s.N, add);
  }

  float* __restrict__ R = d.res_row;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    const float sum = warp_sum(row_acc[j]);
    if (lane == 0 && row < s.row_end) {
      R[row] = ema(R[row], h.beta3, h.one_minus_beta3, mean_plus_eps(sum, static_cast<float>(s.N), h.eps2));
    }
  }
}

template <typename T, int VEC, bool kVec, bool kMaximize, int MK>
__device__ __forceinline__ void momentum_res_stripe_lp(const TensorDesc& d, const LowbitDesc& L, int64_t local,
                                                       float* __restrict__ ws, const Hyper& h, float inv,
                                                       float (&tiles)[2][kWarps][32 * VEC]) {
  const Stripe s = stripe_of(d.M, d.N, local, d.tiles);
  float* __restrict__ colpart = ws + d.ws_col + local * s.N;
  int buf = 0;
  const int64_t nt = row_tiles_of(s);
  for (int64_t t = 0; t < nt; ++t) {
    momentum_res_row_tile_lp<T, VEC, kVec, kMaximize, MK>(d, L, row_tile(s, t), colpart, t > 0, buf, h, inv, tiles);
  }
}

// A packed block of PM >= 4 (multi_tensor.cuh): the rows' and columns' factors into shared memory, then
// elementwise u_hat, m (stored) and the residual (into shared memory), then R, C of the block's whole matrices,
// all in the block. The loads of g, m, r and c go out together, R and C's while the elementwise pass runs.
template <typename T, int VEC, bool kVec, bool kMaximize, int PM>
__device__ __forceinline__ void momentum_res_packed(const TensorDesc& d, int64_t local, const Hyper& h, float inv,
                                                    float* __restrict__ smem) {
  constexpr int kU = kPackVecs<VEC>, kIt = kPackIters<PM>;
  const Packed p = packed_of(d, local, PM);
  float* __restrict__ res = smem;              // the residual (u_hat - m)^2, [n]
  float* __restrict__ rs = smem + kPackElems;  // the rows' rsqrt(r / mean_M(r))
  float* __restrict__ cs = rs + kPackRows;     // the columns' rsqrt(c)
  const T* __restrict__ g = static_cast<const T*>(d.g) + p.e0;
  float* __restrict__ m = d.m + p.e0;
  const float* __restrict__ r = d.row + p.k0 * p.M;
  const float* __restrict__ c = d.col + p.k0 * p.N;
  float* __restrict__ R = d.res_row + p.k0 * p.M;
  float* __restrict__ C = d.res_col + p.k0 * p.N;
  const float divisor = d.stat[div_slot(d)];
  const int tid = static_cast<int>(threadIdx.x);
  float gv[kU][VEC], mv[kU][VEC];
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    load_vec<VEC, kVec>(g, packed_vec_start<VEC>(u), p.n, gv[u]);
    load_vec<VEC, kVec>(m, packed_vec_start<VEC>(u), p.n, mv[u]);
  }
  packed_factors<PM>(p, r, c, rs, cs);
  __syncthreads();
  float Rv[kIt], Cv[kIt];  // for after the next barrier
#pragma unroll
  for (int t = 0; t < kIt; ++t) {
    const int q = t * kThreads + tid;
    Rv[t] = q < p.rows ? R[q] : 0.0f;
    Cv[t] = q < p.cols ? C[q] : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int i0 = packed_vec_start<VEC>(u);
    PackedAt at(p.M, p.N, i0);
#pragma unroll
    for (int e = 0; e < VEC; ++e, at.next(p.M, p.N)) {
      if (i0 + e < p.n) {
        const float gu = unscaled(gv[u][e], inv);
        const float gx = kMaximize ? -gu : gu;
        const float u_hat = clipped(factored_u(gx, rs[at.q], cs[at.col()]), divisor);
        mv[u][e] = ema(mv[u][e], h.beta1, h.one_minus_beta1, u_hat);
        res[i0 + e] = residual(u_hat, mv[u][e]);
      }
    }
    store_vec<VEC, kVec>(m, i0, p.n, mv[u]);
  }
  __syncthreads();
  const float n_f = static_cast<float>(p.N), m_f = static_cast<float>(p.M);
#pragma unroll
  for (int t = 0; t < kIt; ++t) {
    const int q = t * kThreads + tid;
    if (q < p.rows) {  // R = b3*R + (1-b3)*(mean_N(res) + eps2)
      const float R_new = ema(Rv[t], h.beta3, h.one_minus_beta3,
                              mean_plus_eps(packed_row_sum<PM>(p, res, q, Same{}), n_f, h.eps2));
      R[q] = R_new;
    }
    if (q < p.cols) {  // C = b3*C + (1-b3)*(mean_M(res) + eps2)
      C[q] = ema(Cv[t], h.beta3, h.one_minus_beta3, mean_plus_eps(packed_col_sum<PM>(p, res, q, Same{}), m_f, h.eps2));
    }
  }
}

// A packed block of 1x1 matrices (PM = 1): element i is row, column and matrix k0 + i; the sums above are the
// residual itself and mean_M(r) = r: the same values elementwise. kB elements of six arrays in flight.
template <typename T, bool kMaximize>
__device__ __forceinline__ void momentum_res_packed_1x1(const TensorDesc& d, int64_t local, const Hyper& h,
                                                        float inv) {
  constexpr int kU = static_cast<int>(kPackElems) / kThreads, kB = 4;
  const Packed p = packed_of(d, local, 1);
  const T* __restrict__ g = static_cast<const T*>(d.g) + p.e0;
  float* __restrict__ m = d.m + p.e0;
  const float* __restrict__ r = d.row + p.k0;
  const float* __restrict__ c = d.col + p.k0;
  float* __restrict__ R = d.res_row + p.k0;
  float* __restrict__ C = d.res_col + p.k0;
  const float divisor = d.stat[div_slot(d)];
#pragma unroll
  for (int u0 = 0; u0 < kU; u0 += kB) {
    float gv[kB], mv[kB], rv[kB], cv[kB], Rv[kB], Cv[kB];
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int i = (u0 + b) * kThreads + threadIdx.x;
      const bool ok = i < p.n;
      gv[b] = ok ? static_cast<float>(g[i]) : 0.0f;
      mv[b] = ok ? m[i] : 0.0f;
      rv[b] = ok ? r[i] : 0.0f;
      cv[b] = ok ? c[i] : 0.0f;
      Rv[b] = ok ? R[i] : 0.0f;
      Cv[b] = ok ? C[i] : 0.0f;
    }
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int i = (u0 + b) * kThreads + threadIdx.x;
      if (i < p.n) {
        const float gu = unscaled(gv[b], inv);
        const float gx = kMaximize ? -gu : gu;
        const float u_hat = clipped(factored_u(gx, row_factor(rv[b], rv[b]), col_factor(cv[b])), divisor);
        const float m_new = ema(mv[b], h.beta1, h.one_minus_beta1, u_hat);
        const float res = residual(u_hat, m_new);
        const float R_new = ema(Rv[b], h.beta3, h.one_minus_beta3, mean_plus_eps(res, 1.0f, h.eps2));
        m[i] = m_new;
        R[i] = R_new;
        C[i] = ema(Cv[b], h.beta3, h.one_minus_beta3, mean_plus_eps(res, 1.0f, h.eps2));
      }
    }
  }
}

template <typename T, int VEC, bool kMaximize>
__device__ __forceinline__ void momentum_res_packed_any(const TensorDesc& d, int pm, int64_t local, const Hyper& h,
                                                        float inv, float* smem) {
  if (pm == 1) {
    momentum_res_packed_1x1<T, kMaximize>(d, local, h, inv);
  } else if (pm == 4) {
    if (d.vec_ok) momentum_res_packed<T, VEC, true, kMaximize, 4>(d, local, h, inv, smem);
    else momentum_res_packed<T, VEC, false, kMaximize, 4>(d, local, h, inv, smem);
  } else {
    if (d.vec_ok) momentum_res_packed<T, VEC, true, kMaximize, 8>(d, local, h, inv, smem);
    else momentum_res_packed<T, VEC, false, kMaximize, 8>(d, local, h, inv, smem);
  }
}

// kLow (lowbit.h): kLowNone, the default kernel; kLowBf16, the group has bf16 momenta but no int8 one (tab.lp
// is set): the default bodies, with m in bf16 where a tensor's is; kLowAll, the _lp bodies for the low-bit
// momenta. One block per SM where the bodies need more than 128 registers: the _lp ones, and the bf16
// momentum's with 16-bit params (8 values per vector and their Philox draws spilled 68-172 B at 128).
template <typename T, int kLow>
constexpr int kMomentumResBlocks = kLow == kLowAll || (kLow == kLowBf16 && sizeof(T) == 2) ? 1 : 2;
template <typename T, bool kMaximize, int kLow>
__global__ void __launch_bounds__(kThreads, (kMomentumResBlocks<T, kLow>)) momentum_res_kernel(
    DeviceTable tab, float* ws, Hyper h, const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float tiles[2][kWarps][32 * VEC];
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_main(tab);
  const TensorDesc& d = *blk.d;
  if (d.M == 0) {
    if (d.vec_ok) momentum_flat<T, VEC, true, kMaximize>(d, blk.local, h, inv);
    else momentum_flat<T, VEC, false, kMaximize>(d, blk.local, h, inv);
    return;
  }
  if constexpr (kLow == kLowBf16) {
    const LowbitDesc& L = tab.lp[blk.d - tab.t];
    if (L.mkind == kMomBf16) {
      if (d.vec_ok) momentum_res_stripe<T, VEC, true, kMaximize, kMomBf16>(d, blk.local, ws, h, inv, tiles, &L);
      else momentum_res_stripe<T, VEC, false, kMaximize, kMomBf16>(d, blk.local, ws, h, inv, tiles, &L);
      return;
    }
  }
  if constexpr (kLow == kLowAll) {
    const LowbitDesc& L = tab.lp[blk.d - tab.t];
    if (L.mkind == kMomBf16) {
      if (d.vec_ok) momentum_res_stripe_lp<T, VEC, true, kMaximize, kMomBf16>(d, L, blk.local, ws, h, inv, tiles);
      else momentum_res_stripe_lp<T, VEC, false, kMaximize, kMomBf16>(d, L, blk.local, ws, h, inv, tiles);
      return;
    }
    if (L.mkind == kMomInt8) {
      if (d.vec_ok) momentum_res_stripe_lp<T, VEC, true, kMaximize, kMomInt8>(d, L, blk.local, ws, h, inv, tiles);
      else momentum_res_stripe_lp<T, VEC, false, kMaximize, kMomInt8>(d, L, blk.local, ws, h, inv, tiles);
      return;
    }
  }
  if (d.vec_ok) momentum_res_stripe<T, VEC, true, kMaximize>(d, blk.local, ws, h, inv, tiles);
  else momentum_res_stripe<T, VEC, false, kMaximize>(d, blk.local, ws, h, inv, tiles);
}

// Phase 3 of the packed tensors (plan.h), a launch of their own over the blocks [first, first + grid).
template <typename T, bool kMaximize>
__global__ void __launch_bounds__(kThreads, kPackedMinBlocks) momentum_res_packed_kernel(DeviceTable tab,
                                                                                          int32_t first, Hyper h,
                                                                                          const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ __align__(16) float smem[kPackSmemFloats];
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_main_from(tab, first);
  momentum_res_packed_any<T, VEC, kMaximize>(*blk.d, pack_of(*blk.d), blk.local, h, inv, smem);
}

__global__ void __launch_bounds__(kThreads) res_finalize_kernel(DeviceTable tab, float* ws, Hyper h,
                                                                const float* amp) {
  if (amp_found_inf(amp)) return;  // a skipped step: C must not change
  const BlockRef blk = find_fin(tab);
  const TensorDesc& d = *blk.d;
  // mean_M(R) goes after mean_M(r) in this tensor's stats slice.
  finalize_columns_and_means(d, blk.local, ws, d.res_col, d.res_row, d.stat + d.B, h.beta3, h.one_minus_beta3,
                             h.eps2, /*with_w=*/false);
}

}  // namespace

void momentum_res_launch(const Group& grp, const Hyper& h, float* ws, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "momentum_res", [&] {
    CAME_BOOL_SWITCH(h.maximize, kMaximize, [&] {
      const int64_t grid = grp.main_blocks - grp.packed_blocks;  // the packed blocks end the numbering
      if (grid > 0) {
        if (!grp.lowbit_momentum) {
          momentum_res_kernel<scalar_t, kMaximize, kLowNone><<<grid, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
        } else if (grp.q_blocks == 0) {  // bf16 momenta, no int8 one
          momentum_res_kernel<scalar_t, kMaximize, kLowBf16><<<grid, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
        } else {
          momentum_res_kernel<scalar_t, kMaximize, kLowAll><<<grid, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (grp.packed_blocks > 0) {
        momentum_res_packed_kernel<scalar_t, kMaximize><<<grp.packed_blocks, kThreads, 0, stream>>>(
            grp.tab, static_cast<int32_t>(grid), h, amp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  if (grp.fin_blocks > 0) {
    res_finalize_kernel<<<grp.fin_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace came
