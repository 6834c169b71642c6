// Host build of csrc/came_math.cuh for tests/test_cuda_math_host.py (g++, no CUDA: CAME_HD is `inline`).
//
// One CAME step per tensor, composed from the same per-element functions the kernels call, in the kernels'
// phase order (sq_stats, clip_stats, momentum_res, param_step) and with their sums: row sums over N, column
// sums over M, the per-matrix mean of the row statistic, sum(u^2) per tensor as the kernels form it (for
// N <= kClipCols from P and W, came_math.cuh's identity; else from u directly, as phase 2 does). What this does not
// check is the GPU plumbing (tables, stripes, vector loads): tests/test_cuda_backend.py does that on a GPU.
// Plain C ABI for ctypes; fp32 storage only (the kernels' bf16/fp16 loads and stores are conversions).
// GradScaler: g is multiplied by inv_scale wherever a phase reads it (1.0f without a GradScaler, as in the
// kernels). Bias correction (bias != 0): s_u in the clip divisor, s_m on the update, as the kernels do.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "came_math.cuh"
#include "plan.h"  // kClipCols, kFlatChunk

using namespace came;

namespace {
struct H {
  float b1, omb1, b2, omb2, b3, omb3, eps1, eps2, d, lr, wd;
  bool maximize;
  float inv;       // GradScaler's 1/scale (1.0f without one)
  bool bias;       // bias correction on: s_u, s_m below are used
  float s_u, s_m;
};
H make(double b1, double b2, double b3, double eps1, double eps2, double d, double lr, double wd, int maximize,
       float inv, int bias, float s_u, float s_m) {
  // the same double -> float conversions as ops.cpp's make_hyper and the glue's fp32 lr
  return {static_cast<float>(b1), static_cast<float>(1.0 - b1), static_cast<float>(b2),
          static_cast<float>(1.0 - b2), static_cast<float>(b3), static_cast<float>(1.0 - b3),
          static_cast<float>(eps1), static_cast<float>(eps2), static_cast<float>(d), static_cast<float>(lr),
          static_cast<float>(wd), maximize != 0, inv, bias != 0, s_u, s_m};
}
float step_p(float p, float update, const H& h) {
  update = corrected_update(update, h.bias ? h.s_m : 1.0f);         // param_step.cu: s_m = 1 without
  return h.wd != 0.0f ? param_step(p, update, h.lr, h.wd) : p - h.lr * update;  // param_step.cu's kDecay
}
float divisor(double sum_u2, int64_t numel, const H& h) {  // clip_stats.cu's clip_finalize_kernel
  return h.bias ? clip_divisor_scaled(sum_u2, numel, h.d, h.s_u) : clip_divisor(sum_u2, numel, h.d);
}
float g_of(const float* g, int64_t k, const H& h) {  // momentum_res.cu: unscale, then negate for maximize
  const float gu = unscaled(g[k], h.inv);
  return h.maximize ? -gu : gu;
}
}  // namespace

extern "C" {

float came_clip_divisor(double sum_u2, int64_t numel, float d) { return clip_divisor(sum_u2, numel, d); }
float came_clip_divisor_scaled(double sum_u2, int64_t numel, float d, float s_u) {
  return clip_divisor_scaled(sum_u2, numel, d, s_u);
}

// param_step.cu's per-element update for bf16/fp16 params (decay folded into the update), in fp32; the
// caller rounds to the param dtype, as the kernel's store does.
float came_param_step_folded(float p, float update, float lr, float wd) { return param_step_folded(p, update, lr, wd); }

// Tensors with ndim < 2: p, g, m, v of n elements.
void came_step_flat(float* p, const float* g, float* m, float* v, int64_t n, double b1, double b2, double b3,
                    double eps1, double eps2, double d, double lr, double wd, int maximize, float inv, int bias,
                    float s_u, float s_m) {
  const H h = make(b1, b2, b3, eps1, eps2, d, lr, wd, maximize, inv, bias, s_u, s_m);
  // phase 1, with sum(u^2) from the new v (one fp32 sum per block of kFlatChunk elements, added in fp64)
  double s = 0.0;
  float part = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float gx = unscaled(g[i], h.inv);
    v[i] = ema(v[i], h.b2, h.omb2, gx * gx + h.eps1);
    const float u = vector_u(gx, v[i]);
    part += u * u;
    if ((i + 1) % kFlatChunk == 0 || i + 1 == n) {
      s += static_cast<double>(part);
      part = 0.0f;
    }
  }
  // phase 2: the clip finalize
  const float div = divisor(s, n, h);
  // phase 3
  for (int64_t i = 0; i < n; ++i) m[i] = ema(m[i], h.b1, h.omb1, clipped(vector_u(g_of(g, i, h), v[i]), div));
  // phase 4
  for (int64_t i = 0; i < n; ++i) p[i] = step_p(p[i], m[i], h);
}

// The clip's sum(u^2) of a factored tensor from g and the new r, c (as stored), in the kernels' way
// (sq_stats.cu, clip_stats.cu): t = g * rsqrt(r_i), P_j = sum_i t^2 (fp32), W_j = P_j / c_j (fp64), total =
// sum_b mean_M(r)[b] * sum_j W_j (fp64). g is unscaled by inv as the kernels load it.
double came_clip_total_identity(const float* g, const float* r, const float* c, int64_t B, int64_t M, int64_t N,
                                float inv) {
  std::vector<float> P(N);
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    float s = 0.0f;
    for (int64_t i = 0; i < M; ++i) s += r[b * M + i];
    const float mean_r = s / static_cast<float>(M);
    for (int64_t j = 0; j < N; ++j) P[j] = 0.0f;
    for (int64_t i = 0; i < M; ++i) {
      const float r_inv = inv * rsqrt_(r[b * M + i]);  // sq_stats.cu: (1/scale) * rsqrt(r), then g times it
      for (int64_t j = 0; j < N; ++j) {
        const float t = clip_t(g[(b * M + i) * N + j], r_inv);
        P[j] += t * t;
      }
    }
    for (int64_t j = 0; j < N; ++j) total += clip_row_term(mean_r, clip_col_term(P[j], c[b * N + j]));
  }
  return total;
}

// The same sum directly: u as the spec forms it (fp32), u^2 added in fp64 (what phase 2 computed before).
double came_clip_total_direct(const float* g, const float* r, const float* c, int64_t B, int64_t M, int64_t N,
                              float inv) {
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    float s = 0.0f;
    for (int64_t i = 0; i < M; ++i) s += r[b * M + i];
    const float mean_r = s / static_cast<float>(M);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const float u = factored_u(unscaled(g[(b * M + i) * N + j], inv), row_factor(r[b * M + i], mean_r),
                                   col_factor(c[b * N + j]));
        total += static_cast<double>(u) * static_cast<double>(u);
      }
  }
  return total;
}

// Factored tensors: [B, M, N] p, g, m; r, R [B*M]; c, C [B*N].
void came_step_factored(float* p, const float* g, float* m, float* r, float* c, float* R, float* C, int64_t B,
                        int64_t M, int64_t N, double b1, double b2, double b3, double eps1, double eps2, double d,
                        double lr, double wd, int maximize, float inv, int bias, float s_u, float s_m) {
  const H h = make(b1, b2, b3, eps1, eps2, d, lr, wd, maximize, inv, bias, s_u, s_m);
  std::vector<float> mean_r(B), mean_R(B), colsum(N);
  // phase 1: r from row sums, c from column sums, mean_M(r)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < N; ++j) colsum[j] = 0.0f;
    for (int64_t i = 0; i < M; ++i) {
      float rs = 0.0f;
      for (int64_t j = 0; j < N; ++j) {
        const float x = unscaled(g[(b * M + i) * N + j], h.inv);
        rs += x * x;
        colsum[j] += x * x;
      }
      r[b * M + i] = ema(r[b * M + i], h.b2, h.omb2, mean_plus_eps(rs, static_cast<float>(N), h.eps1));
    }
    for (int64_t j = 0; j < N; ++j) {
      c[b * N + j] = ema(c[b * N + j], h.b2, h.omb2, mean_plus_eps(colsum[j], static_cast<float>(M), h.eps1));
    }
    float s = 0.0f;
    for (int64_t i = 0; i < M; ++i) s += r[b * M + i];
    mean_r[b] = s / static_cast<float>(M);
  }
  // phases 1 and 2: the clip divisor from P and W (N <= kClipCols), or from u directly (phase 2's re-read of g)
  const double s = N <= kClipCols ? came_clip_total_identity(g, r, c, B, M, N, h.inv)
                                      : came_clip_total_direct(g, r, c, B, M, N, h.inv);
  const float div = divisor(s, B * M * N, h);
  // phase 3: m, then R from row sums of the residual, C from column sums, mean_M(R)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < N; ++j) colsum[j] = 0.0f;
    for (int64_t i = 0; i < M; ++i) {
      float rs = 0.0f;
      for (int64_t j = 0; j < N; ++j) {
        const int64_t k = (b * M + i) * N + j;
        const float u = factored_u(g_of(g, k, h), row_factor(r[b * M + i], mean_r[b]), col_factor(c[b * N + j]));
        const float u_hat = clipped(u, div);
        m[k] = ema(m[k], h.b1, h.omb1, u_hat);
        const float res = residual(u_hat, m[k]);
        rs += res;
        colsum[j] += res;
      }
      R[b * M + i] = ema(R[b * M + i], h.b3, h.omb3, mean_plus_eps(rs, static_cast<float>(N), h.eps2));
    }
    for (int64_t j = 0; j < N; ++j) {
      C[b * N + j] = ema(C[b * N + j], h.b3, h.omb3, mean_plus_eps(colsum[j], static_cast<float>(M), h.eps2));
    }
    float t = 0.0f;
    for (int64_t i = 0; i < M; ++i) t += R[b * M + i];
    mean_R[b] = t / static_cast<float>(M);
  }
  // phase 4
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const int64_t k = (b * M + i) * N + j;
        const float update = factored_u(m[k], row_factor(R[b * M + i], mean_R[b]), col_factor(C[b * N + j]));
        p[k] = step_p(p[k], update, h);
      }
}

}  // extern "C"

// ---- The opt-in low-precision state's per-element functions, over arrays (one ctypes call per array).
extern "C" {

uint32_t came_philox_first(uint64_t key, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  return philox_first(key, c0, c1, c2, c3);
}

// bits[k] = random_bits(key, step, idx[k], stream): what the kernels draw for element idx[k].
void came_random_bits(int64_t key, int64_t step, const int64_t* idx, int64_t n, uint32_t stream, uint32_t* bits) {
  for (int64_t k = 0; k < n; ++k) bits[k] = random_bits(key, step, idx[k], stream);
}

void came_sr_bf16(const float* x, const uint32_t* r, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = sr_bf16_bits(x[k], r[k]);
}

void came_rne_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = rne_bf16_bits(x[k]);
}

// int8 momentum as the kernels do it: the block maxima gathered from absmax_key (phase 3), the codes from
// quantize with those maxima and the bits r (phase 4), and their dequantized values.
void came_quantize_blockwise(const float* m, const uint32_t* r, int64_t n, int8_t* q, float* absmax, float* deq) {
  const int64_t blocks = (n + kQBlock - 1) / kQBlock;
  std::vector<int32_t> key(blocks, 0);
  for (int64_t k = 0; k < n; ++k) key[k / kQBlock] = std::max(key[k / kQBlock], absmax_key(m[k]));
  for (int64_t b = 0; b < blocks; ++b) absmax[b] = bits_float(static_cast<uint32_t>(key[b]));
  for (int64_t k = 0; k < n; ++k) {
    q[k] = quantize(m[k], absmax[k / kQBlock], r[k]);
    deq[k] = dequantize(q[k], absmax[k / kQBlock]);
  }
}

void came_dequantize_blockwise(const int8_t* q, const float* absmax, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = dequantize(q[k], absmax[k / kQBlock]);
}

// param_step.cu's store of a bf16 param under param_rounding (1 stochastic, 2 Kahan), for a param p (bf16
// bits), its compensation comp (bf16 bits, Kahan only) and the update (fp32, before lr): p and comp in place.
void came_param_store_bf16(uint16_t* p, uint16_t* comp, const float* update, int64_t n, float lr, float wd,
                           int rounding, int64_t key, int64_t step) {
  for (int64_t i = 0; i < n; ++i) {
    float x = bf16_bits_to_float(p[i]);
    if (rounding == kRoundKahan) x = kahan_value(x, bf16_bits_to_float(comp[i]));
    x = wd != 0.0f ? param_step_folded(x, update[i], lr, wd) : x - lr * update[i];
    if (rounding == kRoundStochastic) {
      p[i] = sr_bf16_bits(x, random_bits(key, step, i, kStreamParam));
    } else {
      p[i] = rne_bf16_bits(x);
      if (rounding == kRoundKahan) comp[i] = rne_bf16_bits(x - bf16_bits_to_float(p[i]));
    }
  }
}

}  // extern "C"
