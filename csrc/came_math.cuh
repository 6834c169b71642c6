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

// Phase 1 -> 2: u = g * rsqrt(r/mean_M(r)) * rsqrt(c)   (factored), in the spec's order (g*row)*col.
CAME_HD float factored_u(float g, float row_f, float col_f) { return (g * row_f) * col_f; }
// u = g * rsqrt(v)   (ndim < 2)
CAME_HD float vector_u(float g, float v) { return g * rsqrt_(v); }

// Phase 2: the clip divisor max(1, RMS(u)/d) from sum(u^2). NaN propagates (a NaN gradient must show,
// never be clipped away): `q < 1 ? 1 : q` keeps a NaN q, fmaxf(q, 1) would drop it.
CAME_HD float rms_of(float sum_u2, int64_t numel) {
  return std::sqrt(sum_u2) / static_cast<float>(std::sqrt(static_cast<double>(numel)));
}
CAME_HD float clip_divisor(float sum_u2, int64_t numel, float clip_threshold) {
  const float q = rms_of(sum_u2, numel) / clip_threshold;
  return q < 1.0f ? 1.0f : q;
}

// Phase 2 with bias correction (opt-in bias_scales, column s_u): u is scaled by s_u before the clip,
// u_hat = s_u*u / max(1, RMS(s_u*u)/d). Phase 3 divides u by the stored divisor, so the slot holds
// max(1, s_u*RMS(u)/d) / s_u and phase 3 stays as it is. A NaN q (or s_u) still gives a NaN divisor.
CAME_HD float clip_divisor_scaled(float sum_u2, int64_t numel, float clip_threshold, float s_u) {
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

}  // namespace came
