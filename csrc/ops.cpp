// ops.cpp: the torch.ops.came_kernels.* operators: input checks, the (device, dtype) group, registration.
//
// The backend contract (came_kernels/backends/README.md) is one call per (device, dtype) group. The Python
// glue (came_kernels/backends/cuda_backend.py) calls `came_step`, which checks the lists once and runs the
// four phases; the per-phase ops exist so that each phase can be run and tested on its own and take a
// `stats` buffer (layout: per tensor in list order, mean_M(r)[B], mean_M(R)[B], clip divisor[1]; B = 0 for
// ndim < 2) that carries the small per-tensor results from one phase to the next (and sq_stats hands its
// clip inputs to the clip_stats op that follows it: Handoff below).
//
// Two optional tensors, after the scalars: `amp`, GradScaler's [found_inf, 1/scale] as 2 fp32 floats on the
// params' device (every kernel returns before writing when found_inf != 0, and g is multiplied by 1/scale
// wherever it is read), and `bias_scales`, the opt-in bias correction as fp32 [n, 2], row i = [s_u, s_m] of
// params[i] (s_u in the clip finalize, s_m in param_step). Both are read on the device: no host sync.
//
// Every check names the list and index of the offending tensor. Nothing is launched before all checks pass,
// so a bad call leaves params and state untouched.
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>
#include <memory>

#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/zero.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "came_ops.h"
#include "check.h"
#include "lowbit.h"

namespace came {
namespace {

using OptList = c10::List<std::optional<at::Tensor>>;

std::string name_of(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

void check_state(const at::Tensor& x, const std::string& name, const at::Tensor& p, at::IntArrayRef shape) {
  CAME_CHECK(x.defined(), "came_kernels: ", name, " is missing (expected a float32 tensor of shape ", shape, ")");
  CAME_CHECK(x.device() == p.device(), "came_kernels: ", name, " is on ", x.device(), ", its param on ", p.device());
  CAME_CHECK(x.scalar_type() == at::kFloat, "came_kernels: ", name, " must be float32 (statistics and momentum "
             "are fp32 for every param dtype), got ", x.scalar_type());
  CAME_CHECK(x.sizes() == shape, "came_kernels: ", name, " has shape ", x.sizes(), ", expected ", shape);
  CAME_CHECK(x.is_contiguous(), "came_kernels: ", name, " must be contiguous (the Python glue passes "
             "contiguous copies of non-contiguous tensors)");
}

at::Tensor opt_at(const OptList& xs, size_t i) {
  std::optional<at::Tensor> x = xs.get(i);
  return x.has_value() ? *x : at::Tensor();
}

// The opt-in low-precision state of came_step_lowbit (nullptr for the other ops: fp32 momenta only).
struct LowbitArgs {
  const OptList* absmaxes;  // exp_avg_absmaxes: fp32 [ceil(numel / 256)] for each int8 exp_avgs[i], else None
  const OptList* comps;     // param_comps: bf16, the param's shape, for each bf16 param under "kahan", else None
  int64_t rounding;         // param_rounding of bf16 params: kRoundNearest, kRoundStochastic or kRoundKahan
  const at::Tensor* rng;    // int64 [n, 2]: (Philox key, step) per param
};

// A low-precision momentum (bf16, or int8 codes with their absmax) of a factored param; returns its kind.
int check_lowbit_momentum(const at::Tensor& m, const at::Tensor& absmax, size_t i, const at::Tensor& p) {
  const std::string mn = name_of("exp_avgs", i);
  CAME_CHECK(p.dim() >= 2, "came_kernels: ", mn, " is ", m.scalar_type(), ", but only params with ndim >= 2 take "
             "a low-precision momentum (", name_of("params", i), " has shape ", p.sizes(), ")");
  CAME_CHECK(m.device() == p.device() && m.sizes() == p.sizes() && m.is_contiguous(), "came_kernels: ", mn,
             " must be a contiguous tensor of shape ", p.sizes(), " on ", p.device(), ", got ", m.sizes(), " on ",
             m.device());
  if (m.scalar_type() == at::kBFloat16) {
    CAME_CHECK(!absmax.defined(), "came_kernels: ", name_of("exp_avg_absmaxes", i), " must be None for a bf16 ",
               mn);
    return kMomBf16;
  }
  const std::vector<int64_t> want{ceil_div(p.numel(), kQBlock)};
  CAME_CHECK(absmax.defined() && absmax.device() == p.device() && absmax.scalar_type() == at::kFloat &&
             absmax.sizes() == at::IntArrayRef(want) && absmax.is_contiguous(),
             "came_kernels: ", name_of("exp_avg_absmaxes", i), " must be a contiguous float32 tensor of shape ",
             at::IntArrayRef(want), " on ", p.device(), " for the int8 ", mn, ", got ",
             absmax.defined() ? std::string(c10::toString(absmax.scalar_type())) : std::string("None"));
  return kMomInt8;
}

// Test hooks of the layout (plan.h's make_layout), read on every call: CAME_KERNELS_CUDA_CLIP_COLS lowers the
// widest N whose clip phase 1 gathers (so that phase 2 runs on small shapes), CAME_KERNELS_CUDA_WS_CAP_FLOATS
// lowers the workspace cap (so that small groups take stripes of several row tiles), CAME_KERNELS_CUDA_PACK=0
// cuts small matrices into stripes instead of packing them. Unset: the defaults.
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  CAME_CHECK(end != nullptr && *end == '\0' && x >= 0, "came_kernels: ", name,
             " must be a non-negative integer, got '", v, "'");
  return static_cast<int64_t>(x);
}

// The low-precision state's rng: (Philox key, step) per param, read on the device.
void check_rng(const at::Tensor& rng, const at::Tensor& p0, size_t n) {
  const std::vector<int64_t> want{static_cast<int64_t>(n), 2};
  CAME_CHECK(rng.device() == p0.device() && rng.scalar_type() == at::kLong && rng.sizes() == at::IntArrayRef(want)
             && rng.is_contiguous(), "came_kernels: rng must be a contiguous int64 tensor of shape ",
             at::IntArrayRef(want), " ((Philox key, step) per param) on ", p0.device(), ", got ",
             rng.scalar_type(), " ", rng.sizes(), " on ", rng.device());
}

Group make_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const OptList& sq_rows,
                 const OptList& sq_cols, const OptList& res_rows, const OptList& res_cols, const OptList& sqs,
                 const LowbitArgs* lb = nullptr) {
  const size_t n = params.size();
  CAME_CHECK(n > 0, "came_kernels: params is empty");
  for (auto [len, what] : {std::pair<size_t, const char*>{grads.size(), "grads"}, {exp_avgs.size(), "exp_avgs"},
                           {sq_rows.size(), "exp_avg_sq_rows"}, {sq_cols.size(), "exp_avg_sq_cols"},
                           {res_rows.size(), "exp_avg_res_rows"}, {res_cols.size(), "exp_avg_res_cols"},
                           {sqs.size(), "exp_avg_sqs"}}) {
    CAME_CHECK(len == n, "came_kernels: ", what, " has ", len, " tensors, params has ", n);
  }
  Group grp;
  const bool pack = lb == nullptr && env_int("CAME_KERNELS_CUDA_PACK", 1) != 0;  // low-precision state: stripes
  const at::Tensor& p0 = params[0];
  CAME_CHECK(p0.is_cuda(), "came_kernels: params[0] must be a CUDA tensor, got one on ", p0.device());
  grp.dtype = p0.scalar_type();
  CAME_CHECK(grp.dtype == at::kFloat || grp.dtype == at::kBFloat16 || grp.dtype == at::kHalf,
             "came_kernels: params must be float32, bfloat16 or float16, got ", grp.dtype,
             " (use backend='torch' for other dtypes)");

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const std::string pn = name_of("params", i);
    CAME_CHECK(p.device() == p0.device() && p.scalar_type() == grp.dtype, "came_kernels: ", pn, " is ",
               p.scalar_type(), " on ", p.device(), "; one call takes one (device, dtype) group: ", grp.dtype,
               " on ", p0.device());
    CAME_CHECK(p.layout() == at::kStrided && g.layout() == at::kStrided,
               "came_kernels: ", pn, " and its grad must be dense (sparse gradients are not supported)");
    CAME_CHECK(g.device() == p.device() && g.scalar_type() == p.scalar_type() && g.sizes() == p.sizes(),
               "came_kernels: ", name_of("grads", i), " must match ", pn, " (", p.scalar_type(), " ", p.sizes(),
               " on ", p.device(), "), got ", g.scalar_type(), " ", g.sizes(), " on ", g.device());
    CAME_CHECK(p.is_contiguous() && g.is_contiguous(), "came_kernels: ", pn, " and its grad must be contiguous "
               "(the Python glue passes contiguous copies of non-contiguous tensors)");
    TensorRef t;
    const at::ScalarType mdt = exp_avgs[i].defined() ? exp_avgs[i].scalar_type() : at::kFloat;
    if (lb != nullptr && (mdt == at::kBFloat16 || mdt == at::kChar)) {
      t.absmax = opt_at(*lb->absmaxes, i);
      t.mkind = check_lowbit_momentum(exp_avgs[i], t.absmax, i, p);
    } else {
      check_state(exp_avgs[i], name_of("exp_avgs", i), p, p.sizes());
      CAME_CHECK(lb == nullptr || !opt_at(*lb->absmaxes, i).defined(), "came_kernels: ",
                 name_of("exp_avg_absmaxes", i), " must be None for a float32 ", name_of("exp_avgs", i));
    }
    if (lb != nullptr) {
      const at::Tensor k = opt_at(*lb->comps, i);
      const bool kahan = lb->rounding == kRoundKahan && grp.dtype == at::kBFloat16;
      CAME_CHECK(kahan == k.defined(), "came_kernels: ", name_of("param_comps", i), kahan ? " is missing" :
                 " must be None", " (param_rounding='kahan' keeps one for every bf16 param, and only then)");
      if (kahan) {
        CAME_CHECK(k.device() == p.device() && k.scalar_type() == at::kBFloat16 && k.sizes() == p.sizes() &&
                   k.is_contiguous(), "came_kernels: ", name_of("param_comps", i), " must be a contiguous "
                   "bfloat16 tensor of shape ", p.sizes(), " on ", p.device(), ", got ", k.scalar_type(), " ",
                   k.sizes(), " on ", k.device());
        t.comp = k;
      }
    }
    if (p.numel() == 0) continue;  // nothing to update

    t.p = p;
    t.g = g;
    t.m = exp_avgs[i];
    t.numel = p.numel();
    if (p.dim() >= 2) {
      std::vector<int64_t> row_shape(p.sizes().begin(), p.sizes().end() - 1);
      std::vector<int64_t> col_shape(p.sizes().begin(), p.sizes().end() - 2);
      col_shape.push_back(p.size(-1));
      t.r = opt_at(sq_rows, i);
      t.c = opt_at(sq_cols, i);
      t.R = opt_at(res_rows, i);
      t.C = opt_at(res_cols, i);
      check_state(t.r, name_of("exp_avg_sq_rows", i), p, row_shape);
      check_state(t.c, name_of("exp_avg_sq_cols", i), p, col_shape);
      check_state(t.R, name_of("exp_avg_res_rows", i), p, row_shape);
      check_state(t.C, name_of("exp_avg_res_cols", i), p, col_shape);
      t.M = p.size(-2);
      t.N = p.size(-1);
      t.B = t.numel / (t.M * t.N);
      t.pm = pack ? pack_size(p.dim(), t.M, t.N) : 0;
    } else {
      t.v = opt_at(sqs, i);
      check_state(t.v, name_of("exp_avg_sqs", i), p, p.sizes());
    }
    t.index = static_cast<int64_t>(i);
    if (t.mkind == kMomInt8) {
      t.qoff = grp.q_blocks;
      grp.q_blocks += ceil_div(t.numel, kQBlock);
    }
    grp.lowbit_momentum = grp.lowbit_momentum || t.mkind != kMomFp32;
    t.stat_off = grp.stats_numel;
    grp.stats_numel += stats_numel_of(t);
    grp.ts.push_back(std::move(t));
  }
  if (lb != nullptr) {
    CAME_CHECK(lb->rounding >= kRoundNearest && lb->rounding <= kRoundKahan,
               "came_kernels: param_rounding must be 0 (nearest), 1 (stochastic) or 2 (kahan), got ", lb->rounding);
    check_rng(*lb->rng, p0, n);
    grp.lowbit = true;
    grp.rounding = grp.dtype == at::kBFloat16 ? static_cast<int>(lb->rounding) : kRoundNearest;
  }
  std::vector<Shape> shapes;
  for (const TensorRef& t : grp.ts) shapes.push_back(t.shape());
  grp.layout = make_layout(shapes, env_int("CAME_KERNELS_CUDA_CLIP_COLS", kClipCols),
                           env_int("CAME_KERNELS_CUDA_WS_CAP_FLOATS", kWsCapFloats));
  grp.main_blocks = grp.layout.main_start.back();
  grp.reg_blocks = grp.layout.reg_start.back();
  grp.rest_blocks = grp.layout.rest_start.back();
  grp.fin_blocks = grp.layout.fin_start.back();
  grp.clip_blocks = grp.layout.clip_start.back();
  grp.packed_blocks = grp.layout.packed_blocks;
  CAME_CHECK(grp.main_blocks <= INT32_MAX && grp.fin_blocks <= INT32_MAX && grp.layout.tiles <= INT32_MAX,
             "came_kernels: more than 2^31-1 blocks in one launch (", grp.main_blocks, " blocks)");
  return grp;
}

// lr: the kernels read lr[0] on the device (a float lr lives in a cached device tensor: no sync, no recompile).
void check_lr(const at::Tensor& lr, const at::Tensor& p0) {
  CAME_CHECK(lr.device() == p0.device() && lr.scalar_type() == at::kFloat && lr.numel() == 1,
             "came_kernels: lr must be a 1-element float32 tensor on ", p0.device(), ", got ", lr.scalar_type(),
             " with ", lr.numel(), " elements on ", lr.device());
}

// GradScaler's flags: the kernels read amp[0] and amp[1].
void check_amp(const std::optional<at::Tensor>& amp, const at::Tensor& p0) {
  if (!amp.has_value()) return;
  const at::Tensor& a = *amp;
  CAME_CHECK(a.device() == p0.device() && a.scalar_type() == at::kFloat && a.numel() == 2 && a.is_contiguous(),
             "came_kernels: amp must be a contiguous float32 tensor [found_inf, 1/scale] of 2 elements on ",
             p0.device(), ", got ", a.scalar_type(), " of shape ", a.sizes(), " on ", a.device(),
             a.is_contiguous() ? "" : " (non-contiguous)");
}

// Bias correction: the kernels read row i of bias_scales for params[i] (TensorRef::index).
void check_bias_scales(const std::optional<at::Tensor>& bias_scales, const at::Tensor& p0, size_t n) {
  if (!bias_scales.has_value()) return;
  const at::Tensor& b = *bias_scales;
  const std::vector<int64_t> want{static_cast<int64_t>(n), 2};
  CAME_CHECK(b.device() == p0.device() && b.scalar_type() == at::kFloat && b.sizes() == at::IntArrayRef(want) &&
             b.is_contiguous(),
             "came_kernels: bias_scales must be a contiguous float32 tensor of shape ", at::IntArrayRef(want),
             " ([s_u, s_m] per param) on ", p0.device(), ", got ", b.scalar_type(), " of shape ", b.sizes(),
             " on ", b.device(), b.is_contiguous() ? "" : " (non-contiguous)");
}

const float* ptr_or_null(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr<float>() : nullptr;
}

// The device table of the group (plan.h): built on the host (table_image), copied to the device on the
// current stream from pinned memory (upload). A non-blocking copy from pinned memory is not a host sync, and
// the caching host allocator keeps the pinned block until the copy is done. came_step and the per-phase ops
// build it at every call; a Plan (below) keeps it between steps and re-uploads it only when grads move.
// The low-precision entries (grp.lowbit) follow, pointing into qmax / qold (int8 momenta) and rng.
struct LowbitBuffers {
  int32_t* qmax = nullptr;
  float* qold = nullptr;
  const int64_t* rng = nullptr;
};

const void* addr(const at::Tensor& x) { return x.defined() ? x.data_ptr() : nullptr; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte loads need every full-size row (or chunk, or packed block: plan.h) to start on a 16-byte boundary:
// N % VEC == 0 (stripes) and every array aligned. This is the part that does not depend on the grad
// (TensorDesc::vec_ok = this && g aligned).
bool vec_ok_but_grad(const TensorRef& t, at::ScalarType dtype) {
  const int vec = 16 / static_cast<int>(c10::elementSize(dtype));
  bool ok = t.factored() && t.pm == 0 ? (t.N % vec == 0) : true;
  for (const void* ptr : {addr(t.p), addr(t.m), addr(t.c), addr(t.C), addr(t.v)}) ok = ok && aligned16(ptr);
  return ok;
}

std::vector<uint8_t> table_image(const Group& grp, float* stats_base, const LowbitBuffers& lbuf = LowbitBuffers{}) {
  const int64_t n = static_cast<int64_t>(grp.ts.size());
  std::vector<uint8_t> image(grp.lowbit ? table_bytes_lowbit(n) : table_bytes(n));
  auto* descs = reinterpret_cast<TensorDesc*>(image.data());
  auto* main_start = reinterpret_cast<int32_t*>(descs + n);
  int32_t* fin_start = main_start + n + 1;
  int32_t* clip_start = fin_start + n + 1;
  int32_t* reg_start = clip_start + n + 1;
  int32_t* rest_start = reg_start + n + 1;
  for (int64_t k = 0; k < n; ++k) {
    const TensorRef& t = grp.ts[grp.layout.order[k]];
    TensorDesc d{};
    d.p = t.p.data_ptr();
    d.g = t.g.data_ptr();
    d.m = static_cast<float*>(t.m.data_ptr());  // bf16 or int8 codes under the low-precision state
    d.row = static_cast<float*>(const_cast<void*>(t.factored() ? addr(t.r) : addr(t.v)));
    d.col = static_cast<float*>(const_cast<void*>(addr(t.c)));
    d.res_row = static_cast<float*>(const_cast<void*>(addr(t.R)));
    d.res_col = static_cast<float*>(const_cast<void*>(addr(t.C)));
    d.stat = stats_base + t.stat_off;
    d.numel = t.numel;
    d.B = t.B;
    d.M = t.M;
    d.N = t.N;
    d.ws_col = grp.layout.ws_col[k];
    d.ws_clip = grp.layout.ws_clip[k];
    d.tiles = desc_tiles(grp.layout.tiles_t[k], grp.layout.pm[k]);
    d.vec_ok = vec_ok_but_grad(t, grp.dtype) && aligned16(d.g) ? 1 : 0;
    d.index = t.index;
    descs[k] = d;
    if (grp.lowbit) {
      LowbitDesc l{};
      l.absmax = static_cast<float*>(const_cast<void*>(addr(t.absmax)));
      l.qmax = t.mkind == kMomInt8 ? lbuf.qmax + t.qoff : nullptr;
      l.qold = t.mkind == kMomInt8 ? lbuf.qold + t.qoff : nullptr;
      l.comp = const_cast<void*>(addr(t.comp));
      l.rng = lbuf.rng + 2 * t.index;
      l.mkind = t.mkind;
      l.rounding = grp.rounding;
      reinterpret_cast<LowbitDesc*>(image.data() + lowbit_offset(n))[k] = l;
    }
  }
  for (int64_t k = 0; k <= n; ++k) {
    main_start[k] = static_cast<int32_t>(grp.layout.main_start[k]);
    fin_start[k] = static_cast<int32_t>(grp.layout.fin_start[k]);
    clip_start[k] = static_cast<int32_t>(grp.layout.clip_start[k]);
    reg_start[k] = static_cast<int32_t>(grp.layout.reg_start[k]);
    rest_start[k] = static_cast<int32_t>(grp.layout.rest_start[k]);
  }
  return image;
}

// Copies `image` to a new device table (on `like`'s device) and points grp.tab at it. A new device buffer
// every time: a table that kernels of an earlier step may still read is never overwritten.
void upload(Group& grp, const std::vector<uint8_t>& image, const at::Tensor& like) {
  const int64_t n = static_cast<int64_t>(grp.ts.size());
  const int64_t bytes = static_cast<int64_t>(image.size());
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), image.data(), image.size());
  grp.table_dev = at::empty({bytes}, like.options().dtype(at::kByte));
  grp.table_dev.copy_(host, /*non_blocking=*/true);
  auto* dev = reinterpret_cast<const TensorDesc*>(grp.table_dev.data_ptr());
  grp.tab.t = dev;
  grp.tab.main_start = reinterpret_cast<const int32_t*>(dev + n);
  grp.tab.fin_start = grp.tab.main_start + n + 1;
  grp.tab.clip_start = grp.tab.fin_start + n + 1;
  grp.tab.reg_start = grp.tab.clip_start + n + 1;
  grp.tab.rest_start = grp.tab.reg_start + n + 1;
  grp.tab.n = static_cast<int32_t>(n);
  grp.tab.clip_cols = static_cast<int32_t>(grp.layout.clip_cols);
  grp.tab.lp = grp.lowbit ? reinterpret_cast<const LowbitDesc*>(
                                static_cast<const uint8_t*>(grp.table_dev.data_ptr()) + lowbit_offset(n))
                          : nullptr;
}

void upload_table(Group& grp, const at::Tensor& stats, const std::optional<at::Tensor>& bias_scales,
                  const LowbitBuffers& lbuf = LowbitBuffers{}) {
  upload(grp, table_image(grp, stats.data_ptr<float>(), lbuf), stats);
  grp.tab.scales = ptr_or_null(bias_scales);
}

Hyper make_hyper(double beta1, double beta2, double beta3, double eps1, double eps2, double clip_threshold,
                 double weight_decay, bool maximize, bool bias_correction) {
  for (auto [b, name] : {std::pair<double, const char*>{beta1, "beta1"}, {beta2, "beta2"}, {beta3, "beta3"}}) {
    CAME_CHECK(b >= 0.0 && b < 1.0, "came_kernels: ", name, " must be in [0, 1), got ", b);
  }
  CAME_CHECK(clip_threshold > 0.0, "came_kernels: clip_threshold must be > 0, got ", clip_threshold);
  Hyper h;
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.beta3 = static_cast<float>(beta3);
  // 1-beta in double, rounded once: what torch does with `add_(x, alpha=1-beta)` on fp32 tensors.
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.one_minus_beta3 = static_cast<float>(1.0 - beta3);
  h.eps1 = static_cast<float>(eps1);
  h.eps2 = static_cast<float>(eps2);
  h.clip_threshold = static_cast<float>(clip_threshold);
  h.weight_decay = static_cast<float>(weight_decay);
  h.maximize = maximize;
  h.bias_correction = bias_correction;
  return h;
}

at::Tensor new_floats(int64_t n, const at::Tensor& like) {
  return at::empty({n}, like.options().dtype(at::kFloat));
}

void check_stats(const at::Tensor& stats, const Group& grp, const at::Tensor& p0) {
  CAME_CHECK(stats.device() == p0.device() && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
             stats.numel() >= grp.stats_numel,
             "came_kernels: stats must be a contiguous float32 tensor on ", p0.device(), " with at least ",
             grp.stats_numel, " elements (2*B+1 per non-empty param, 1 per packed one), got ", stats.scalar_type(),
             " with ", stats.numel(), " on ", stats.device());
}

// The arguments every op shares, in the contract's order.
#define CAME_LIST_ARGS                                                                                      \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const OptList &sq_rows,            \
      const OptList &sq_cols, const OptList &res_rows, const OptList &res_cols, const OptList &sqs
#define CAME_HYPER_ARGS                                                                                     \
  const at::Tensor &lr, double beta1, double beta2, double beta3, double eps1, double eps2,                \
      double clip_threshold, double weight_decay, bool maximize, const std::optional<at::Tensor> &amp,      \
      const std::optional<at::Tensor> &bias_scales

enum class Phase { kSqStats, kClipStats, kMomentumRes, kParamStep };

// Everything every op checks before anything is launched: the lists, the scalars, amp and bias_scales.
Group checked_group(CAME_LIST_ARGS, CAME_HYPER_ARGS, Hyper& h) {
  Group grp = make_group(params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs);
  h = make_hyper(beta1, beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize, bias_scales.has_value());
  check_lr(lr, params[0]);
  check_amp(amp, params[0]);
  check_bias_scales(bias_scales, params[0], params.size());
  return grp;
}

// The per-phase ops hand phase 1's clip inputs (W, the flat tensors' block sums: plan.h) to the clip_stats op
// in the workspace of the last sq_stats op, kept here with what identifies its group: the stats buffer and the
// layout. clip_stats takes it (and frees it) only when both match, else it fails before any launch. came_step
// keeps its workspace for the whole step and needs none of this.
struct Handoff {
  std::mutex mu;
  const void* stats = nullptr;
  std::vector<int64_t> key;
  at::Tensor ws;
};
Handoff& handoff() {
  static Handoff h;
  return h;
}
std::vector<int64_t> layout_key(const Group& grp) {
  std::vector<int64_t> k{grp.layout.tiles, grp.layout.clip_cols, grp.layout.ws_floats};
  for (const TensorRef& t : grp.ts) k.insert(k.end(), {t.numel, t.B, t.M, t.N, t.pm, t.stat_off});
  return k;
}

void run_phase(Phase phase, CAME_LIST_ARGS, const at::Tensor& stats, CAME_HYPER_ARGS) {
  Hyper h;
  Group grp = checked_group(params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs, lr, beta1, beta2,
                            beta3, eps1, eps2, clip_threshold, weight_decay, maximize, amp, bias_scales, h);
  check_stats(stats, grp, params[0]);
  if (grp.ts.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor ws;
  if (phase == Phase::kClipStats) {
    Handoff& ho = handoff();
    const std::lock_guard<std::mutex> lock(ho.mu);
    CAME_CHECK(ho.ws.defined() && ho.stats == stats.data_ptr() && ho.key == layout_key(grp) &&
               ho.ws.device() == params[0].device(),
               "came_kernels: clip_stats takes the clip inputs that sq_stats left (plan.h): call sq_stats with the "
               "same tensors and stats buffer first");
    ws = ho.ws;
    ho.ws = at::Tensor();
    ho.stats = nullptr;
    ho.key.clear();
  } else {
    ws = new_floats(grp.layout.ws_floats, params[0]);
  }
  upload_table(grp, stats, bias_scales);
  if (phase == Phase::kSqStats) {
    Handoff& ho = handoff();
    const std::lock_guard<std::mutex> lock(ho.mu);
    ho.stats = stats.data_ptr();
    ho.key = layout_key(grp);
    ho.ws = ws;
  }
  const float* amp_ptr = ptr_or_null(amp);
  switch (phase) {
    case Phase::kSqStats: sq_stats_launch(grp, h, ws.data_ptr<float>(), amp_ptr); break;
    case Phase::kClipStats: clip_stats_launch(grp, h, ws.data_ptr<float>(), amp_ptr); break;
    case Phase::kMomentumRes: momentum_res_launch(grp, h, ws.data_ptr<float>(), amp_ptr); break;
    case Phase::kParamStep: param_step_launch(grp, h, lr, amp_ptr); break;
  }
}

// The four phases of one step, in order, on the current stream (grp.tab uploaded, its scales set). Test hook:
// CAME_KERNELS_CUDA_POISON=1 fills the workspace and the stats with NaN first, so that an element no kernel
// wrote (or a stat left from the step before) shows up as NaN in the results.
void run_phases(const Group& grp, const Hyper& h, const at::Tensor& ws, const at::Tensor& stats,
                const at::Tensor& lr, const std::optional<at::Tensor>& amp) {
  if (env_int("CAME_KERNELS_CUDA_POISON", 0) != 0) {
    ws.fill_(NAN);
    stats.fill_(NAN);
  }
  const float* amp_ptr = ptr_or_null(amp);
  float* ws_ptr = ws.data_ptr<float>();
  sq_stats_launch(grp, h, ws_ptr, amp_ptr);
  clip_stats_launch(grp, h, ws_ptr, amp_ptr);
  momentum_res_launch(grp, h, ws_ptr, amp_ptr);
  param_step_launch(grp, h, lr, amp_ptr);
}

void came_step(CAME_LIST_ARGS, CAME_HYPER_ARGS) {
  Hyper h;
  Group grp = checked_group(params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs, lr, beta1, beta2,
                            beta3, eps1, eps2, clip_threshold, weight_decay, maximize, amp, bias_scales, h);
  if (grp.ts.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // Transient scratch from the caching allocator, freed (stream-ordered) when the step returns: the stats
  // are O(matrices) floats, the workspace the column partials (about numel/32 floats at one row tile per
  // stripe), W and the block sums, at most 64 MiB (plan.h's tiles) for any model of up to ~4M columns.
  at::Tensor stats = new_floats(grp.stats_numel, params[0]);
  at::Tensor ws = new_floats(grp.layout.ws_floats, params[0]);
  upload_table(grp, stats, bias_scales);
  run_phases(grp, h, ws, stats, lr, amp);
}

// came_step with the opt-in low-precision state (momentum_dtype bf16/int8, param_rounding of bf16 params):
// exp_avgs[i] may be bf16 or int8 codes (with exp_avg_absmaxes[i]) for params with ndim >= 2; param_comps[i]
// is the Kahan compensation of a bf16 param under param_rounding = 2; rng, int64 [n, 2], holds the Philox
// key and the step of every param (read on the device). The int8 momenta's block maxima and old absmax go
// through two transient buffers of one slot per 256 elements between phases 3 and 4.
void came_step_lowbit(CAME_LIST_ARGS, const OptList& exp_avg_absmaxes, const OptList& param_comps,
                      int64_t param_rounding, const at::Tensor& rng, CAME_HYPER_ARGS) {
  const size_t n = params.size();
  CAME_CHECK(exp_avg_absmaxes.size() == n && param_comps.size() == n, "came_kernels: exp_avg_absmaxes and "
             "param_comps must have one entry (or None) per param (", n, "), got ", exp_avg_absmaxes.size(),
             " and ", param_comps.size());
  const LowbitArgs lb{&exp_avg_absmaxes, &param_comps, param_rounding, &rng};
  Group grp = make_group(params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs, &lb);
  Hyper h = make_hyper(beta1, beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize,
                       bias_scales.has_value());
  check_lr(lr, params[0]);
  check_amp(amp, params[0]);
  check_bias_scales(bias_scales, params[0], n);
  if (grp.ts.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor stats = new_floats(grp.stats_numel, params[0]);
  at::Tensor ws = new_floats(grp.layout.ws_floats, params[0]);
  const int64_t q = std::max<int64_t>(grp.q_blocks, 1);
  at::Tensor qmax = at::zeros({q}, params[0].options().dtype(at::kInt));  // |m| bits: +0.0 is 0
  at::Tensor qold = new_floats(q, params[0]);
  upload_table(grp, stats, bias_scales, LowbitBuffers{qmax.data_ptr<int32_t>(), qold.data_ptr<float>(),
                                                      rng.data_ptr<int64_t>()});
  run_phases(grp, h, ws, stats, lr, amp);
}

// ---- Plans: a group's checked tensors and uploaded table, kept between steps.
//
// came_step checks every tensor and builds and uploads its table at each call: about as long as the GPU
// work of a small model. came_plan_create does that once and returns a handle; came_plan_step then only
// checks what can change between steps: the grads (their dtype, shape, device, contiguity, against the
// plan's params) and that no param or state tensor of the plan has moved, been resized or restrided (a
// `p.data = ...`, a resize_). A pointer compare per tensor, in C++: a few microseconds for a few hundred
// tensors. Grads that moved are patched into the host image of the table, which is then uploaded to a new
// device buffer; in steady state (the caching allocator hands backward the same grad memory) nothing is
// uploaded at all. The plan holds references to its params and states, never to grads (they would stay
// alive a step longer), and its stats buffer, whose addresses are in the table. Which tensors a plan belongs
// to is the caller's business (the cuda backend keeps one per list of tensors, by identity, and frees it
// with came_plan_free when the optimizer goes away); a plan only ever touches its own tensors.
// Low-precision state: came_plan_create_lowbit; its per-step buffers (rng, the int8 maxima) belong to the plan.
struct Plan {
  std::mutex mu;                              // one step at a time per plan
  Group grp;                                  // t.g undefined: the grads' addresses are in `image` only
  at::Tensor stats;                           // the per-tensor stats slices (their addresses are in the table)
  std::vector<uint8_t> image;                 // the table as last uploaded
  std::vector<bool> vec_ok_but_grad;          // per slot (vec_ok_but_grad above)
  std::vector<at::Tensor> params;             // every param of the lists, empty ones included ...
  std::vector<std::vector<int64_t>> sizes;    // ... with its sizes when the plan was made
  struct Held {
    const void* ptr;
    int64_t numel;
    at::ScalarType dtype;
  };
  std::vector<Held> held;                     // every non-empty tensor it updates, as the plan was made
  // Low-precision state (grp.lowbit): the buffers its table points at. qmax is zeroed and rng copied from the
  // step's rng before each step (two small stream operations instead of a table upload).
  at::Tensor qmax, qold, rng;
};

// The tensors a plan updates, each once, in a fixed order: params, then each slot's state.
template <typename Fn>
void for_each_held(const Plan& pl, Fn fn) {
  for (const at::Tensor& p : pl.params) {
    if (p.numel() > 0) fn(p);
  }
  for (const TensorRef& t : pl.grp.ts) {
    for (const at::Tensor* x : {&t.m, &t.r, &t.c, &t.R, &t.C, &t.v, &t.absmax, &t.comp}) {
      if (x->defined()) fn(*x);
    }
  }
}

struct PlanRegistry {
  std::mutex mu;
  std::unordered_map<int64_t, std::shared_ptr<Plan>> plans;
  int64_t next = 1;  // never reused: a freed handle stays invalid
};
PlanRegistry& registry() {
  static auto* r = new PlanRegistry;  // never destroyed: plans may hold CUDA memory past interpreter exit
  return *r;
}

std::shared_ptr<Plan> find_plan(int64_t handle) {
  PlanRegistry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  const auto it = r.plans.find(handle);
  CAME_CHECK(it != r.plans.end(), "came_kernels: no plan ", handle, " (freed, or never created by "
             "came_plan_create)");
  return it->second;
}

int64_t register_plan(Group grp, at::TensorList params) {
  auto pl = std::make_shared<Plan>();
  pl->grp = std::move(grp);
  Group& g = pl->grp;
  const at::Tensor& p0 = params[0];
  const c10::cuda::CUDAGuard guard(p0.device());
  pl->stats = new_floats(std::max<int64_t>(g.stats_numel, 1), p0);
  LowbitBuffers lbuf;
  if (g.lowbit) {
    const int64_t q = std::max<int64_t>(g.q_blocks, 1);
    pl->qmax = at::zeros({q}, p0.options().dtype(at::kInt));
    pl->qold = new_floats(q, p0);
    pl->rng = at::zeros({static_cast<int64_t>(params.size()), 2}, p0.options().dtype(at::kLong));
    lbuf = LowbitBuffers{pl->qmax.data_ptr<int32_t>(), pl->qold.data_ptr<float>(), pl->rng.data_ptr<int64_t>()};
  }
  pl->image = table_image(g, pl->stats.data_ptr<float>(), lbuf);
  for (int64_t k = 0; k < static_cast<int64_t>(g.ts.size()); ++k) {
    pl->vec_ok_but_grad.push_back(vec_ok_but_grad(g.ts[g.layout.order[k]], g.dtype));
  }
  for (TensorRef& t : g.ts) t.g = at::Tensor();
  if (!g.ts.empty()) upload(g, pl->image, p0);
  for (const at::Tensor& p : params) {
    pl->params.push_back(p);
    pl->sizes.emplace_back(p.sizes().begin(), p.sizes().end());
  }
  for_each_held(*pl, [&](const at::Tensor& x) { pl->held.push_back({x.data_ptr(), x.numel(), x.scalar_type()}); });
  PlanRegistry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  const int64_t handle = r.next++;
  r.plans.emplace(handle, std::move(pl));
  return handle;
}

int64_t came_plan_create(CAME_LIST_ARGS) {
  return register_plan(make_group(params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs), params);
}

// The same for the low-precision state (came_step_lowbit's arguments; rng only for its shape).
int64_t came_plan_create_lowbit(CAME_LIST_ARGS, const OptList& exp_avg_absmaxes, const OptList& param_comps,
                                int64_t param_rounding, const at::Tensor& rng) {
  const size_t n = params.size();
  CAME_CHECK(exp_avg_absmaxes.size() == n && param_comps.size() == n, "came_kernels: exp_avg_absmaxes and "
             "param_comps must have one entry (or None) per param (", n, "), got ", exp_avg_absmaxes.size(),
             " and ", param_comps.size());
  const LowbitArgs lb{&exp_avg_absmaxes, &param_comps, param_rounding, &rng};
  return register_plan(make_group(params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, sqs, &lb), params);
}

void came_plan_free(int64_t handle) {
  PlanRegistry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  r.plans.erase(handle);  // the kernels of a step already queued keep their memory: frees are stream-ordered
}

// Whether every param and state of the plan is where, and as, it was when the plan was made.
bool unchanged(const Plan& pl) {
  for (size_t i = 0; i < pl.params.size(); ++i) {
    const at::Tensor& p = pl.params[i];
    if (p.scalar_type() != pl.grp.dtype || p.sizes() != at::IntArrayRef(pl.sizes[i]) || !p.is_contiguous()) {
      return false;
    }
  }
  size_t k = 0;
  bool same = true;
  for_each_held(pl, [&](const at::Tensor& x) {
    same = same && k < pl.held.size() && x.data_ptr() == pl.held[k].ptr && x.numel() == pl.held[k].numel &&
           x.scalar_type() == pl.held[k].dtype && x.is_contiguous();
    ++k;
  });
  return same && k == pl.held.size();
}

// came_plan_step's answers: the step ran; the plan's tensors changed (make a new plan); the grads are not what
// the plan takes as they are (not contiguous, or not like their params: take came_step, which copies or
// names the problem). Nothing is launched unless the answer is kPlanRan.
constexpr int64_t kPlanRan = 0, kPlanStale = 1, kPlanGrads = 2;

int64_t came_plan_step(int64_t handle, at::TensorList grads, CAME_HYPER_ARGS, const std::optional<at::Tensor>& rng) {
  const std::shared_ptr<Plan> plp = find_plan(handle);
  Plan& pl = *plp;
  const std::lock_guard<std::mutex> lock(pl.mu);
  const size_t n = pl.params.size();
  const at::Tensor& p0 = pl.params[0];
  const Hyper h = make_hyper(beta1, beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize,
                             bias_scales.has_value());
  check_lr(lr, p0);
  check_amp(amp, p0);
  check_bias_scales(bias_scales, p0, n);
  CAME_CHECK(rng.has_value() == pl.grp.lowbit, "came_kernels: came_plan_step takes rng exactly for a plan with "
             "low-precision state (came_plan_create_lowbit)");
  if (rng.has_value()) check_rng(*rng, p0, n);
  if (!unchanged(pl)) return kPlanStale;
  if (grads.size() != n) return kPlanGrads;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& p = pl.params[i];
    if (!g.defined() || g.layout() != at::kStrided || g.device() != p.device() || g.scalar_type() != p.scalar_type() ||
        g.sizes() != p.sizes() || !g.is_contiguous()) {
      return kPlanGrads;
    }
  }
  Group& grp = pl.grp;
  if (grp.ts.empty()) return kPlanRan;
  const c10::cuda::CUDAGuard guard(p0.device());
  auto* descs = reinterpret_cast<TensorDesc*>(pl.image.data());
  bool moved = false;
  for (size_t k = 0; k < grp.ts.size(); ++k) {
    const void* g = grads[grp.ts[grp.layout.order[k]].index].data_ptr();
    if (descs[k].g != g) {
      descs[k].g = g;
      descs[k].vec_ok = pl.vec_ok_but_grad[k] && aligned16(g) ? 1 : 0;
      moved = true;
    }
  }
  if (moved) upload(grp, pl.image, p0);
  grp.tab.scales = ptr_or_null(bias_scales);
  if (grp.lowbit) {  // the table points at the plan's buffers: this step's rng, the int8 maxima from zero
    pl.rng.copy_(*rng, /*non_blocking=*/true);
    pl.qmax.zero_();
  }
  at::Tensor ws = new_floats(grp.layout.ws_floats, p0);
  run_phases(grp, h, ws, pl.stats, lr, amp);
  return kPlanRan;
}

#define CAME_PHASE_OP(FN, PHASE)                                                     \
  void FN(CAME_LIST_ARGS, const at::Tensor& stats, CAME_HYPER_ARGS) {               \
    run_phase(PHASE, params, grads, exp_avgs, sq_rows, sq_cols, res_rows, res_cols, \
              sqs, stats, lr, beta1, beta2, beta3, eps1, eps2, clip_threshold,      \
              weight_decay, maximize, amp, bias_scales);                            \
  }
CAME_PHASE_OP(sq_stats, Phase::kSqStats)
CAME_PHASE_OP(clip_stats, Phase::kClipStats)
CAME_PHASE_OP(momentum_res, Phase::kMomentumRes)
CAME_PHASE_OP(param_step, Phase::kParamStep)

}  // namespace
}  // namespace came

// Schemas: the contract's lists, then (phase ops) the stats buffer, then lr as a 1-element fp32 device tensor,
// the scalars and the two optional device tensors (read only). Mutated arguments carry alias annotations so
// torch knows what each op writes.
#define CAME_SCHEMA_LISTS                                                                           \
  "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)?[] exp_avg_sq_rows, "    \
  "Tensor(d!)?[] exp_avg_sq_cols, Tensor(e!)?[] exp_avg_res_rows, Tensor(f!)?[] exp_avg_res_cols, " \
  "Tensor(g!)?[] exp_avg_sqs, "
#define CAME_SCHEMA_HYPER                                                                                   \
  "Tensor lr, float beta1, float beta2, float beta3, float eps1, float eps2, float clip_threshold, "       \
  "float weight_decay, bool maximize, Tensor? amp=None, Tensor? bias_scales=None) -> ()"

#define CAME_SCHEMA_LISTS_RO                                                                      \
  "Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor?[] exp_avg_sq_rows, Tensor?[] exp_avg_sq_cols, " \
  "Tensor?[] exp_avg_res_rows, Tensor?[] exp_avg_res_cols, Tensor?[] exp_avg_sqs"
#define CAME_SCHEMA_HYPER_INT                                                                               \
  "Tensor lr, float beta1, float beta2, float beta3, float eps1, float eps2, float clip_threshold, "       \
  "float weight_decay, bool maximize, Tensor? amp=None, Tensor? bias_scales=None, Tensor? rng=None) -> int"

// `import came_kernels._C` loads this library, which registers the ops below; the module itself is empty
// (no pybind11: it would add ~50 s of compile time for nothing).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "came_kernels CUDA ops (torch.ops.came_kernels)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(came_kernels, m) {
  // One full CAME step (all four phases) for one (device, dtype) group; what the cuda backend calls.
  m.def("came_step(" CAME_SCHEMA_LISTS CAME_SCHEMA_HYPER);
  // The same with the opt-in low-precision state (momentum_dtype, param_rounding); what the cuda backend
  // calls for groups that use it.
  m.def("came_step_lowbit(" CAME_SCHEMA_LISTS "Tensor(h!)?[] exp_avg_absmaxes, Tensor(i!)?[] param_comps, "
        "int param_rounding, Tensor rng, " CAME_SCHEMA_HYPER);
  // A plan: the checked group and its uploaded table, kept until came_plan_free; came_plan_step runs a step of
  // it with new grads (0: ran; 1: its tensors changed, make a new plan; 2: take came_step for these grads);
  // the low-precision state's plans (came_plan_create_lowbit) take the step's rng as well.
  // It updates the plan's params and states, which its schema cannot name: call it only where a mutation
  // nobody declared is fine (eagerly, or inside an op that declares them, as came_kernels::fused_step does).
  m.def("came_plan_create(" CAME_SCHEMA_LISTS_RO ") -> int");
  m.def("came_plan_create_lowbit(" CAME_SCHEMA_LISTS_RO ", Tensor?[] exp_avg_absmaxes, Tensor?[] param_comps, "
        "int param_rounding, Tensor rng) -> int");
  m.def("came_plan_step(int plan, Tensor[] grads, " CAME_SCHEMA_HYPER_INT);
  m.def("came_plan_free(int plan) -> ()", &came::came_plan_free);
  // Phase 1: EMAs of g^2 (r, c or v) and mean_M(r) into stats.
  m.def("sq_stats(" CAME_SCHEMA_LISTS "Tensor(h!) stats, " CAME_SCHEMA_HYPER);
  // Phase 2: the clip divisor max(1, RMS(u)/d) of every tensor into stats.
  m.def("clip_stats(" CAME_SCHEMA_LISTS "Tensor(h!) stats, " CAME_SCHEMA_HYPER);
  // Phase 3: momentum m and the residual EMAs (R, C), mean_M(R) into stats.
  m.def("momentum_res(" CAME_SCHEMA_LISTS "Tensor(h!) stats, " CAME_SCHEMA_HYPER);
  // Phase 4: the parameter update with decoupled weight decay.
  m.def("param_step(" CAME_SCHEMA_LISTS "Tensor(h!) stats, " CAME_SCHEMA_HYPER);
}

TORCH_LIBRARY_IMPL(came_kernels, CUDA, m) {
  m.impl("came_step", &came::came_step);
  m.impl("came_step_lowbit", &came::came_step_lowbit);
  m.impl("came_plan_create", &came::came_plan_create);
  m.impl("came_plan_create_lowbit", &came::came_plan_create_lowbit);
  m.impl("came_plan_step", &came::came_plan_step);
  m.impl("sq_stats", &came::sq_stats);
  m.impl("clip_stats", &came::clip_stats);
  m.impl("momentum_res", &came::momentum_res);
  m.impl("param_step", &came::param_step);
}
