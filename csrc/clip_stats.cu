// Phase 2, clip_stats: the RMS of the unclipped update u (mirror of triton_kernels/clip_stats.py and of
// "phase 2" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor):
//   factored:  u = g * rsqrt(r / mean_M(r))[:, :, None] * rsqrt(c)[:, None, :]
//   ndim < 2:  u = g * rsqrt(v)
//   clip_stats_kernel:    one partial sum of u^2 per block, into its own workspace slot
//   clip_finalize_kernel: divisor = max(1, sqrt(sum(u^2) / numel) / d) -> stats (the partials added in order)
// maximize does not matter here: u^2 is even in g. u is not stored: phase 3 recomputes it from g, which
// costs one more read of g but saves a full-size write and read.
//
// Memory per element: reads g (fp32 4 B, bf16/fp16 2 B); flat tensors also read v (4 B). r, c, mean_M(r)
// are O(rows + cols) and stay in L2.
// Launch: clip_stats_kernel one block per stripe / flat chunk, 256 threads (same blocks as sq_stats);
// clip_finalize_kernel one block per tensor of the launch-chunk.
// Determinism: fixed-order block trees and an in-order sum of the partials: bitwise reproducible.
#include "multi_tensor.cuh"

namespace came {
namespace {

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ float sum_u2_flat(const TensorTable& tab, int t, int64_t local) {
  const T* g = static_cast<const T*>(tab.g[t]);
  const float* v = tab.row[t];
  const int64_t end = std::min(tab.numel[t], (local + 1) * kFlatChunk);
  float acc = 0.0f;
  for (int64_t i = local * kFlatChunk + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    float gv[VEC], vv[VEC];
    load_vec<VEC, kVec>(g, i, end, gv);
    load_vec<VEC, kVec>(v, i, end, vv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (i + e < end) {  // v = 0 past the end would give 0 * inf
        const float u = vector_u(gv[e], vv[e]);
        acc += u * u;
      }
    }
  }
  return acc;
}

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ float sum_u2_stripe(const TensorTable& tab, int t, int64_t local) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(tab, t, local);
  const T* g = static_cast<const T*>(tab.g[t]);
  const float* r = tab.row[t];
  const float* c = tab.col[t] + s.b * s.N;
  const float mean_r = tab.stat[t][s.b];

  float row_f[kRowsPerWarp];  // rsqrt(r / mean_M(r)) of the warp's rows
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = s.row0 + warp + j * kWarps;
    row_f[j] = row < s.row_end ? row_factor(r[row], mean_r) : 0.0f;
  }

  float acc = 0.0f;
  for (int64_t col = lane * VEC; col < s.N; col += 32 * VEC) {
    float col_f[VEC];
    load_vec<VEC, kVec>(c, col, s.N, col_f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) col_f[e] = col_factor(col_f[e]);
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t row = s.row0 + warp + j * kWarps;
      if (row < s.row_end) {
        float x[VEC];
        load_vec<VEC, kVec>(g + row * s.N, col, s.N, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (col + e < s.N) {
            const float u = factored_u(x[e], row_f[j], col_f[e]);
            acc += u * u;
          }
        }
      }
    }
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) clip_stats_kernel(TensorTable tab, float* ws) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float scratch[kWarps];
  const BlockRef blk = find_block(tab);
  float acc;
  if (tab.M[blk.t] == 0) {
    acc = tab.vec_ok[blk.t] ? sum_u2_flat<T, VEC, true>(tab, blk.t, blk.local)
                            : sum_u2_flat<T, VEC, false>(tab, blk.t, blk.local);
  } else {
    acc = tab.vec_ok[blk.t] ? sum_u2_stripe<T, VEC, true>(tab, blk.t, blk.local)
                            : sum_u2_stripe<T, VEC, false>(tab, blk.t, blk.local);
  }
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) ws[tab.ws_off[blk.t] + blk.local] = total;
}

// One block per tensor: add its partials in order, then the divisor max(1, RMS(u) / d).
__global__ void __launch_bounds__(kThreads) clip_finalize_kernel(TensorTable tab, const float* ws, Hyper h) {
  __shared__ float scratch[kWarps];
  const int t = static_cast<int>(blockIdx.x);
  const int64_t numel = tab.numel[t];
  const int64_t parts = tab.M[t] > 0 ? (numel / (tab.M[t] * tab.N[t])) * ((tab.M[t] + kRows - 1) / kRows)
                                     : (numel + kFlatChunk - 1) / kFlatChunk;  // = main_blocks_of
  const float* part = ws + tab.ws_off[t];
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < parts; i += kThreads) acc += part[i];
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    const int64_t B = tab.M[t] > 0 ? numel / (tab.M[t] * tab.N[t]) : 0;
    tab.stat[t][2 * B] = clip_divisor(total, numel, h.clip_threshold);
  }
}

}  // namespace

void clip_stats_launch(const Group& grp, const Hyper& h, at::Tensor& stats, at::Tensor& ws) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "clip_stats", [&] {
    for_each_chunk(grp, [&](size_t first, size_t last) {
      TensorTable tab = make_table(grp, first, last, stats, WsLayout::kBlockPartials);
      const int64_t blocks = fill_blocks(tab, grp, first, main_blocks_of);
      clip_stats_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(tab, ws.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // The finalize grid is one block per tensor: blockIdx.x is the table slot.
      clip_finalize_kernel<<<tab.ntensors, kThreads, 0, stream>>>(tab, ws.data_ptr<float>(), h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace came
