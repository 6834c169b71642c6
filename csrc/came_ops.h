// came_ops.h: the host side shared by ops.cpp and the four phase files.
//
// `Group` is one (device, dtype) group of tensors, checked once per op call (make_group in ops.cpp), laid out
// (plan.h) and its table uploaded (upload_table), then handed to the phase launchers, which only dispatch
// dtypes and launch: one launch per kernel for the whole group. Light headers only (no torch/extension.h):
// every .cu includes this file, and nvcc time is CI time.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "plan.h"

namespace came {

// One parameter and its state. Factored (ndim >= 2) tensors are the batch [B, M, N] of their last two dims;
// the others are flat (M = N = B = 0) and use `v`. Factored tensors of small matrices (ndim >= 3, M, N <= 8)
// are packed, several whole matrices per block (pm > 0: plan.h), unless the group has low-precision state.
struct TensorRef {
  at::Tensor p, g, m;   // param, grad (same dtype), exp_avg (fp32); all contiguous, same numel
  at::Tensor r, c;      // exp_avg_sq_row [B*M], exp_avg_sq_col [B*N]           (factored)
  at::Tensor R, C;      // exp_avg_res_row [B*M], exp_avg_res_col [B*N]         (factored)
  at::Tensor v;         // exp_avg_sq [numel]                                   (flat)
  int64_t numel = 0, B = 0, M = 0, N = 0;
  int64_t pm = 0;        // packed: its tile size PM (plan.h's pack_size), else 0
  int64_t stat_off = 0;  // this tensor's slice of `stats`: mean_M(r)[B], mean_M(R)[B], clip divisor [1]
                         // (packed: the clip divisor only)
  int64_t index = 0;     // its position in the op's lists (empty tensors are dropped): its row of bias_scales
  // Opt-in low-precision state (came_step_lowbit only): m is then fp32, bf16 or int8 codes (mkind, see
  // came_math.cuh), with the int8 codes' block absmax; comp: the Kahan compensation of a bf16 param.
  at::Tensor absmax, comp;
  int mkind = 0;
  int64_t qoff = 0;      // int8: its first slot in the group's qmax / qold buffers
  bool factored() const { return M > 0; }
  Shape shape() const { return Shape{numel, B, M, N, pm}; }
};

// Scalars, converted once: fp32 values, and 1-beta rounded from double like torch's `alpha=1-beta`.
struct Hyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3;
  float eps1, eps2, clip_threshold, weight_decay;
  bool maximize;
  bool bias_correction;  // bias_scales given: s_u in the clip finalize, s_m in param_step (DeviceTable::scales)
};

struct Group {
  std::vector<TensorRef> ts;
  at::ScalarType dtype;
  int64_t stats_numel = 0;  // sum over tensors of 2*B + 1 (layout above)
  Layout layout;            // slot order, workspace offsets, block counts (plan.h)
  int64_t main_blocks = 0;  // phase-kernel blocks; the grid of the phase kernels is main_blocks - packed_blocks
  int64_t reg_blocks = 0;   // grid of sq_stats_reg_kernel (phase 1's register path; 0: no such tensor)
  int64_t rest_blocks = 0;  // phase 1's other blocks; sq_stats_kernel's grid: rest_blocks - packed_blocks
  int64_t fin_blocks = 0;   // grid of the column finalize kernels (0: no factored tensor)
  int64_t clip_blocks = 0;  // grid of clip_stats_kernel (0: phase 1 gathers every tensor's clip statistics)
  int64_t packed_blocks = 0;  // blocks of the packed tensors, the last ones of the phase-kernel numbering (and of
                              // phase 1's rest numbering): the grid of the packed kernels (0: nothing packed)
  at::Tensor table_dev;     // the uploaded table; keeps `tab` valid until the op returns
  DeviceTable tab{};
  // Opt-in low-precision state (came_step_lowbit): `lowbit` uploads the LowbitDesc entries (tab.lp);
  // `lowbit_momentum`: some m is bf16 or int8 (phase 3 takes its low-precision bodies); `rounding`: the
  // param_rounding of bf16 params (phase 4 takes them when it is not nearest, or for lowbit_momentum).
  bool lowbit = false, lowbit_momentum = false;
  int rounding = 0;
  int64_t q_blocks = 0;     // int8 momenta: blocks of 256 elements over the group (qmax / qold slots)
};

// stats floats per tensor (plan.h's div_slot reads the same layout on the device). Packed tensors keep no
// means: their blocks hold whole matrices and take mean_M(r), mean_M(R) from r and R in every phase (2B
// floats per conv weight of B = Cout*Cin matrices made ResNet-50's stats 102 MiB).
inline int64_t stats_numel_of(const TensorRef& t) { return t.pm > 0 ? 1 : 2 * t.B + 1; }

// The phase launchers, one per .cu; `g.tab` must be uploaded. `lr` is a 1-element fp32 CUDA tensor (read on
// the device: no sync); the per-tensor slices of `stats` (in the table) carry the per-matrix means and the
// clip divisors between phases; `ws` (g.layout.ws_floats floats) is scratch, and carries the clip inputs
// from sq_stats to clip_stats (plan.h: W and the block sums). `amp`: GradScaler's
// [found_inf, 1/scale] as 2 fp32 device floats, or nullptr without a GradScaler (multi_tensor.cuh).
void sq_stats_launch(const Group& g, const Hyper& h, float* ws, const float* amp);
void clip_stats_launch(const Group& g, const Hyper& h, float* ws, const float* amp);
void momentum_res_launch(const Group& g, const Hyper& h, float* ws, const float* amp);
void param_step_launch(const Group& g, const Hyper& h, const at::Tensor& lr, const float* amp);

}  // namespace came
