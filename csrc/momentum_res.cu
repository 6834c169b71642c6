// Phase 3, momentum_res: the clipped update, the momentum and the confidence residual (mirror of
// triton_kernels/momentum_res.py and of "phase 3" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor; divisor from clip_stats, u recomputed from g as in clip_stats; with bias correction the
// divisor already holds s_u, so u / divisor = s_u*u_clipped and m, the residual and R, C use it as it is):
//   u_hat = u / divisor;  m = b1*m + (1-b1)*u_hat                         momentum_res_kernel
//   factored:  res = (u_hat - m)^2 (new m)
//              R[b, i] = b3*R + (1-b3)*(mean_N(res)[b, i] + eps2)         momentum_res_kernel (row sums in-block)
//              C[b, j] = b3*C + (1-b3)*(mean_M(res)[b, j] + eps2)         res_finalize_kernel (stripe partials)
//              mean_M(R)[b] -> stats                                      res_finalize_kernel
//   ndim < 2:  momentum only (no confidence step).
// maximize: u is linear in g, so g is negated as it is loaded (compile-time switch). GradScaler (amp =
// [found_inf, 1/scale]): g = g * (1/scale) as it is loaded; both kernels return before writing anything when
// found_inf != 0.
//
// Memory per element: reads g (fp32 4 B, bf16/fp16 2 B), reads and writes m (8 B): fp32 12 B, bf16 10 B;
// flat tensors also read v (4 B). Column partials: 4/64 B per element. GradScaler: amp, 8 B per block.
// Launch: one momentum_res_kernel over the whole group, one block per stripe / flat chunk, 256 threads; one
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

template <typename T, int VEC, bool kVec, bool kMaximize>
__device__ __forceinline__ void momentum_res_stripe(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                    const Hyper& h, float inv) {
  // Two batches of 4 rows: g and m of 4 rows are 128-192 B in flight per thread, 64-96 KB per SM at two
  // blocks per SM; 8 rows at once would need more than the 128 registers that two blocks allow.
  constexpr int kB = kVec ? kRowsPerWarp / 2 : 1;
  __shared__ float tiles[2][kWarps][32 * VEC];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(d.M, d.N, local);
  const T* __restrict__ g = static_cast<const T*>(d.g);
  float* __restrict__ m = d.m;
  const float* __restrict__ r = d.row;
  const float* __restrict__ c = d.col + s.b * s.N;
  const float mean_r = d.stat[s.b];
  const float divisor = d.stat[2 * d.B];
  float* __restrict__ colpart = ws + d.ws_col + local * s.N;  // this stripe's partials of sum_i res[i, :]

  float row_f[kRowsPerWarp], row_acc[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    row_f[j] = row < s.row_end ? row_factor(r[row], mean_r) : 0.0f;
    row_acc[j] = 0.0f;
  }

  int buf = 0;
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
      RowTile<float, VEC, kVec, kB> mt;  // m is fp32: 16-byte loads whenever the tensor's are
      gt.load(g, s, warp, j0, col);
      mt.load(m, s, warp, j0, col);
#pragma unroll
      for (int jj = 0; jj < kB; ++jj) {
        if (gt.ok[jj]) {
          float mv[VEC];
          float sum = 0.0f;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            mv[e] = mt.at(jj, e);
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
          store_vec<VEC, kVec>(m + warp_row(s, warp, j0 + jj) * s.N, col, s.N, mv);
        }
      }
    }
    write_column_partials<VEC>(col_acc, tiles[buf], colpart, col0, s.N);
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

template <typename T, bool kMaximize>
__global__ void __launch_bounds__(kThreads, 2) momentum_res_kernel(DeviceTable tab, float* ws, Hyper h,
                                                                   const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_main(tab);
  const TensorDesc& d = *blk.d;
  if (d.M == 0) {
    if (d.vec_ok) momentum_flat<T, VEC, true, kMaximize>(d, blk.local, h, inv);
    else momentum_flat<T, VEC, false, kMaximize>(d, blk.local, h, inv);
  } else {
    if (d.vec_ok) momentum_res_stripe<T, VEC, true, kMaximize>(d, blk.local, ws, h, inv);
    else momentum_res_stripe<T, VEC, false, kMaximize>(d, blk.local, ws, h, inv);
  }
}

__global__ void __launch_bounds__(kThreads) res_finalize_kernel(DeviceTable tab, const float* ws, Hyper h,
                                                                const float* amp) {
  if (amp_found_inf(amp)) return;  // a skipped step: C must not change
  const BlockRef blk = find_fin(tab);
  const TensorDesc& d = *blk.d;
  // mean_M(R) goes after mean_M(r) in this tensor's stats slice.
  finalize_columns_and_means(d, blk.local, ws, d.res_col, d.res_row, d.stat + d.B, h.beta3, h.one_minus_beta3,
                             h.eps2);
}

}  // namespace

void momentum_res_launch(const Group& grp, const Hyper& h, float* ws, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "momentum_res", [&] {
    CAME_BOOL_SWITCH(h.maximize, kMaximize, [&] {
      momentum_res_kernel<scalar_t, kMaximize><<<grp.main_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (grp.fin_blocks > 0) {
    res_finalize_kernel<<<grp.fin_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace came
