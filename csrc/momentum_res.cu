// Phase 3, momentum_res: the clipped update, the momentum and the confidence residual (mirror of
// triton_kernels/momentum_res.py and of "phase 3" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor; divisor from clip_stats, u recomputed from g as in clip_stats):
//   u_hat = u / divisor;  m = b1*m + (1-b1)*u_hat                         momentum_res_kernel
//   factored:  res = (u_hat - m)^2 (new m)
//              R[b, i] = b3*R + (1-b3)*(mean_N(res)[b, i] + eps2)         momentum_res_kernel (row sums in-block)
//              C[b, j] = b3*C + (1-b3)*(mean_M(res)[b, j] + eps2)         res_finalize_kernel (stripe partials)
//              mean_M(R)[b] -> stats                                      res_finalize_kernel
//   ndim < 2:  momentum only (no confidence step).
// maximize: u is linear in g, so g is negated as it is loaded (compile-time switch).
//
// Memory per element: reads g (fp32 4 B, bf16/fp16 2 B), reads and writes m (8 B): fp32 12 B, bf16 10 B;
// flat tensors also read v (4 B). Column partials: 4/64 B per element.
// Launch: momentum_res_kernel one block per stripe / flat chunk, 256 threads; res_finalize_kernel one thread
// per column entry plus one warp per matrix.
// Determinism: fixed-order sums throughout: bitwise reproducible.
#include "multi_tensor.cuh"

namespace came {
namespace {

template <typename T, int VEC, bool kVec, bool kMaximize>
__device__ __forceinline__ void momentum_flat(const TensorTable& tab, int t, int64_t local, const Hyper& h) {
  const T* g = static_cast<const T*>(tab.g[t]);
  const float* v = tab.row[t];
  float* m = tab.m[t];
  const float divisor = tab.stat[t][0];  // flat tensors: B = 0, the divisor is the only stat
  const int64_t end = std::min(tab.numel[t], (local + 1) * kFlatChunk);
  for (int64_t i = local * kFlatChunk + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    float gv[VEC], vv[VEC], mv[VEC];
    load_vec<VEC, kVec>(g, i, end, gv);
    load_vec<VEC, kVec>(v, i, end, vv);
    load_vec<VEC, kVec>(m, i, end, mv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float gx = kMaximize ? -gv[e] : gv[e];
      mv[e] = ema(mv[e], h.beta1, h.one_minus_beta1, clipped(vector_u(gx, vv[e]), divisor));
    }
    store_vec<VEC, kVec>(m, i, end, mv);
  }
}

template <typename T, int VEC, bool kVec, bool kMaximize>
__device__ __forceinline__ void momentum_res_stripe(const TensorTable& tab, int t, int64_t local, float* ws,
                                                    const Hyper& h) {
  __shared__ float tile[kWarps][32 * VEC];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(tab, t, local);
  const int64_t B = tab.numel[t] / (s.M * s.N);
  const T* g = static_cast<const T*>(tab.g[t]);
  float* m = tab.m[t];
  const float* r = tab.row[t];
  const float* c = tab.col[t] + s.b * s.N;
  const float mean_r = tab.stat[t][s.b];
  const float divisor = tab.stat[t][2 * B];
  float* colpart = ws + tab.ws_off[t] + local * s.N;  // this stripe's partials of sum_i res[i, :]

  float row_f[kRowsPerWarp], row_acc[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = s.row0 + warp + j * kWarps;
    row_f[j] = row < s.row_end ? row_factor(r[row], mean_r) : 0.0f;
    row_acc[j] = 0.0f;
  }

  for (int64_t col0 = 0; col0 < s.N; col0 += 32 * VEC) {
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
      const int64_t row = s.row0 + warp + j * kWarps;
      if (row < s.row_end && col < s.N) {
        float gv[VEC], mv[VEC];
        load_vec<VEC, kVec>(g + row * s.N, col, s.N, gv);
        load_vec<VEC, kVec>(m + row * s.N, col, s.N, mv);
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (col + e < s.N) {  // padding lanes would compute 0 * rsqrt(0) = NaN
            const float gx = kMaximize ? -gv[e] : gv[e];
            const float u_hat = clipped(factored_u(gx, row_f[j], col_f[e]), divisor);
            mv[e] = ema(mv[e], h.beta1, h.one_minus_beta1, u_hat);
            const float res = residual(u_hat, mv[e]);
            col_acc[e] += res;
            sum += res;
          }
        }
        row_acc[j] += sum;
        store_vec<VEC, kVec>(m + row * s.N, col, s.N, mv);
      }
    }
    write_column_partials<VEC>(col_acc, tile, colpart, col0, s.N);
  }

  // Row sums of the residual are complete: update R in place.
  float* R = tab.res_row[t];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = s.row0 + warp + j * kWarps;
    const float sum = warp_sum(row_acc[j]);
    if (lane == 0 && row < s.row_end) {
      R[row] = ema(R[row], h.beta3, h.one_minus_beta3, mean_plus_eps(sum, static_cast<float>(s.N), h.eps2));
    }
  }
}

template <typename T, bool kMaximize>
__global__ void __launch_bounds__(kThreads) momentum_res_kernel(TensorTable tab, float* ws, Hyper h) {
  constexpr int VEC = 16 / sizeof(T);
  const BlockRef blk = find_block(tab);
  if (tab.M[blk.t] == 0) {
    if (tab.vec_ok[blk.t]) momentum_flat<T, VEC, true, kMaximize>(tab, blk.t, blk.local, h);
    else momentum_flat<T, VEC, false, kMaximize>(tab, blk.t, blk.local, h);
  } else {
    if (tab.vec_ok[blk.t]) momentum_res_stripe<T, VEC, true, kMaximize>(tab, blk.t, blk.local, ws, h);
    else momentum_res_stripe<T, VEC, false, kMaximize>(tab, blk.t, blk.local, ws, h);
  }
}

__global__ void __launch_bounds__(kThreads) res_finalize_kernel(TensorTable tab, const float* ws, Hyper h) {
  const BlockRef blk = find_block(tab);
  const int64_t B = tab.numel[blk.t] / (tab.M[blk.t] * tab.N[blk.t]);
  // mean_M(R) goes after mean_M(r) in this tensor's stats slice.
  finalize_columns_and_means(tab, blk.t, blk.local, ws, tab.res_col[blk.t], tab.res_row[blk.t],
                             tab.stat[blk.t] + B, h.beta3, h.one_minus_beta3, h.eps2);
}

}  // namespace

void momentum_res_launch(const Group& grp, const Hyper& h, at::Tensor& stats, at::Tensor& ws) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "momentum_res", [&] {
    CAME_BOOL_SWITCH(h.maximize, kMaximize, [&] {
      for_each_chunk(grp, [&](size_t first, size_t last) {
        TensorTable tab = make_table(grp, first, last, stats, WsLayout::kColumnPartials);
        const int64_t blocks = fill_blocks(tab, grp, first, main_blocks_of);
        momentum_res_kernel<scalar_t, kMaximize><<<blocks, kThreads, 0, stream>>>(tab, ws.data_ptr<float>(), h);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t fin_blocks = fill_blocks(tab, grp, first, finalize_blocks_of);
        if (fin_blocks > 0) {
          res_finalize_kernel<<<fin_blocks, kThreads, 0, stream>>>(tab, ws.data_ptr<float>(), h);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
}

}  // namespace came
