// Phase 1, sq_stats: the EMAs of g^2 (mirror of triton_kernels/sq_stats.py and of "phase 1" in
// came_kernels/backends/torch_backend.py).
//
// Math (per tensor; factored = ndim >= 2, viewed as [B, M, N]):
//   factored:  r[b, i] = b2*r + (1-b2)*(mean_N(g^2)[b, i] + eps1)     sq_stats_kernel (row sums in-block)
//              c[b, j] = b2*c + (1-b2)*(mean_M(g^2)[b, j] + eps1)     sq_finalize_kernel (stripe partials)
//              mean_M(r)[b] -> stats                                   sq_finalize_kernel
//   ndim < 2:  v = b2*v + (1-b2)*(g^2 + eps1)                          sq_stats_kernel
// maximize does not matter here: g^2 is even in g. GradScaler (amp = [found_inf, 1/scale]): g = g * (1/scale)
// as it is loaded; both kernels return before writing anything when found_inf != 0.
//
// Memory per element: factored reads g (fp32 4 B, bf16/fp16 2 B) and writes one column partial per kRows
// rows (4/64 B); flat reads g and v and writes v (fp32 12 B, bf16 10 B). GradScaler: amp, 8 B per block.
// Launch: one sq_stats_kernel over the whole group, one block per stripe (factored) or kFlatChunk chunk
// (flat), 256 threads; one sq_finalize_kernel, column tiles summed over their stripes by 8 warps, and the
// means of r (multi_tensor.cuh). Both grids are independent of the tensor count (plan.h).
// Determinism: every sum has a fixed order (per-lane loops, shuffle trees, the stripes in a fixed pattern):
// two runs are bitwise identical.
#include "multi_tensor.cuh"

namespace came {
namespace {

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_flat(const TensorDesc& d, int64_t local, const Hyper& h, float inv) {
  constexpr int kUnroll = 16 / VEC;  // 16 elements per thread per batch: the loads go out together
  const T* __restrict__ g = static_cast<const T*>(d.g);
  float* __restrict__ v = d.row;
  const int64_t end = std::min(d.numel, (local + 1) * kFlatChunk);
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
      }
      store_vec<VEC, kVec>(v, i0 + u * kThreads * VEC, end, vv[u]);
    }
  }
}

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_stripe(const TensorDesc& d, int64_t local, float* __restrict__ ws,
                                                const Hyper& h, float inv) {
  constexpr int kB = kReadBatch<kVec>;
  __shared__ float tiles[2][kWarps][32 * VEC];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(d.M, d.N, local);
  const T* __restrict__ g = static_cast<const T*>(d.g);
  float* __restrict__ r = d.row;
  float* __restrict__ colpart = ws + d.ws_col + local * s.N;  // this stripe's partials of sum_i g^2[i, :]

  float row_acc[kRowsPerWarp];  // this lane's share of sum_j g^2[row, j] for the warp's rows
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) row_acc[j] = 0.0f;

  int buf = 0;
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
    write_column_partials<VEC>(col_acc, tiles[buf], colpart, col0, s.N);
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

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sq_stats_kernel(DeviceTable tab, float* ws, Hyper h,
                                                               const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_main(tab);
  const TensorDesc& d = *blk.d;
  // Branches below are uniform per block.
  if (d.M == 0) {
    if (d.vec_ok) sq_stats_flat<T, VEC, true>(d, blk.local, h, inv);
    else sq_stats_flat<T, VEC, false>(d, blk.local, h, inv);
  } else {
    if (d.vec_ok) sq_stats_stripe<T, VEC, true>(d, blk.local, ws, h, inv);
    else sq_stats_stripe<T, VEC, false>(d, blk.local, ws, h, inv);
  }
}

__global__ void __launch_bounds__(kThreads) sq_finalize_kernel(DeviceTable tab, const float* ws, Hyper h,
                                                               const float* amp) {
  if (amp_found_inf(amp)) return;  // a skipped step: the partials are stale, c must not change
  const BlockRef blk = find_fin(tab);
  const TensorDesc& d = *blk.d;
  finalize_columns_and_means(d, blk.local, ws, d.col, d.row, d.stat, h.beta2, h.one_minus_beta2, h.eps1);
}

}  // namespace

void sq_stats_launch(const Group& grp, const Hyper& h, float* ws, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "sq_stats", [&] {
    sq_stats_kernel<scalar_t><<<grp.main_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (grp.fin_blocks > 0) {
    sq_finalize_kernel<<<grp.fin_blocks, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace came
