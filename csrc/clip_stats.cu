// Phase 2, clip_stats: the RMS of the unclipped update u (mirror of triton_kernels/clip_stats.py and of
// "phase 2" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor):
//   factored:  u = g * rsqrt(r / mean_M(r))[:, :, None] * rsqrt(c)[:, None, :]
//   ndim < 2:  u = g * rsqrt(v)
//   sum(u^2), in fp64, in a fixed order:
//     factored, N <= clip_cols (8192): sum over b, j of mean_M(r)[b] * W[b, j], W from sq_stats (the exact
//       identity of came_math.cuh: nothing full-size is read here)
//     ndim < 2 and packed tensors (plan.h): the sum of sq_stats' per-block sums of u^2
//     factored, N > clip_cols: clip_stats_kernel re-reads g, r, c for these tensors only (one partial sum of
//       u^2 per block, into its own workspace slot; not launched when the group has none), then the sum of
//       those slots
//   clip_finalize_kernel: divisor = max(1, sqrt(sum(u^2) / numel) / d) -> stats
//     bias correction (bias_scales, s_u): u_hat = s_u*u / max(1, s_u*RMS(u)/d), stored as the divisor
//     max(1, s_u*RMS(u)/d) / s_u, so that phase 3's u / divisor needs no change
// maximize does not matter here: u^2 is even in g. u is not stored: phase 3 recomputes it from g. GradScaler
// (amp = [found_inf, 1/scale]): g = g * (1/scale) as it is loaded; both kernels return before writing
// anything when found_inf != 0. A NaN or inf in g makes sum(u^2), and so the divisor, NaN.
//
// Memory per element: nothing for tensors phase 1 covers (the finalize reads W, B*N doubles, and
// mean_M(r)); N > clip_cols: reads g (fp32 4 B, bf16/fp16 2 B), r and c are O(rows + cols) and stay in L2.
// GradScaler: amp, 8 B per block; bias correction: s_u, 4 B per tensor.
// Launch: clip_stats_kernel (only when the group has a tensor with N > clip_cols) over those tensors' blocks
// (plan.h's clip_start: their phase-kernel stripes), 256 threads; one clip_finalize_kernel, one block per
// tensor (blockIdx.x is the table slot).
// Determinism: fixed-order block trees and a fixed-pattern sum of the partials: bitwise reproducible.
#include "multi_tensor.cuh"

namespace came {
namespace {

// This thread's share of sum(u^2) over one row tile of a stripe.
template <typename T, int VEC, bool kVec>
__device__ __forceinline__ float sum_u2_row_tile(const TensorDesc& d, const Stripe& s, float inv) {
  constexpr int kB = kReadBatch<kVec>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ float sum_u2_stripe(const TensorDesc& d, int64_t local, float inv) {
  const Stripe s = stripe_of(d.M, d.N, local, d.tiles);
  float acc = 0.0f;
  const int64_t nt = row_tiles_of(s);
  for (int64_t t = 0; t < nt; ++t) acc += sum_u2_row_tile<T, VEC, kVec>(d, row_tile(s, t), inv);
  return acc;
}

// The blocks of the factored tensors with N > clip_cols (find_clip): one sum of u^2 per block.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) clip_stats_kernel(DeviceTable tab, float* ws, const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float scratch[kWarps];
  if (amp_found_inf(amp)) return;  // GradScaler: skip the whole step, else unscale g by inv
  const float inv = amp_inv_scale(amp);
  const BlockRef blk = find_clip(tab);
  const TensorDesc& d = *blk.d;
  const float acc = d.vec_ok ? sum_u2_stripe<T, VEC, true>(d, blk.local, inv)
                             : sum_u2_stripe<T, VEC, false>(d, blk.local, inv);
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) ws[d.ws_clip + blk.local] = total;
}

// sum(u^2) of one tensor in fp64, this thread's share: mean_M(r)[b] * W[b, j] over the matrices b and the
// columns j = thread, thread + 256, ..., or the fp32 block sums (flat tensors, N > clip_cols) at that stride.
__device__ __forceinline__ double sum_u2_share(const TensorDesc& d, const DeviceTable& tab, int64_t parts,
                                               const float* __restrict__ ws) {
  double acc = 0.0;
  if (clip_from_w(d, tab)) {
    const double* __restrict__ w = reinterpret_cast<const double*>(ws + d.ws_clip);
    for (int64_t b = 0; b < d.B; ++b) {
      const float mean_r = d.stat[b];
      for (int64_t j = threadIdx.x; j < d.N; j += kThreads) acc += clip_row_term(mean_r, w[b * d.N + j]);
    }
  } else {
    const float* __restrict__ part = ws + d.ws_clip;
    for (int64_t k = threadIdx.x; k < parts; k += kThreads) acc += static_cast<double>(part[k]);
  }
  return acc;
}

// One block per tensor: its sum(u^2) (each thread's share, then a fixed block tree), then the divisor
// max(1, RMS(u) / d), or with bias correction max(1, s_u*RMS(u) / d) / s_u (came_math.cuh).
__global__ void __launch_bounds__(kThreads) clip_finalize_kernel(DeviceTable tab, const float* ws, Hyper h,
                                                                 const float* amp) {
  __shared__ double scratch[kWarps];
  if (amp_found_inf(amp)) return;  // a skipped step: leave the stats as they are
  const int t = static_cast<int>(blockIdx.x);
  const TensorDesc& d = tab.t[t];
  const int64_t parts = tab.main_start[t + 1] - tab.main_start[t];
  const double total = block_sum(sum_u2_share(d, tab, parts, ws), scratch);
  if (threadIdx.x == 0) {
    d.stat[div_slot(d)] = h.bias_correction
                          ? clip_divisor_scaled(total, d.numel, h.clip_threshold, tab.scales[2 * d.index])
                          : clip_divisor(total, d.numel, h.clip_threshold);
  }
}

}  // namespace

void clip_stats_launch(const Group& grp, const Hyper& h, float* ws, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (grp.clip_blocks > 0) {  // tensors with N > clip_cols only
    CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "clip_stats", [&] {
      clip_stats_kernel<scalar_t><<<grp.clip_blocks, kThreads, 0, stream>>>(grp.tab, ws, amp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  clip_finalize_kernel<<<grp.tab.n, kThreads, 0, stream>>>(grp.tab, ws, h, amp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace came
