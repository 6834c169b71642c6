// Phase 2, clip_stats: the RMS of the unclipped update u (mirror of triton_kernels/clip_stats.py and of
// "phase 2" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor):
//   factored:  u = g * rsqrt(r / mean_M(r))[:, :, None] * rsqrt(c)[:, None, :]
//   ndim < 2:  u = g * rsqrt(v)
//   clip_stats_kernel:    one partial sum of u^2 per block, into its own workspace slot
//   clip_finalize_kernel: divisor = max(1, sqrt(sum(u^2) / numel) / d) -> stats (the partials added in order)
//     bias correction (bias_scales, s_u): u_hat = s_u*u / max(1, s_u*RMS(u)/d), stored as the divisor
//     max(1, s_u*RMS(u)/d) / s_u, so that phase 3's u / divisor needs no change
// maximize does not matter here: u^2 is even in g. u is not stored: phase 3 recomputes it from g, which
// costs one more read of g but saves a full-size write and read. GradScaler (amp = [found_inf, 1/scale]):
// g = g * (1/scale) as it is loaded; both kernels return before writing anything when found_inf != 0.
//
// Memory per element: reads g (fp32 4 B, bf16/fp16 2 B); flat tensors also read v (4 B). r, c, mean_M(r)
// are O(rows + cols) and stay in L2. GradScaler: amp, 8 B per block; bias correction: s_u, 4 B per tensor.
// Launch: one clip_stats_kernel over the whole group, one block per stripe / flat chunk, 256 threads (the
// blocks of sq_stats); one clip_finalize_kernel, one block per tensor (blockIdx.x is the table slot).
// Determinism: fixed-order block trees and a fixed-pattern sum of the partials: bitwise reproducible.
#include "multi_tensor.cuh"

namespace came {
namespace {

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ float sum_u2_flat(const TensorDesc& d, int64_t local, float inv) {
  constexpr int kUnroll = 16 / VEC;  // 16 elements per thread per batch: the loads go out together
  const T* __restrict__ g = static_cast<const T*>(d.g);
  const float* __restrict__ v = d.row;
  const int64_t end = std::min(d.numel, (local + 1) * kFlatChunk);
  float acc = 0.0f;
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
        if (i0 + u * kThreads * VEC + e < end) {  // v = 0 past the end would give 0 * inf
          const float x = vector_u(unscaled(gv[u][e], inv), vv[u][e]);
          acc += x * x;
        }
      }
    }
  }
  return acc;
}

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ float sum_u2_stripe(const TensorDesc& d, int64_t local, float inv) {
  constexpr int kB = kReadBatch<kVec>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(d.M, d.N, local);
  const T* __restrict__ g = static_cast<const T*>(d.g);
  const float* __restrict__ r = d.row;
  const float* __restrict__ c = d.col + s.b * s.N;
  const float mean_r = d.stat[s.b];

  float row_f[kRowsPerWarp];  // rsqrt(r / mean_M(r)) of the warp's rows
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    row_f[j] = row < s.row_end ? row_factor(r[row], mean_r) : 0.0f;
  }

  float acc = 0.0f;
  for (int64_t col = lane * VEC; col < s.N; col += 32 * VEC) {
    float col_f[VEC];
    load_vec<VEC, kVec>(c, col, s.N, col_f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) col_f[e] = col_factor(col_f[e]);
#pragma unroll
    for (int j0 = 0; j0 < kRowsPerWarp; j0 += kB) {
      RowTile<T, VEC, kVec, kB> x;
      x.load(g, s, warp, j0, col);
#pragma unroll
      for (int jj = 0; jj < kB; ++jj) {
        if (x.ok[jj]) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            if (col + e < s.N) {  // padding lanes: c = 0 gives rsqrt(0) = inf, and 0 * inf = NaN
              const float u = factored_u(unscaled(x.at(jj, e), inv), row_f[j0 + jj], col_f[e]);
              acc += u * u;
            }
          }
        }
      }
    }
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) clip_stats_kernel(DeviceTable tab, float* ws, const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float scratch[kWarps];
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_main(tab);
  const TensorDesc& d = *blk.d;
  float acc;
  if (d.M == 0) {
    acc = d.vec_ok ? sum_u2_flat<T, VEC, true>(d, blk.local, inv) : sum_u2_flat<T, VEC, false>(d, blk.local, inv);
  } else {
    acc = d.vec_ok ? sum_u2_stripe<T, VEC, true>(d, blk.local, inv)
                   : sum_u2_stripe<T, VEC, false>(d, blk.local, inv);
  }
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) ws[d.ws_blk + blk.local] = total;
}

// One block per tensor: add its partials (thread i: partials i, i+256, ..., then a fixed block tree), then
// the divisor max(1, RMS(u) / d), or with bias correction max(1, s_u*RMS(u) / d) / s_u (came_math.cuh).
__global__ void __launch_bounds__(kThreads) clip_finalize_kernel(DeviceTable tab, const float* ws, Hyper h,
                                                                 const float* amp) {
  __shared__ float scratch[kWarps];
  if (amp_found_inf(amp)) return;  // a skipped step: leave the stats as they are
  const int t = static_cast<int>(blockIdx.x);
  const TensorDesc& d = tab.t[t];
  const int64_t parts = tab.main_start[t + 1] - tab.main_start[t];
  const float total = block_sum(strided_sum(ws + d.ws_blk, threadIdx.x, kThreads, parts), scratch);
  if (threadIdx.x == 0) {
    d.stat[2 * d.B] = h.bias_correction ? clip_divisor_scaled(total, d.numel, h.clip_threshold, d.scales[0])
                                        : clip_divisor(total, d.numel, h.clip_threshold);
  }
}

}  // namespace

void clip_stats_launch(const Group& grp, const Hyper& h, float* ws, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "clip_stats", [&] {
    clip_stats_kernel<scalar_t><<<grp.main_blocks, kThreads, 0, stream>>>(grp.tab, ws, amp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  clip_finalize_kernel<<<grp.tab.n, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace came
