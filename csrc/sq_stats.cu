// Phase 1, sq_stats: the EMAs of g^2 (mirror of triton_kernels/sq_stats.py and of "phase 1" in
// came_kernels/backends/torch_backend.py).
//
// Math (per tensor; factored = ndim >= 2, viewed as [B, M, N]):
//   factored:  r[b, i] = b2*r + (1-b2)*(mean_N(g^2)[b, i] + eps1)     sq_stats_kernel (row sums in-block)
//              c[b, j] = b2*c + (1-b2)*(mean_M(g^2)[b, j] + eps1)     sq_finalize_kernel (stripe partials)
//              mean_M(r)[b] -> stats                                   sq_finalize_kernel
//   ndim < 2:  v = b2*v + (1-b2)*(g^2 + eps1)                          sq_stats_kernel
// maximize does not matter here: g^2 is even in g.
//
// Memory per element: factored reads g (fp32 4 B, bf16/fp16 2 B) and writes one column partial per kRows
// rows (4/64 B); flat reads g and v and writes v (fp32 12 B, bf16 10 B).
// Launch: sq_stats_kernel one block per stripe (factored) or kFlatChunk chunk (flat), 256 threads, for up
// to kMaxTensors tensors per launch; sq_finalize_kernel one thread per column entry plus one warp per
// matrix, same tensors, one launch.
// Determinism: every sum has a fixed order (per-lane loops, shuffle trees, stripes added in order): two runs
// are bitwise identical.
#include "multi_tensor.cuh"

namespace came {
namespace {

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_flat(const TensorTable& tab, int t, int64_t local, const Hyper& h) {
  const T* g = static_cast<const T*>(tab.g[t]);
  float* v = tab.row[t];
  const int64_t end = std::min(tab.numel[t], (local + 1) * kFlatChunk);
  for (int64_t i = local * kFlatChunk + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    float gv[VEC], vv[VEC];
    load_vec<VEC, kVec>(g, i, end, gv);
    load_vec<VEC, kVec>(v, i, end, vv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) vv[e] = ema(vv[e], h.beta2, h.one_minus_beta2, gv[e] * gv[e] + h.eps1);
    store_vec<VEC, kVec>(v, i, end, vv);
  }
}

template <typename T, int VEC, bool kVec>
__device__ __forceinline__ void sq_stats_stripe(const TensorTable& tab, int t, int64_t local, float* ws,
                                                const Hyper& h) {
  __shared__ float tile[kWarps][32 * VEC];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(tab, t, local);
  const T* g = static_cast<const T*>(tab.g[t]);
  float* colpart = ws + tab.ws_off[t] + local * s.N;  // this stripe's partials of sum_i g^2[i, :]

  float row_acc[kRowsPerWarp];  // this lane's share of sum_j g^2[row, j] for the warp's rows
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) row_acc[j] = 0.0f;

  for (int64_t col0 = 0; col0 < s.N; col0 += 32 * VEC) {
    const int64_t col = col0 + lane * VEC;
    float col_acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) col_acc[e] = 0.0f;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t row = s.row0 + warp + j * kWarps;
      if (row < s.row_end && col < s.N) {
        float x[VEC];
        load_vec<VEC, kVec>(g + row * s.N, col, s.N, x);
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float sq = x[e] * x[e];
          col_acc[e] += sq;
          sum += sq;
        }
        row_acc[j] += sum;
      }
    }
    write_column_partials<VEC>(col_acc, tile, colpart, col0, s.N);
  }

  // Row sums are complete: update r in place.
  float* r = tab.row[t];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = s.row0 + warp + j * kWarps;
    const float sum = warp_sum(row_acc[j]);
    if (lane == 0 && row < s.row_end) {
      r[row] = ema(r[row], h.beta2, h.one_minus_beta2, mean_plus_eps(sum, static_cast<float>(s.N), h.eps1));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sq_stats_kernel(TensorTable tab, float* ws, Hyper h) {
  constexpr int VEC = 16 / sizeof(T);
  const BlockRef blk = find_block(tab);
  // Branches below are uniform per block.
  if (tab.M[blk.t] == 0) {
    if (tab.vec_ok[blk.t]) sq_stats_flat<T, VEC, true>(tab, blk.t, blk.local, h);
    else sq_stats_flat<T, VEC, false>(tab, blk.t, blk.local, h);
  } else {
    if (tab.vec_ok[blk.t]) sq_stats_stripe<T, VEC, true>(tab, blk.t, blk.local, ws, h);
    else sq_stats_stripe<T, VEC, false>(tab, blk.t, blk.local, ws, h);
  }
}

__global__ void __launch_bounds__(kThreads) sq_finalize_kernel(TensorTable tab, const float* ws, Hyper h) {
  const BlockRef blk = find_block(tab);
  finalize_columns_and_means(tab, blk.t, blk.local, ws, tab.col[blk.t], tab.row[blk.t], tab.stat[blk.t],
                             h.beta2, h.one_minus_beta2, h.eps1);
}

}  // namespace

void sq_stats_launch(const Group& grp, const Hyper& h, at::Tensor& stats, at::Tensor& ws) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "sq_stats", [&] {
    for_each_chunk(grp, [&](size_t first, size_t last) {
      TensorTable tab = make_table(grp, first, last, stats, WsLayout::kColumnPartials);
      const int64_t blocks = fill_blocks(tab, grp, first, main_blocks_of);
      if (blocks > 0) {
        sq_stats_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(tab, ws.data_ptr<float>(), h);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const int64_t fin_blocks = fill_blocks(tab, grp, first, finalize_blocks_of);
      if (fin_blocks > 0) {
        sq_finalize_kernel<<<fin_blocks, kThreads, 0, stream>>>(tab, ws.data_ptr<float>(), h);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace came
