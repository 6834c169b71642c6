// came_math.cuh: CAME's per-element math on fp32 registers, shared by the four phases.
//
// Mirror of came_kernels/backends/torch_backend.py (the spec): each function below is one line of its
// math, in the spec's symbols, and keeps the spec's operation order so results agree to an ulp or two.
// Storage dtypes never appear here: callers load bf16/fp16/fp32 into float and store at the end.
//
// The functions are `__host__ __device__` so tests/test_cuda_math_host.py can compile this very file with
// g++ (where the CUDA qualifiers are empty) and check it against the torch backend on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowbit.h"

#ifndef CAME_HD
#if defined(__CUDACC__)
#define CAME_HD __host__ __device__ __forceinline__
#else
#define CAME_HD inline
#endif
#endif

namespace came {

// 1/sqrt(x). On the device rsqrtf (<= 2 ulp), the instruction torch's CUDA rsqrt uses too; on the host
// (the math test) the correctly rounded 1/sqrt. No --use_fast_math anywhere: divisions stay IEEE.
CAME_HD float rsqrt_(float x) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(x);
#else
  return 1.0f / std::sqrt(x);
#endif
}

// avg <- beta*avg + (1-beta)*new: came-pytorch's `avg.mul_(beta).add_(new, alpha=1-beta)`.
// `one_minus_beta` is 1-beta computed in double on the host and rounded once, like torch's alpha.
CAME_HD float ema(float avg, float beta, float one_minus_beta, float x) {
  return avg * beta + one_minus_beta * x;
}

// A mean over one axis plus eps, from the sum over that axis: the spec's `buf.mean(dim).add_(eps)`, used
// for mean_N(g^2) + eps1, mean_M(g^2) + eps1 and the residual's mean + eps2. A true division, like torch's
// CPU mean; n <= 2^24 is exact in fp32.
CAME_HD float mean_plus_eps(float sum, float n, float eps) { return sum / n + eps; }

// Factored inverse square root, row part: rsqrt(r / mean_M(r)); the column part is rsqrt(c).
CAME_HD float row_factor(float r, float mean_r) { return rsqrt_(r / mean_r); }
CAME_HD float col_factor(float c) { return rsqrt_(c); }

// GradScaler: the gradient as the spec uses it, g * (1/scale) in fp32 (GradScaler.unscale_'s multiply, kept in
// fp32 rather than rounded to g's dtype). The kernels apply it to g wherever they read it (phases 1, 2, 3),
// where triton_kernels/ does; `inv_scale` comes from the device (amp = [found_inf, 1/scale]).
CAME_HD float unscaled(float g, float inv_scale) { return g * inv_scale; }

// u = g * rsqrt(r/mean_M(r)) * rsqrt(c)   (factored), in the spec's order (g*row)*col.
CAME_HD float factored_u(float g, float row_f, float col_f) { return (g * row_f) * col_f; }
// u = g * rsqrt(v)   (ndim < 2)
CAME_HD float vector_u(float g, float v) { return g * rsqrt_(v); }

// The clip's sum(u^2) without a second read of g (phases 1 and 2). With r, c the new EMAs (as stored) and
// u = g * rsqrt(r_i / mean_M(r)) * rsqrt(c_j), exactly (every term is positive: nothing cancels):
//   sum_ij u_ij^2 = mean_M(r) * sum_j W_j,   W_j = P_j / c_j,   P_j = sum_i t_ij^2,   t_ij = g_ij * rsqrt(r_i)
// per matrix; a tensor's total adds its matrices. t is formed before squaring (g^2 / r would underflow for tiny
// g; t^2 <= N / (1 - beta2) is bounded). P_j is a fp32 sum; W_j and the total are fp64: P_j / c_j passes
// fp32's range when c_j ~ (1 - beta2) * eps1 (tiny grads), and the products with mean_M(r) may underflow it.
CAME_HD float clip_t(float g, float r_inv) { return g * r_inv; }                      // t = g * rsqrt(r)
CAME_HD double clip_col_term(float p_sum, float c) {                                 // W_j = P_j / c_j
  return static_cast<double>(p_sum) / static_cast<double>(c);
}
// mean_M(r) * W_j. A mean that is not finite (r overflowed, or NaN) gives NaN, as the spec's r_i / mean_M(r)
// does (inf / inf) in u; the identity alone would give inf * W (m - m is 0 exactly when m is finite).
CAME_HD double clip_row_term(float mean_r, double w) {
  const double m = static_cast<double>(mean_r);
  return m - m == 0.0 ? m * w : m - m;
}

// Phase 2: the clip divisor max(1, RMS(u)/d) from sum(u^2) (fp64: the total of the terms above, or of the
// fp32 block sums of u^2). NaN propagates (a NaN gradient must show, never be clipped away): `q < 1 ? 1 : q`
// keeps a NaN q, fmaxf(q, 1) would drop it.
CAME_HD float rms_of(double sum_u2, int64_t numel) {
  return static_cast<float>(std::sqrt(sum_u2 / static_cast<double>(numel)));
}
CAME_HD float clip_divisor(double sum_u2, int64_t numel, float clip_threshold) {
  const float q = rms_of(sum_u2, numel) / clip_threshold;
  return q < 1.0f ? 1.0f : q;
}

// Phase 2 with bias correction (opt-in bias_scales, column s_u): u is scaled by s_u before the clip,
// u_hat = s_u*u / max(1, RMS(s_u*u)/d). Phase 3 divides u by the stored divisor, so the slot holds
// max(1, s_u*RMS(u)/d) / s_u and phase 3 stays as it is. A NaN q (or s_u) still gives a NaN divisor.
CAME_HD float clip_divisor_scaled(double sum_u2, int64_t numel, float clip_threshold, float s_u) {
  const float q = (s_u * rms_of(sum_u2, numel)) / clip_threshold;
  return (q < 1.0f ? 1.0f : q) / s_u;
}

// Phase 3: u_hat = u / divisor; m = b1*m + (1-b1)*u_hat; res = (u_hat - m)^2 with the new m.
CAME_HD float clipped(float u, float divisor) { return u / divisor; }
CAME_HD float residual(float u_hat, float m) {
  const float d = u_hat - m;
  return d * d;
}

// Phase 4 with bias correction (column s_m of bias_scales): update = s_m * update; m itself stays raw.
CAME_HD float corrected_update(float update, float s_m) { return s_m * update; }

// Phase 4: p - lr*wd*p - lr*update, in fp32, rounded by the caller once at the store. The decay goes first,
// as in came-pytorch (p -= lr*wd*p; p -= lr*update), never as p*(1 - lr*wd): 1 - lr*wd rounded to fp32
// loses most digits of a small lr*wd.
CAME_HD float param_step(float p, float update, float lr, float weight_decay) {
  const float decayed = p - (lr * weight_decay) * p;
  return decayed - lr * update;
}

// Phase 4 for bf16/fp16 params: the decay folded into the update, p - (lr*update + lr*wd*p), as the torch
// backend (update = lr*update; update += lr*wd*p; p -= update) and triton_kernels/came_math.py's _param_update
// do for a param whose dtype is not the math dtype. Same fp32 roundings as those mirrors; p is rounded once.
CAME_HD float param_step_folded(float p, float update, float lr, float weight_decay) {
  return p - (update * lr + p * (lr * weight_decay));
}

// ---- Opt-in low-precision state (mirror of triton_kernels/came_math.py's helpers and of the spec's
// torch_backend.philox, sr_bf16, quantize_blockwise, dequantize_blockwise): integer ops and exactly rounded
// fp32 ops in the spec's order, so every backend draws the same bits and rounds the same fp32 value alike.
// Constants (kQBlock, the Philox streams, the storage kinds and roundings): lowbit.h.
constexpr float kInv127 = 0.007874015718698502f;  // fp32(1/127): m = q * (absmax * kInv127)

CAME_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

CAME_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#endif
}
CAME_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, 4);
  return x;
#endif
}

// Philox4x32-10 (Salmon et al., SC 2011), as Triton's tl.philox(key, c0, c1, c2, c3): key = (low 32 bits,
// high 32 bits) of the int64 key; the first output word.
CAME_HD uint32_t philox_first(uint64_t key, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {  // constant trip count: unrolled by nvcc
    const uint32_t hi_b = umulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = umulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// 32 random bits for element `idx` of a tensor whose rng row is (key, step): counters (idx lo, idx hi,
// step lo, stream). The spec's random_bits, Triton's _random_bits.
CAME_HD uint32_t random_bits(int64_t key, int64_t step, int64_t idx, uint32_t stream) {
  return philox_first(static_cast<uint64_t>(key), static_cast<uint32_t>(idx),
                      static_cast<uint32_t>(static_cast<uint64_t>(idx) >> 32), static_cast<uint32_t>(step), stream);
}

// fp32 x rounded to bf16 stochastically with the random bits r, as its 16-bit pattern: r's top 16 bits are
// added below the bf16 ulp, then the low 16 bits dropped (up with probability (x - down) / ulp). NaN stays
// a NaN (0x7FC0, what torch's to(bfloat16) gives on the CPU).
CAME_HD uint16_t sr_bf16_bits(float x, uint32_t r) {
  if (x != x) return 0x7FC0u;
  return static_cast<uint16_t>((float_bits(x) + (r >> 16)) >> 16);
}

// fp32 x rounded to bf16 to nearest even, as its 16-bit pattern (what torch's and c10's conversions do).
CAME_HD uint16_t rne_bf16_bits(float x) {
  if (x != x) return 0x7FC0u;
  const uint32_t u = float_bits(x);
  return static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}
CAME_HD float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// Kahan-compensated bf16 param: the param p stands for p + k; the new fp32 value x is stored as p = bf16(x)
// (to nearest) and k = bf16(x - p) (what the rounding lost; x - p is exact in fp32).
CAME_HD float kahan_value(float p, float k) { return p + k; }

// int8 momentum: m of code q in a block of absmax, and the code of fp32 m in a block of absmax with random
// bits r: x = m * (127 / absmax), up with probability frac(x) from r's top 24 bits, clamped to [-127, 127];
// 0 for NaN (its block's absmax is NaN, which shows); an all-zero block stays zero.
CAME_HD float dequantize(int8_t q, float absmax) { return static_cast<float>(q) * (absmax * kInv127); }
CAME_HD int8_t quantize(float m, float absmax, uint32_t r) {
  const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
  const float x = m * inv;
  if (x != x) return 0;
  const float down = std::floor(x);
  const bool up = static_cast<float>(r >> 8) * 5.9604644775390625e-08f < x - down;  // 2^-24
  float q = down + (up ? 1.0f : 0.0f);
  q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
  return static_cast<int8_t>(q);
}
// The block maximum of |m| is gathered as the int bits of |m| (non-negative floats order as their bits, and a
// NaN, whose bits are the largest, wins as in torch's amax): exact in any order.
CAME_HD int32_t absmax_key(float m) { return static_cast<int32_t>(float_bits(m) & 0x7FFFFFFFu); }

}  // namespace came
