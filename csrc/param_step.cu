// Phase 4, param_step: the update and the decoupled weight decay (mirror of triton_kernels/param_step.py and
// of "phase 4" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor; lr read on the device from a 1-element fp32 tensor, never synced to the host):
//   factored:  update = m * rsqrt(R / mean_M(R))[:, :, None] * rsqrt(C)[:, None, :]
//   ndim < 2:  update = m
//   p = p - lr*wd*p - lr*update      (fp32 arithmetic; p rounded to its dtype once, at the store)
//   bf16/fp16 p: p = p - (lr*update + lr*wd*p), the decay folded into the update as in the torch backend
// weight_decay == 0 is a compile-time switch that drops the decay term (as the torch backend does).
//
// Memory per element: reads m (4 B), reads and writes p: fp32 12 B, bf16/fp16 8 B. R, C and mean_M(R) are
// O(rows + cols).
// Launch: one block per stripe / flat chunk (the same blocks as the other phases), 256 threads; no finalize.
// Determinism: purely elementwise.
#include <type_traits>

#include "multi_tensor.cuh"

namespace came {
namespace {

// fp32 params: came-pytorch's order (decay, then update). bf16/fp16: the decay folded into the update, as the
// torch backend and the Triton kernels do for them (came_math.cuh). Either way p is rounded once, at the store.
template <typename T, bool kDecay>
__device__ __forceinline__ float step_one(float p, float update, float lr, float weight_decay) {
  if (!kDecay) return p - lr * update;
  return std::is_same_v<T, float> ? param_step(p, update, lr, weight_decay)
                                  : param_step_folded(p, update, lr, weight_decay);
}

template <typename T, int VEC, bool kVec, bool kDecay>
__device__ __forceinline__ void param_step_flat(const TensorTable& tab, int t, int64_t local, float lr,
                                                float weight_decay) {
  T* p = static_cast<T*>(tab.p[t]);
  const float* m = tab.m[t];
  const int64_t end = std::min(tab.numel[t], (local + 1) * kFlatChunk);
  for (int64_t i = local * kFlatChunk + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    float pv[VEC], mv[VEC];
    load_vec<VEC, kVec>(p, i, end, pv);
    load_vec<VEC, kVec>(m, i, end, mv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) pv[e] = step_one<T, kDecay>(pv[e], mv[e], lr, weight_decay);
    store_vec<VEC, kVec>(p, i, end, pv);
  }
}

template <typename T, int VEC, bool kVec, bool kDecay>
__device__ __forceinline__ void param_step_stripe(const TensorTable& tab, int t, int64_t local, float lr,
                                                  float weight_decay) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(tab, t, local);
  const int64_t B = tab.numel[t] / (s.M * s.N);
  T* p = static_cast<T*>(tab.p[t]);
  const float* m = tab.m[t];
  const float* R = tab.res_row[t];
  const float* C = tab.res_col[t] + s.b * s.N;
  const float mean_R = tab.stat[t][B + s.b];

  float row_f[kRowsPerWarp];  // rsqrt(R / mean_M(R)) of the warp's rows
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = s.row0 + warp + j * kWarps;
    row_f[j] = row < s.row_end ? row_factor(R[row], mean_R) : 0.0f;
  }

  for (int64_t col = lane * VEC; col < s.N; col += 32 * VEC) {
    float col_f[VEC];
    load_vec<VEC, kVec>(C, col, s.N, col_f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) col_f[e] = col_factor(col_f[e]);
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t row = s.row0 + warp + j * kWarps;
      if (row < s.row_end) {
        float pv[VEC], mv[VEC];
        load_vec<VEC, kVec>(p + row * s.N, col, s.N, pv);
        load_vec<VEC, kVec>(m + row * s.N, col, s.N, mv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          // same product order as the spec: (m * row_f) * col_f
          pv[e] = step_one<T, kDecay>(pv[e], factored_u(mv[e], row_f[j], col_f[e]), lr, weight_decay);
        }
        store_vec<VEC, kVec>(p + row * s.N, col, s.N, pv);  // padding lanes are not stored
      }
    }
  }
}

template <typename T, bool kDecay>
__global__ void __launch_bounds__(kThreads) param_step_kernel(TensorTable tab, const float* lr_ptr, Hyper h) {
  constexpr int VEC = 16 / sizeof(T);
  const BlockRef blk = find_block(tab);
  const float lr = *lr_ptr;
  if (tab.M[blk.t] == 0) {
    if (tab.vec_ok[blk.t]) param_step_flat<T, VEC, true, kDecay>(tab, blk.t, blk.local, lr, h.weight_decay);
    else param_step_flat<T, VEC, false, kDecay>(tab, blk.t, blk.local, lr, h.weight_decay);
  } else {
    if (tab.vec_ok[blk.t]) param_step_stripe<T, VEC, true, kDecay>(tab, blk.t, blk.local, lr, h.weight_decay);
    else param_step_stripe<T, VEC, false, kDecay>(tab, blk.t, blk.local, lr, h.weight_decay);
  }
}

}  // namespace

void param_step_launch(const Group& grp, const Hyper& h, const at::Tensor& lr, at::Tensor& stats) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* lr_ptr = lr.data_ptr<float>();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "param_step", [&] {
    CAME_BOOL_SWITCH(h.weight_decay != 0.0f, kDecay, [&] {
      for_each_chunk(grp, [&](size_t first, size_t last) {
        TensorTable tab = make_table(grp, first, last, stats, WsLayout::kNone);
        const int64_t blocks = fill_blocks(tab, grp, first, main_blocks_of);
        param_step_kernel<scalar_t, kDecay><<<blocks, kThreads, 0, stream>>>(tab, lr_ptr, h);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace came
