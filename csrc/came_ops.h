// came_ops.h: the host side shared by ops.cpp and the four phase files.
//
// `Group` is one (device, dtype) group of tensors, checked once per op call (make_group in ops.cpp) and then
// handed to the phase launchers, which only dispatch dtypes and launch. Light headers only (no
// torch/extension.h): every .cu includes this file, and nvcc time is CI time.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace came {

// ---- Work decomposition (mirrors triton_kernels/): constants shared by host and device code.
constexpr int kThreads = 256;                  // threads per block: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 64;                      // rows per stripe of a factored matrix; column partials
                                               // take numel/kRows floats (<= 4 B/param / 64 at peak)
constexpr int kRowsPerWarp = kRows / kWarps;   // each warp walks 8 rows of its stripe
constexpr int64_t kFlatChunk = 16384;          // elements per block for tensors with ndim < 2
// Tensors per launch: the kernel-argument table (TensorTable, multi_tensor.cuh) must fit the classic 4 KiB
// kernel-parameter limit; a larger group is launched in chunks of this many tensors, in list order.
constexpr int kMaxTensors = 36;

// One parameter and its state. Factored (ndim >= 2) tensors are the batch [B, M, N] of their last two dims;
// the others are flat (M = N = B = 0) and use `v`.
struct TensorRef {
  at::Tensor p, g, m;   // param, grad (same dtype), exp_avg (fp32); all contiguous, same numel
  at::Tensor r, c;      // exp_avg_sq_row [B*M], exp_avg_sq_col [B*N]           (factored)
  at::Tensor R, C;      // exp_avg_res_row [B*M], exp_avg_res_col [B*N]         (factored)
  at::Tensor v;         // exp_avg_sq [numel]                                   (flat)
  int64_t numel = 0, B = 0, M = 0, N = 0;
  int64_t stat_off = 0;  // this tensor's slice of `stats`: mean_M(r)[B], mean_M(R)[B], clip divisor [1]
  bool factored() const { return M > 0; }
};

// Scalars, converted once: fp32 values, and 1-beta rounded from double like torch's `alpha=1-beta`.
struct Hyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3;
  float eps1, eps2, clip_threshold, weight_decay;
  bool maximize;
};

struct Group {
  std::vector<TensorRef> ts;
  at::ScalarType dtype;
  int64_t stats_numel = 0;  // sum over tensors of 2*B + 1 (layout above)
  int64_t ws_floats = 0;    // workspace for the largest launch (column partials or block partials)
};

// stats floats per tensor: the layout contract between make_group and the Python glue (`_stats_numel`).
inline int64_t stats_numel_of(const TensorRef& t) { return 2 * t.B + 1; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Stripes of kRows whole rows per matrix; blocks of a phase kernel; column-partial floats of a tensor.
inline int64_t stripes_of(const TensorRef& t) { return t.B * ceil_div(t.M, kRows); }
inline int64_t main_blocks_of(const TensorRef& t) {
  return t.factored() ? stripes_of(t) : ceil_div(t.numel, kFlatChunk);
}
inline int64_t colpart_floats_of(const TensorRef& t) { return t.factored() ? stripes_of(t) * t.N : 0; }

// Workspace floats for the launch-chunk of tensors [first, last): phases 1 and 3 write one column partial
// per (stripe, column), phase 2 one partial per block; the same buffer serves all three in turn.
inline int64_t chunk_workspace_floats(const Group& g, size_t first, size_t last) {
  int64_t cols = 0, parts = 0;
  for (size_t i = first; i < last; ++i) {
    cols += colpart_floats_of(g.ts[i]);
    parts += main_blocks_of(g.ts[i]);
  }
  return cols > parts ? cols : parts;
}

// The phase launchers, one per .cu. `lr` is a 1-element fp32 CUDA tensor (read on the device: no sync);
// `stats` holds the per-matrix means and the clip divisors between phases; `ws` is scratch.
void sq_stats_launch(const Group& g, const Hyper& h, at::Tensor& stats, at::Tensor& ws);
void clip_stats_launch(const Group& g, const Hyper& h, at::Tensor& stats, at::Tensor& ws);
void momentum_res_launch(const Group& g, const Hyper& h, at::Tensor& stats, at::Tensor& ws);
void param_step_launch(const Group& g, const Hyper& h, const at::Tensor& lr, at::Tensor& stats);

}  // namespace came
