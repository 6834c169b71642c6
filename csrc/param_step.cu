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
// Opt-in low-precision state (came_step_lowbit, kLow): the update reads a bf16 m as stored, or recomputes an
// int8 m's new value and stores its codes (int8_momentum); bf16 params are stored to nearest, stochastically
// or Kahan-compensated (store_param_lp). Groups with bf16 momenta but no int8 one, params to nearest, take
// the default bodies with m read as bf16 (kLowBf16); the default kernels (kLowNone) are compiled as before.
//
// Memory per element: reads m (4 B), reads and writes p: fp32 12 B, bf16/fp16 8 B. R, C and mean_M(R) are
// O(rows + cols) (packed 1x1 matrices: 8 B more per element, every element its own row, column and matrix;
// packed tensors sum mean_M(R) from R).
// GradScaler: found_inf, 4 B per block; bias correction: s_m, 4 B per block.
// Launch: one param_step_kernel over the whole group but its packed tensors, one block per stripe / flat chunk
// (the blocks of phases 1 and 3; a stripe's row tiles one after another), 256 threads; one
// param_step_packed_kernel over the packed blocks (plan.h: K whole matrices each; rsqrt(R / mean_M(R)) and
// rsqrt(C) of its rows and columns to shared memory, then elementwise); no finalize.
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

// One row tile s of a stripe. MK: the momentum's storage, fp32 or bf16 (the update uses m as stored); the
// default kernels take MK = kMomFp32 only.
template <typename T, int VEC, bool kVec, bool kDecay, int MK = kMomFp32>
__device__ __forceinline__ void param_step_row_tile(const TensorDesc& d, const Stripe& s, float lr,
                                                    float weight_decay, float s_m) {
  // Two batches of 4 rows of p and m in flight (as momentum_res: two blocks per SM fit in 128 registers).
  constexpr int kB = kVec ? kRowsPerWarp / 2 : 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
      std::conditional_t<MK == kMomBf16, Bf16Rows<VEC, kB>, RowTile<float, VEC, kVec, kB>> mt;
      pt.load(p, s, warp, j0, col);
      if constexpr (MK == kMomBf16) {
        mt.load(reinterpret_cast<const uint16_t*>(m), s, warp, j0, col);
      } else {
        mt.load(m, s, warp, j0, col);
      }
#pragma unroll
      for (int jj = 0; jj < kB; ++jj) {
        if (pt.ok[jj]) {
          float pv[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            float mv;
            if constexpr (MK == kMomBf16) {
              mv = bf16_bits_to_float(mt.v[jj][e]);
            } else {
              mv = mt.at(jj, e);
            }
            // same product order as the spec: s_m * ((m * row_f) * col_f)
            const float update = corrected_update(factored_u(mv, row_f[j0 + jj], col_f[e]), s_m);
            pv[e] = step_one<T, kDecay>(pt.at(jj, e), update, lr, weight_decay);
          }
          store_vec<VEC, kVec>(p + warp_row(s, warp, j0 + jj) * s.N, col, s.N, pv);  // padding not stored
        }
      }
    }
  }
}

template <typename T, int VEC, bool kVec, bool kDecay, int MK = kMomFp32>
__device__ __forceinline__ void param_step_stripe(const TensorDesc& d, int64_t local, float lr, float weight_decay,
                                                  float s_m) {
  const Stripe s = stripe_of(d.M, d.N, local, d.tiles);
  const int64_t nt = row_tiles_of(s);
  for (int64_t t = 0; t < nt; ++t) {
    param_step_row_tile<T, VEC, kVec, kDecay, MK>(d, row_tile(s, t), lr, weight_decay, s_m);
  }
}

// A packed block of PM >= 4 (multi_tensor.cuh): the rows' rsqrt(R / mean_M(R)) and the columns' rsqrt(C) into
// shared memory, then the elementwise update of the block's contiguous elements; every load at once.
template <typename T, int VEC, bool kVec, bool kDecay, int PM>
__device__ __forceinline__ void param_step_packed(const TensorDesc& d, int64_t local, float lr, float weight_decay,
                                                  float s_m, float* __restrict__ smem) {
  constexpr int kU = kPackVecs<VEC>;
  const Packed pk = packed_of(d, local, PM);
  float* __restrict__ rs = smem;              // [rows]
  float* __restrict__ cs = smem + kPackRows;  // [cols]
  T* __restrict__ p = static_cast<T*>(d.p) + pk.e0;
  const float* __restrict__ m = d.m + pk.e0;
  const float* __restrict__ R = d.res_row + pk.k0 * pk.M;
  const float* __restrict__ C = d.res_col + pk.k0 * pk.N;
  float pv[kU][VEC], mv[kU][VEC];
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    load_vec<VEC, kVec>(p, packed_vec_start<VEC>(u), pk.n, pv[u]);
    load_vec<VEC, kVec>(m, packed_vec_start<VEC>(u), pk.n, mv[u]);
  }
  packed_factors<PM>(pk, R, C, rs, cs);
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int i0 = packed_vec_start<VEC>(u);
    PackedAt at(pk.M, pk.N, i0);
#pragma unroll
    for (int e = 0; e < VEC; ++e, at.next(pk.M, pk.N)) {
      if (i0 + e < pk.n) {
        // same product order as the spec: s_m * ((m * row_f) * col_f)
        const float update = corrected_update(factored_u(mv[u][e], rs[at.q], cs[at.col()]), s_m);
        pv[u][e] = step_one<T, kDecay>(pv[u][e], update, lr, weight_decay);
      }
    }
    store_vec<VEC, kVec>(p, i0, pk.n, pv[u]);  // nothing past the block's end
  }
}

// A packed block of 1x1 matrices (PM = 1): rsqrt(R / mean_M(R)) with mean_M(R) = R, elementwise.
template <typename T, bool kDecay>
__device__ __forceinline__ void param_step_packed_1x1(const TensorDesc& d, int64_t local, float lr,
                                                      float weight_decay, float s_m) {
  constexpr int kU = static_cast<int>(kPackElems) / kThreads, kB = 8;
  const Packed pk = packed_of(d, local, 1);
  T* __restrict__ p = static_cast<T*>(d.p) + pk.e0;
  const float* __restrict__ m = d.m + pk.e0;
  const float* __restrict__ R = d.res_row + pk.k0;
  const float* __restrict__ C = d.res_col + pk.k0;
#pragma unroll
  for (int u0 = 0; u0 < kU; u0 += kB) {
    float pv[kB], mv[kB], Rv[kB], Cv[kB];
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int i = (u0 + b) * kThreads + threadIdx.x;
      const bool ok = i < pk.n;
      pv[b] = ok ? static_cast<float>(p[i]) : 0.0f;
      mv[b] = ok ? m[i] : 0.0f;
      Rv[b] = ok ? R[i] : 0.0f;
      Cv[b] = ok ? C[i] : 0.0f;
    }
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int i = (u0 + b) * kThreads + threadIdx.x;
      if (i < pk.n) {
        const float update = corrected_update(factored_u(mv[b], row_factor(Rv[b], Rv[b]), col_factor(Cv[b])), s_m);
        p[i] = static_cast<T>(step_one<T, kDecay>(pv[b], update, lr, weight_decay));
      }
    }
  }
}

template <typename T, int VEC, bool kDecay>
__device__ __forceinline__ void param_step_packed_any(const TensorDesc& d, int pm, int64_t local, float lr,
                                                      float weight_decay, float s_m, float* smem) {
  if (pm == 1) {
    param_step_packed_1x1<T, kDecay>(d, local, lr, weight_decay, s_m);
  } else if (pm == 4) {
    if (d.vec_ok) param_step_packed<T, VEC, true, kDecay, 4>(d, local, lr, weight_decay, s_m, smem);
    else param_step_packed<T, VEC, false, kDecay, 4>(d, local, lr, weight_decay, s_m, smem);
  } else {
    if (d.vec_ok) param_step_packed<T, VEC, true, kDecay, 8>(d, local, lr, weight_decay, s_m, smem);
    else param_step_packed<T, VEC, false, kDecay, 8>(d, local, lr, weight_decay, s_m, smem);
  }
}

// ---- The opt-in low-precision state (came_step_lowbit): below, RND is the param_rounding of a bf16 param
// (kRoundNearest for other dtypes) and MK the momentum's storage.

// Store the new fp32 value x of element i of the param: to nearest (the caller's vector store), stochastically
// (Philox stream 1, counter = element index), or Kahan-compensated (p = bf16(x), comp = bf16(x - p)).
template <typename T, int RND>
__device__ __forceinline__ void store_param_lp(T* __restrict__ p, const LowbitDesc& L, int64_t i, float x,
                                               int64_t key, int64_t step) {
  if constexpr (RND == kRoundStochastic) {
    reinterpret_cast<uint16_t*>(p)[i] = sr_bf16_bits(x, random_bits(key, step, i, kStreamParam));
  } else if constexpr (RND == kRoundKahan) {
    const uint16_t b = rne_bf16_bits(x);
    reinterpret_cast<uint16_t*>(p)[i] = b;
    static_cast<uint16_t*>(L.comp)[i] = rne_bf16_bits(x - bf16_bits_to_float(b));
  }
}

// The value the stored param p of element i stands for (Kahan: p + comp).
template <int RND>
__device__ __forceinline__ float param_value_lp(float p, const LowbitDesc& L, int64_t i) {
  if constexpr (RND == kRoundKahan) return kahan_value(p, bf16_bits_to_float(static_cast<const uint16_t*>(L.comp)[i]));
  return p;
}

// int8 momentum, phase 4: the new m of phase 3 recomputed with the same functions on the same inputs (u_hat
// from g, r, c and the stats; the old codes with the old absmax that phase 3 copied to qold), quantized with
// its block's new absmax (qmax, Philox stream 0) and stored; returns the stored m, which the update uses.
// The element that starts a block writes the block's new absmax to the state (nothing reads it here).
template <typename T>
__device__ __forceinline__ float int8_momentum(const TensorDesc& d, const LowbitDesc& L, const Stripe& s,
                                               int64_t row, int64_t colx, int64_t i, const Hyper& h, float inv,
                                               int64_t key, int64_t step) {
  const float gu = unscaled(static_cast<float>(static_cast<const T*>(d.g)[i]), inv);
  const float gx = h.maximize ? -gu : gu;
  const float u = factored_u(gx, row_factor(d.row[row], d.stat[s.b]), col_factor(d.col[s.b * s.N + colx]));
  const float u_hat = clipped(u, d.stat[div_slot(d)]);
  const int64_t blk = i / kQBlock;
  int8_t* __restrict__ q = reinterpret_cast<int8_t*>(d.m);
  const float m = ema(dequantize(q[i], L.qold[blk]), h.beta1, h.one_minus_beta1, u_hat);
  const float absmax = bits_float(static_cast<uint32_t>(L.qmax[blk]));
  const int8_t code = quantize(m, absmax, random_bits(key, step, i, kStreamMomentum));
  q[i] = code;
  if (i % kQBlock == 0) L.absmax[blk] = absmax;
  return dequantize(code, absmax);
}

template <typename T, int VEC, bool kVec, bool kDecay, int MK, int RND>
__device__ __forceinline__ void param_step_row_tile_lp(const TensorDesc& d, const LowbitDesc& L, const Stripe& s,
                                                       float lr, const Hyper& h, float s_m, float inv) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* __restrict__ p = static_cast<T*>(d.p);
  const float* __restrict__ R = d.res_row;
  const float* __restrict__ C = d.res_col + s.b * s.N;
  const float mean_R = d.stat[d.B + s.b];
  int64_t key = 0, step = 0;
  if constexpr (MK != kMomFp32 || RND == kRoundStochastic) {
    key = L.rng[0];
    step = L.rng[1];
  }
  float row_f[kRowsPerWarp];
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
#pragma unroll 1
    for (int j = 0; j < kRowsPerWarp; ++j) {
      RowTile<T, VEC, kVec, 1> pt;
      pt.load(p, s, warp, j, col);
      if (pt.ok[0]) {
        const int64_t row = warp_row(s, warp, j);
        const int64_t base = row * s.N + col;
        float pv[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          pv[e] = pt.at(0, e);
          if (col + e < s.N) {
            const int64_t i = base + e;
            float m;
            if constexpr (MK == kMomInt8) {
              m = int8_momentum<T>(d, L, s, row, col + e, i, h, inv, key, step);
            } else if constexpr (MK == kMomBf16) {
              m = bf16_bits_to_float(reinterpret_cast<const uint16_t*>(d.m)[i]);
            } else {
              m = d.m[i];
            }
            // same product order as the spec: s_m * ((m * row_f) * col_f)
            const float update = corrected_update(factored_u(m, row_f[j], col_f[e]), s_m);
            pv[e] = step_one<T, kDecay>(param_value_lp<RND>(pv[e], L, i), update, lr, h.weight_decay);
            store_param_lp<T, RND>(p, L, i, pv[e], key, step);
          }
        }
        if constexpr (RND == kRoundNearest) store_vec<VEC, kVec>(p + row * s.N, col, s.N, pv);
      }
    }
  }
}

template <typename T, int VEC, bool kVec, bool kDecay, int MK, int RND>
__device__ __forceinline__ void param_step_stripe_lp(const TensorDesc& d, const LowbitDesc& L, int64_t local,
                                                     float lr, const Hyper& h, float s_m, float inv) {
  const Stripe s = stripe_of(d.M, d.N, local, d.tiles);
  const int64_t nt = row_tiles_of(s);
  for (int64_t t = 0; t < nt; ++t) {
    param_step_row_tile_lp<T, VEC, kVec, kDecay, MK, RND>(d, L, row_tile(s, t), lr, h, s_m, inv);
  }
}

// Flat tensors (their momentum is fp32): param_step_flat with a bf16 param's stochastic or Kahan store.
template <typename T, int VEC, bool kVec, bool kDecay, int RND>
__device__ __forceinline__ void param_step_flat_lp(const TensorDesc& d, const LowbitDesc& L, int64_t local,
                                                   float lr, float weight_decay, float s_m) {
  T* __restrict__ p = static_cast<T*>(d.p);
  const float* __restrict__ m = d.m;
  int64_t key = 0, step = 0;
  if constexpr (RND == kRoundStochastic) {
    key = L.rng[0];
    step = L.rng[1];
  }
  const int64_t end = std::min(d.numel, (local + 1) * kFlatChunk);
  for (int64_t i0 = local * kFlatChunk + threadIdx.x * VEC; i0 < end; i0 += kThreads * VEC) {
    float pv[VEC], mv[VEC];
    load_vec<VEC, kVec>(p, i0, end, pv);
    load_vec<VEC, kVec>(m, i0, end, mv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (i0 + e < end) {
        const float x = step_one<T, kDecay>(param_value_lp<RND>(pv[e], L, i0 + e), corrected_update(mv[e], s_m), lr,
                                            weight_decay);
        store_param_lp<T, RND>(p, L, i0 + e, x, key, step);
      }
    }
  }
}

// kLow (lowbit.h): kLowNone, the default kernel; kLowBf16, bf16 momenta but no int8 one, params rounded to
// nearest (tab.lp is set): the default bodies, m read as bf16 where a tensor's is; kLowAll, the _lp bodies
// (int8 momenta, param_rounding; one block per SM: they need more than 128 registers).
template <typename T, bool kDecay, int kLow, int RND>
__global__ void __launch_bounds__(kThreads, kLow == kLowAll ? 1 : 2) param_step_kernel(DeviceTable tab,
                                                                                       const float* lr_ptr, Hyper h,
                                                                                       const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  if (amp_found_inf(amp)) return;  // the params stay as they are
  const BlockRef blk = find_main(tab);
  const TensorDesc& d = *blk.d;
  const float lr = *lr_ptr;
  const float s_m = h.bias_correction ? tab.scales[2 * d.index + 1] : 1.0f;  // uniform: no load without bias correction
  if constexpr (kLow == kLowBf16) {
    if (d.M != 0 && tab.lp[blk.d - tab.t].mkind == kMomBf16) {
      if (d.vec_ok) param_step_stripe<T, VEC, true, kDecay, kMomBf16>(d, blk.local, lr, h.weight_decay, s_m);
      else param_step_stripe<T, VEC, false, kDecay, kMomBf16>(d, blk.local, lr, h.weight_decay, s_m);
      return;
    }
  }
  if constexpr (kLow == kLowAll) {
    const LowbitDesc& L = tab.lp[blk.d - tab.t];
    const float inv = amp_inv_scale(amp);
    if (d.M == 0) {
      if constexpr (RND != kRoundNearest) {
        if (d.vec_ok) param_step_flat_lp<T, VEC, true, kDecay, RND>(d, L, blk.local, lr, h.weight_decay, s_m);
        else param_step_flat_lp<T, VEC, false, kDecay, RND>(d, L, blk.local, lr, h.weight_decay, s_m);
        return;
      }
    } else if (L.mkind == kMomInt8) {
      if (d.vec_ok) param_step_stripe_lp<T, VEC, true, kDecay, kMomInt8, RND>(d, L, blk.local, lr, h, s_m, inv);
      else param_step_stripe_lp<T, VEC, false, kDecay, kMomInt8, RND>(d, L, blk.local, lr, h, s_m, inv);
      return;
    } else if (L.mkind == kMomBf16) {
      if (d.vec_ok) param_step_stripe_lp<T, VEC, true, kDecay, kMomBf16, RND>(d, L, blk.local, lr, h, s_m, inv);
      else param_step_stripe_lp<T, VEC, false, kDecay, kMomBf16, RND>(d, L, blk.local, lr, h, s_m, inv);
      return;
    } else if constexpr (RND != kRoundNearest) {
      if (d.vec_ok) param_step_stripe_lp<T, VEC, true, kDecay, kMomFp32, RND>(d, L, blk.local, lr, h, s_m, inv);
      else param_step_stripe_lp<T, VEC, false, kDecay, kMomFp32, RND>(d, L, blk.local, lr, h, s_m, inv);
      return;
    }
  }
  if (d.M == 0) {
    if (d.vec_ok) param_step_flat<T, VEC, true, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
    else param_step_flat<T, VEC, false, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
  } else {
    if (d.vec_ok) param_step_stripe<T, VEC, true, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
    else param_step_stripe<T, VEC, false, kDecay>(d, blk.local, lr, h.weight_decay, s_m);
  }
}

// Phase 4 of the packed tensors (plan.h), a launch of their own over the blocks [first, first + grid).
template <typename T, bool kDecay>
__global__ void __launch_bounds__(kThreads, kPackedMinBlocks) param_step_packed_kernel(DeviceTable tab, int32_t first,
                                                                                        const float* lr_ptr, Hyper h,
                                                                                        const float* amp) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ __align__(16) float smem[2 * kPackRows];
  if (amp_found_inf(amp)) return;  // the params stay as they are
  const BlockRef blk = find_main_from(tab, first);
  const TensorDesc& d = *blk.d;
  const float s_m = h.bias_correction ? tab.scales[2 * d.index + 1] : 1.0f;  // uniform: no load without bias correction
  param_step_packed_any<T, VEC, kDecay>(d, pack_of(d), blk.local, *lr_ptr, h.weight_decay, s_m, smem);
}

}  // namespace

void param_step_launch(const Group& grp, const Hyper& h, const at::Tensor& lr, const float* amp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* lr_ptr = lr.data_ptr<float>();
  const int64_t grid = grp.main_blocks - grp.packed_blocks;  // the packed blocks end the numbering (plan.h)
  CAME_DISPATCH_PARAM_DTYPE(grp.dtype, "param_step", [&] {
    CAME_BOOL_SWITCH(h.weight_decay != 0.0f, kDecay, [&] {
      if (grid == 0) {  // every tensor is packed
      } else if (!grp.lowbit) {
        param_step_kernel<scalar_t, kDecay, kLowNone, kRoundNearest><<<grid, kThreads, 0, stream>>>(
            grp.tab, lr_ptr, h, amp);
      } else {
        // param_rounding: bf16 params only (the other dtypes' rounded instantiations are not built); else by
        // the momentum kinds: without an int8 momentum the default bodies (kLowBf16)
        bool launched = false;
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (grp.rounding == kRoundStochastic) {
            param_step_kernel<scalar_t, kDecay, kLowAll, kRoundStochastic><<<grid, kThreads, 0, stream>>>(
                grp.tab, lr_ptr, h, amp);
            launched = true;
          } else if (grp.rounding == kRoundKahan) {
            param_step_kernel<scalar_t, kDecay, kLowAll, kRoundKahan><<<grid, kThreads, 0, stream>>>(
                grp.tab, lr_ptr, h, amp);
            launched = true;
          }
        }
        if (!launched && grp.q_blocks == 0) {
          param_step_kernel<scalar_t, kDecay, kLowBf16, kRoundNearest><<<grid, kThreads, 0, stream>>>(
              grp.tab, lr_ptr, h, amp);
        } else if (!launched) {
          param_step_kernel<scalar_t, kDecay, kLowAll, kRoundNearest><<<grid, kThreads, 0, stream>>>(
              grp.tab, lr_ptr, h, amp);
        }
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (grp.packed_blocks > 0) {
        param_step_packed_kernel<scalar_t, kDecay><<<grp.packed_blocks, kThreads, 0, stream>>>(
            grp.tab, static_cast<int32_t>(grid), lr_ptr, h, amp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace came
