// Phase 4, param_step: the update and the decoupled weight decay (mirror of triton_kernels/param_step.py and
// of "phase 4" in came_kernels/backends/torch_backend.py).
//
// Math (per tensor; lr read on the device from a 1-element fp32 tensor, never synced to the host):
//   factored:  update = m * rsqrt(R / mean_M(R))[:, :, None] * rsqrt(C)[:, None, :]
//   ndim < 2:  update = m
//   bias correction (bias_scales, s_m):  update = s_m * update   (m itself, and so R and C, stay raw)
//   p = p - lr*wd*p - lr*update      (fp32 arithmetic; p rounded to its dtype once, at the store)
//   bf16/fp16 p: p = p - (lr*update + lr*wd*p), the decay folded into the update as in the torch backend
// weight_decay == 0 is a compile-time switch that drops the decay term (as the torch backend does). s_m is
// 1.0f without bias correction (nothing loaded; the multiply is exact). GradScaler: g is not read here; the
// kernel returns before writing anything when found_inf != 0 (amp = [found_inf, 1/scale]).
//
// Memory per element: reads m (4 B), reads and writes p: fp32 12 B, bf16/fp16 8 B. R, C and mean_M(R) are
// O(rows + cols). GradScaler: found_inf, 4 B per block; bias correction: s_m, 4 B per block.
// Launch: one param_step_kernel over the whole group, one block per stripe / flat chunk (the blocks of the
// other phases), 256 threads; no finalize.
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
__device__ __forceinline__ void param_step_flat(const TensorDesc& d, int64_t local, float lr, float weight_decay,
                                                float s_m) {
  constexpr int kUnroll = 16 / VEC;  // 16 elements per thread per batch: the loads go out together
  T* __restrict__ p = static_cast<T*>(d.p);
  const float* __restrict__ m = d.m;
  const int64_t end = std::min(d.numel, (local + 1) * kFlatChunk);
  for (int64_t i0 = local * kFlatChunk + threadIdx.x * VEC; i0 < end; i0 += kUnroll * kThreads * VEC) {
    float pv[kUnroll][VEC], mv[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vec<VEC, kVec>(p, i0 + u * kThreads * VEC, end, pv[u]);
      load_vec<VEC, kVec>(m, i0 + u * kThreads * VEC, end, mv[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        pv[u][e] = step_one<T, kDecay>(pv[u][e], corrected_update(mv[u][e], s_m), lr, weight_decay);
      }
      store_vec<VEC, kVec>(p, i0 + u * kThreads * VEC, end, pv[u]);
    }
  }
}

template <typename T, int VEC, bool kVec, bool kDecay>
__device__ __forceinline__ void param_step_stripe(const TensorDesc& d, int64_t local, float lr, float weight_decay,
                                                  float s_m) {
  // Two batches of 4 rows of p and m in flight (as momentum_res: two blocks per SM fit in 128 registers).
  constexpr int kB = kVec ? kRowsPerWarp / 2 : 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stripe s = stripe_of(d.M, d.N, local);
  T* __restrict__ p = static_cast<T*>(d.p);
  const float* __restrict__ m = d.m;
  const float* __restrict__ R = d.res_row;
  const float* __restrict__ C = d.res_col + s.b * s.N;
  const float mean_R = d.stat[d.B + s.b];

  float row_f[kRowsPerWarp];  // rsqrt(R / mean_M(R)) of the warp's rows
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t row = warp_row(s, warp, j);
    row_f[j] = row < s.row_end ? row_factor(R[row], mean_R) : 0.0f;
  }

  for (int64_t col = lane * VEC; col < s.N; col += 32 * VEC) {
    float col_f[VEC];
    load_vec<VEC, kVec>(C, col, s.N, col_f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) col_f[e] = col_factor(col_f[e]);
#pragma unroll
    for (int j0 = 0; j0 < kRowsPerWarp; j0 += kB) {
      RowTile<T, VEC, kVec, kB> pt;
      RowTile<float, VEC, kVec, kB> mt;
      pt.load(p, s, warp, j0, col);
      mt.load(m, s, warp, j0, col);
#pragma unroll
      for (int jj = 0; jj < kB; ++jj) {
        if (pt.ok[jj]) {
          float pv[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            // same product order as the spec: s_m * ((m * row_f) * col_f)
            const float update = corrected_update(factored_u(mt.at(jj, e), row_f[j0 + jj], col_f[e]), s_m);
            pv[e] = step_one<T, kDecay>(pt.at(jj, e), update, lr, weight_decay);
          }
          store_vec<VEC, kVec>(p + warp_row(s, warp, j0 + jj) * s.N, col, s.N, pv);  // padding not stored
        }
      }
    }
  }
}

template <typename T, bool kDecay>
__global__ void __launch_bounds__(kThreads, 2) param_step_kernel(DeviceTable tab, const float* lr_ptr, Hyper h,
                                                                 const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  if (amp_found_inf(amp)) return;  // the params stay as they are
  const BlockRef blk = find_main(tab);
  const TensorDesc& d = *blk.d;
  const float lr = *lr_ptr;
  const float s_m = h.bias_correction ? d.scales[1] : 1.0f;  // uniform: no load without bias correction
  if (d.M == 0) {
    if (d.vec_ok) param_step_flat<T, VEC, true, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
    else param_step_flat<T, VEC, false, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
  } else {
    if (d.vec_ok) param_step_stripe<T, VEC, true, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
    else param_step_stripe<T, VEC, false, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
  }
}

}  // namespace

void param_step_launch(const Group& grp, const Hyper& h, const at::Tensor& lr, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* lr_ptr = lr.data_ptr<float>();
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "param_step", [&] {
    CAME_BOOL_SWITCH(h.weight_decay != 0.0f, kDecay, [&] {
      param_step_kernel<scalar_t, kDecay><<<grp.main_blocks, kThreads, 0, stream>>>(grp.tab, lr_ptr, h, amp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace came
