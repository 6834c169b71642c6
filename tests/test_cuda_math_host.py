"""The CUDA extension's per-element math, proven on the CPU.

csrc/came_math.cuh is compiled with g++ (its `__host__ __device__` qualifiers are empty there) into a tiny
shared library, tests/cuda_host/came_math_host.cpp, that composes the kernels' functions in the kernels'
phase order. It is run for 60 steps against the torch backend (the spec) on every shape class, also with
GradScaler's unscale (g * 1/scale wherever a phase reads it) and with the bias correction's scales. The GPU
plumbing (tables, stripes, vector loads, partial sums) is tested by tests/test_cuda_backend.py on a GPU,
and .ci/check_cuda.sh compiles it with nvcc.

The op schemas of csrc/ops.cpp are parsed here too, so a schema typo fails on the CPU, not at import on a GPU.
"""
import ctypes
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from came_kernels.backends import torch_backend
from came_testing import new_state
from oracle import assert_close_rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

SHAPES = [(), (7,), (1, 33), (33, 1), (1, 1), (37, 53), (129, 70), (3, 5, 7), (4, 3, 3, 3), (2, 1, 5, 1),
          (2, 8193)]  # N > 8192: the clip from u directly (phase 2), the others from P and W


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++ not on PATH, CXX unset): cannot build the host math test")
    out = tmp_path_factory.mktemp("came_math_host") / "came_math_host.so"
    cmd = [CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
           # no FMA contraction, so the host math is the plain IEEE sequence the spec computes on the CPU
           "-ffp-contract=off", f"-I{ROOT}/csrc", f"{ROOT}/tests/cuda_host/came_math_host.cpp", "-o", str(out)]
    subprocess.run(cmd, check=True)
    so = ctypes.CDLL(str(out))
    f, i64, d, i = ctypes.c_float, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    ptr = ctypes.c_void_p
    so.came_clip_divisor.restype = f
    so.came_clip_divisor.argtypes = [d, i64, f]
    so.came_clip_divisor_scaled.restype = f
    so.came_clip_divisor_scaled.argtypes = [d, i64, f, f]
    for fn in (so.came_clip_total_identity, so.came_clip_total_direct):
        fn.restype = d
        fn.argtypes = [ptr] * 3 + [i64] * 3 + [f]
    so.came_param_step_folded.restype = f
    so.came_param_step_folded.argtypes = [f, f, f, f]
    so.came_step_flat.restype = None
    # ... hyperparameters, maximize, then 1/scale (fp32, as the kernels read it) and the bias scales
    so.came_step_flat.argtypes = [ptr] * 4 + [i64] + [d] * 8 + [i] + [f, i, f, f]
    so.came_step_factored.restype = None
    so.came_step_factored.argtypes = [ptr] * 7 + [i64] * 3 + [d] * 8 + [i] + [f, i, f, f]
    return so


def _inv_scale(grad_scale):
    """1/scale as the glue hands it to the kernels (_contiguous.amp_flags: in double, rounded to fp32)."""
    return float(torch.tensor(grad_scale, dtype=torch.float64).reciprocal().float())


def _host_step(lib, p, g, st, *, lr, beta1, beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize,
               inv_scale=1.0, scales=None):
    """One step of the host build; `scales` = (s_u, s_m) turns the bias correction on."""
    bias = (0, 1.0, 1.0) if scales is None else (1, float(scales[0]), float(scales[1]))
    hyper = (beta1, beta2, beta3, eps1, eps2, clip_threshold, lr, weight_decay, int(maximize), inv_scale, *bias)
    if p.ndim >= 2:
        M, N = p.shape[-2], p.shape[-1]
        B = p.numel() // (M * N)
        lib.came_step_factored(p.data_ptr(), g.data_ptr(), st["m"].data_ptr(), st["r"].data_ptr(), st["c"].data_ptr(),
                               st["R"].data_ptr(), st["C"].data_ptr(), B, M, N, *hyper)
    else:
        lib.came_step_flat(p.data_ptr(), g.data_ptr(), st["m"].data_ptr(), st["v"].data_ptr(), p.numel(), *hyper)


_state = new_state


@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, False), (0.05, True)])
def test_host_math_matches_torch_backend_60_steps_every_shape(lib, weight_decay, maximize):
    gen = torch.Generator().manual_seed(7)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                 weight_decay=weight_decay, maximize=maximize)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [x.clone() for x in init]
    spec = [x.clone() for x in init]
    ours_st = [_state(x) for x in init]
    spec_st = [_state(x) for x in init]
    for step in range(60):
        scale = 1e4 if step % 11 == 5 else (0.0 if step % 13 == 6 else 1.0)  # spikes (clipping) and zero grads
        grads = [torch.randn(s, generator=gen) * scale for s in SHAPES]
        for p, g, st in zip(ours, grads, ours_st):
            _host_step(lib, p, g, st, **hyper)
        torch_backend.came_step(
            spec, grads, [s["m"] for s in spec_st], [s.get("r") for s in spec_st], [s.get("c") for s in spec_st],
            [s.get("R") for s in spec_st], [s.get("C") for s in spec_st], [s.get("v") for s in spec_st],
            cache={}, **hyper)
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert_close_rel(a, b, 2e-6, f"param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 1e-4, f"state {k} of {tuple(a.shape)}")


@pytest.mark.parametrize("grad_scale", [2.0 ** 14, 3.0, 0.25])
def test_host_math_with_grad_scale_matches_torch_backend(lib, grad_scale):
    # The kernels multiply g by 1/scale wherever they read it (phases 1, 2, 3); the spec unscales in
    # phase 1 and scales u in phase 2. A power-of-2 scale is exact either way; 3.0 is not (rounding only).
    # CAME's u is nearly invariant to a scale of g, but r, c and v are not: a phase that forgot the unscale
    # shows in the state, and in the clip (a scaled u hits the threshold).
    gen = torch.Generator().manual_seed(8)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                 weight_decay=0.1, maximize=True)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    for step in range(30):
        scale = 1e4 if step % 11 == 5 else 1.0
        grads = [torch.randn(s, generator=gen) * scale * grad_scale for s in SHAPES]  # as backward under a scaler
        for p, g, st in zip(ours, grads, ours_st):
            _host_step(lib, p, g, st, inv_scale=_inv_scale(grad_scale), **hyper)
        torch_backend.came_step(
            spec, grads, [s["m"] for s in spec_st], [s.get("r") for s in spec_st], [s.get("c") for s in spec_st],
            [s.get("R") for s in spec_st], [s.get("C") for s in spec_st], [s.get("v") for s in spec_st],
            cache={}, grad_scale=torch.tensor(grad_scale), found_inf=torch.tensor(0.0), **hyper)
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert_close_rel(a, b, 2e-6, f"param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 1e-4, f"state {k} of {tuple(a.shape)}")


def test_host_math_without_the_unscale_is_far_off(lib):
    # The check above can fail: the same scaled grads with inv_scale = 1 (no unscale) move r, c and the param.
    gen = torch.Generator().manual_seed(9)
    p0, g = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen) * 1024.0
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
              weight_decay=0.0, maximize=False)
    a, b = p0.clone(), p0.clone()
    sa, sb = _state(a), _state(b)
    _host_step(lib, a, g, sa, inv_scale=1.0 / 1024.0, **kw)
    _host_step(lib, b, g, sb, **kw)
    assert (sa["r"] * 1024.0 ** 2 - sb["r"]).abs().max() < 1e-5 * sb["r"].abs().max()  # r scales with g^2
    assert not torch.allclose(sa["r"], sb["r"], rtol=0.5)


@pytest.mark.parametrize("s_u", [1.0, 0.0316, 0.5, 1.7, 40.0])
@pytest.mark.parametrize("d,scale", [(1.0, 1.0), (1.0, 1e-3), (0.5, 20.0)])
def test_clip_divisor_with_bias_correction(lib, s_u, d, scale):
    # Phase 3 computes u / divisor; with bias correction that must be s_u*u / max(1, RMS(s_u*u)/d), in float64
    # here. The cases clip (RMS(s_u*u) > d) and do not, and s_u moves tensors across the threshold.
    gen = torch.Generator().manual_seed(10)
    u = (torch.randn(257, generator=gen) * scale).float()
    div = lib.came_clip_divisor_scaled(float((u * u).sum()), u.numel(), d, s_u)
    su = s_u * u.double()
    want = su / max(1.0, float(su.square().mean().sqrt()) / d)
    assert_close_rel(u.double() / div, want, 1e-6, f"s_u={s_u} d={d}")
    if s_u == 1.0:  # no correction: the divisor of today, to the bit
        assert div == lib.came_clip_divisor(float((u * u).sum()), u.numel(), d)


@pytest.mark.parametrize("terms", [("exp_avg", "exp_avg_sq", "exp_avg_res"), ("exp_avg_sq",), ("exp_avg",)])
def test_host_math_with_bias_scales_matches_torch_backend(lib, terms):
    # The kernels' placement of the bias correction (s_u in the clip divisor, s_m on the update) against the
    # spec's (u *= s_u before the clip, update *= s_m), 40 steps; tensors start at different step counts, so
    # every tensor has its own row of scales.
    gen = torch.Generator().manual_seed(12)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                 weight_decay=0.1, maximize=False)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    for step in range(40):
        scale = 1e4 if step % 11 == 5 else 1.0
        grads = [torch.randn(s, generator=gen) * scale for s in SHAPES]
        steps = [torch.tensor(float(step + 1 + 3 * (i % 3))) for i in range(len(SHAPES))]
        bs = torch_backend.bias_scales(steps, [len(s) >= 2 for s in SHAPES], terms, beta1=0.9, beta2=0.999,
                                       beta3=0.9999)
        for p, g, st, row in zip(ours, grads, ours_st, bs):
            _host_step(lib, p, g, st, scales=row.tolist(), **hyper)
        torch_backend.came_step(
            spec, grads, [s["m"] for s in spec_st], [s.get("r") for s in spec_st], [s.get("c") for s in spec_st],
            [s.get("R") for s in spec_st], [s.get("C") for s in spec_st], [s.get("v") for s in spec_st],
            cache={}, bias_scales=bs, **hyper)
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert_close_rel(a, b, 2e-6, f"param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 1e-4, f"state {k} of {tuple(a.shape)}")


def test_host_math_with_bias_scales_differs_from_without(lib):
    # The check above can fail: the scales of an early step (t = 2; s_m ~ 0.07 here) change the update by far
    # more than its tolerance.
    p0, g = torch.randn(6, 5), torch.randn(6, 5)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
              weight_decay=0.0, maximize=False)
    bs = torch_backend.bias_scales([torch.tensor(2.0)], [True], ("exp_avg", "exp_avg_sq", "exp_avg_res"),
                                   beta1=0.9, beta2=0.999, beta3=0.9999)
    a, b = p0.clone(), p0.clone()
    _host_step(lib, a, g, _state(a), scales=bs[0].tolist(), **kw)
    _host_step(lib, b, g, _state(b), **kw)
    assert not torch.allclose(a - p0, b - p0, rtol=0.5)


def test_clip_divisor_with_bias_correction_keeps_nan(lib):
    assert math.isnan(lib.came_clip_divisor_scaled(float("nan"), 4, 1.0, 0.5))   # a NaN gradient must show
    assert math.isnan(lib.came_clip_divisor_scaled(4.0, 4, 1.0, float("nan")))
    assert lib.came_clip_divisor_scaled(0.0, 10, 1.0, 0.5) == 2.0                  # max(1, 0) / s_u


def test_host_math_really_differs_when_the_math_differs(lib):
    # A check that can fail: a different eps1 must move r and c of a tiny-gradient tensor well past tolerance.
    p1, p2 = torch.ones(4, 5), torch.ones(4, 5)
    g = torch.full((4, 5), 1e-3)
    s1, s2 = _state(p1), _state(p2)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps2=1e-16, clip_threshold=1.0, weight_decay=0.0,
              maximize=False)
    _host_step(lib, p1, g, s1, eps1=1e-30, **kw)
    _host_step(lib, p2, g, s2, eps1=1e-3, **kw)
    assert (s1["r"] - s2["r"]).abs().max() > 1e-4 * s2["r"].abs().max()


def test_clip_divisor_is_at_least_one_and_keeps_nan(lib):
    assert lib.came_clip_divisor(0.0, 10, 1.0) == 1.0
    assert lib.came_clip_divisor(10.0, 10, 1.0) == 1.0                       # RMS exactly d
    assert lib.came_clip_divisor(400.0, 4, 1.0) == pytest.approx(10.0, rel=1e-7)
    assert lib.came_clip_divisor(400.0, 4, 2.0) == pytest.approx(5.0, rel=1e-7)
    assert math.isnan(lib.came_clip_divisor(float("nan"), 4, 1.0))          # a NaN gradient must show
    assert math.isinf(lib.came_clip_divisor(float("inf"), 4, 1.0))


# ------------------------------------------------------------------ the clip's sum(u^2) without a re-read of g
def _totals(lib, g, r, c, inv=1.0):
    B, M, N = g.shape
    g, r, c = g.contiguous(), r.contiguous(), c.contiguous()
    ident = lib.came_clip_total_identity(g.data_ptr(), r.data_ptr(), c.data_ptr(), B, M, N, inv)
    direct = lib.came_clip_total_direct(g.data_ptr(), r.data_ptr(), c.data_ptr(), B, M, N, inv)
    return ident, direct


def _new_rc(g, beta2=0.999, eps1=1e-30):
    """r, c after one step from zero state, in fp32 as the kernels form them."""
    sq = g.float() * g.float()
    return (1 - beta2) * (sq.mean(-1) + eps1), (1 - beta2) * (sq.mean(-2) + eps1)


def _float64_total(g, r, c):
    """sum(u^2) in float64 from the same fp32 g, r, c."""
    g, r, c = g.double(), r.double(), c.double()
    u = g * (r / r.mean(-1, keepdim=True)).rsqrt()[..., None] * c.rsqrt()[..., None, :]
    return float((u * u).sum())


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-16, 1e-8, 1.0, 1e8, 1e16, 1e18, 1e19])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 33), (1, 33, 1), (1, 37, 53), (3, 70, 131)])
def test_clip_total_from_p_and_w_equals_the_direct_sum(lib, scale, shape):
    # The identity sum u^2 = sum_b mean_M(r) * sum_j P_j / c_j (came_math.cuh) against u formed as the spec does,
    # over grads from 1e-30 (g^2 underflows in fp32; t = g * rsqrt(r) does not) to 1e19 (g^2 near fp32's top).
    gen = torch.Generator().manual_seed(30)
    g = (torch.randn(shape, generator=gen) * scale).float()
    if scale >= 1e19:
        g = g.clamp(-1.5e19, 1.5e19)  # g^2 < FLT_MAX: larger g overflows r in the spec as well
    r, c = _new_rc(g)
    ident, direct = _totals(lib, g, r, c)
    want = _float64_total(g, r, c)
    if not math.isfinite(want):  # r or c overflowed: both must say so, never a finite number
        assert not math.isfinite(ident) and not math.isfinite(direct)
        return
    assert math.isfinite(ident)  # (0 where c overflowed: rsqrt(inf) = 0, in the spec as well)
    assert ident == pytest.approx(want, rel=2e-5) and ident == pytest.approx(direct, rel=2e-5)
    # and the divisor it gives is the one the direct sum gives
    n = g.numel()
    assert lib.came_clip_divisor(ident, n, 1.0) == pytest.approx(lib.came_clip_divisor(direct, n, 1.0), rel=1e-5)


def test_clip_total_with_tiny_sparse_grads_needs_fp64_w(lib):
    # r and c near fp32's smallest normal (tiny grads against eps1, after many steps of decay) and one row of
    # grads: t = g * rsqrt(r) ~ 1 but P_j / c_j ~ 1e38 * M passes FLT_MAX; in fp64 it does not, and the total
    # (mean_M(r) ~ 1e-38 brings it back) equals the direct sum. A fp32 W would give inf: a divisor of inf.
    M, N = 64, 8
    g = torch.zeros(1, M, N)
    g[0, 5, :] = 1.2e-19
    g[0, 9, ::3] = -3e-19
    r = torch.full((1, M), 1.5e-38)
    c = torch.full((1, N), 1.2e-38)
    ident, direct = _totals(lib, g, r, c)
    p = ((g * r.rsqrt()[..., None]) ** 2).sum(-2)  # fp32 P_j
    assert not torch.isfinite(p / c).all()  # the fp32 quotient overflows ...
    assert math.isfinite(ident) and ident == pytest.approx(_float64_total(g, r, c), rel=1e-5)  # ... fp64 does not
    assert ident == pytest.approx(direct, rel=1e-5)


def test_clip_total_of_zero_grads_is_zero_and_nan_shows(lib):
    g = torch.zeros(2, 5, 7)
    r, c = _new_rc(g)
    ident, direct = _totals(lib, g, r, c)
    assert ident == direct == 0.0 and lib.came_clip_divisor(ident, g.numel(), 1.0) == 1.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        gb = torch.randn(2, 5, 7)
        gb[1, 2, 3] = bad
        r, c = _new_rc(gb)
        ident, _ = _totals(lib, gb, r, c)
        assert math.isnan(ident), bad
        assert math.isnan(lib.came_clip_divisor(ident, gb.numel(), 1.0))
    # finite grads whose squares overflow r (r = inf): the spec's u is inf / inf = NaN, so is the identity's total
    gb = torch.ones(1, 4, 6)
    gb[0, 1, :] = 3e19
    r, c = _new_rc(gb)
    assert torch.isinf(r).any()
    ident, direct = _totals(lib, gb, r, c)
    assert math.isnan(ident) and math.isnan(direct)
    # eps1 = 0 and a zero row: r_i = 0, the spec's u there is 0 * inf = NaN; so is t
    gz = torch.randn(1, 4, 6)
    gz[0, 2, :] = 0.0
    r, c = _new_rc(gz, eps1=0.0)
    assert math.isnan(_totals(lib, gz, r, c)[0])


def test_clip_total_identity_can_fail(lib):
    # A check that can fail: the identity with the old r (before this step's EMA) is far off.
    gen = torch.Generator().manual_seed(31)
    g = torch.randn(1, 40, 30, generator=gen)
    r, c = _new_rc(g)
    ident, direct = _totals(lib, g, r * torch.rand(1, 40, generator=gen), c)
    _, want = _totals(lib, g, r, c)
    assert abs(ident - want) > 1e-3 * want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_param_step_folds_the_decay_like_the_torch_backend(lib, dtype):
    # bf16/fp16 params: p - (lr*update + lr*wd*p) in fp32, rounded once (the torch backend's and Triton's
    # form). The torch backend's CPU add may fuse a multiply-add, so allow one ulp of the param dtype, rarely.
    gen = torch.Generator().manual_seed(11)
    p = (torch.randn(4096, generator=gen) * 3).to(dtype)
    update = torch.randn(4096, generator=gen) * 0.5
    lr, wd = 3e-2, 0.1
    spec = p.clone()
    torch_backend._apply_update_(spec, update.clone(), lr, wd)
    ours = torch.tensor([lib.came_param_step_folded(float(a), float(u), lr, wd)
                         for a, u in zip(p.float().tolist(), update.tolist())]).to(dtype)
    ulp = (spec.float().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
    assert ((ours.float() - spec.float()).abs() <= ulp).all()
    assert (ours == spec).float().mean() >= 0.99
    # a check that can fail: no decay at all is far off
    no_decay = (p.float() - lr * update).to(dtype)
    assert (no_decay != spec).float().mean() > 0.2


def _schemas():
    src = open(os.path.join(ROOT, "csrc", "ops.cpp")).read()
    macros = {}
    for name in ("CAME_SCHEMA_LISTS", "CAME_SCHEMA_HYPER", "CAME_SCHEMA_LISTS_RO", "CAME_SCHEMA_HYPER_INT"):
        body = re.search(rf"#define {name}\s*\\\n((?:.*\\\n)*.*\n)", src).group(1)
        macros[name] = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))
    defs = re.findall(r'm\.def\(((?:"[^"]*"|\s|CAME_SCHEMA_\w+)+)[,)]', src)
    assert len(defs) == 10, defs
    out = []
    for d in defs:
        parts = re.findall(r'"([^"]*)"|(CAME_SCHEMA_\w+)', d)
        out.append("".join(lit or macros[mac] for lit, mac in parts))
    return out


_HYPER_ARGS = ["lr", "beta1", "beta2", "beta3", "eps1", "eps2", "clip_threshold", "weight_decay", "maximize", "amp",
               "bias_scales"]


def test_op_schemas_in_ops_cpp_parse():
    names = []
    for s in _schemas():
        schema = torch._C.parse_schema("came_kernels::" + s)
        names.append(schema.name)
        args = [a.name for a in schema.arguments]
        mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        if schema.name.startswith("came_kernels::came_plan_"):  # plans: see the next test
            continue
        assert args[:8] == ["params", "grads", "exp_avgs", "exp_avg_sq_rows", "exp_avg_sq_cols",
                            "exp_avg_res_rows", "exp_avg_res_cols", "exp_avg_sqs"], args
        assert args[-11:] == ["lr", "beta1", "beta2", "beta3", "eps1", "eps2", "clip_threshold", "weight_decay",
                              "maximize", "amp", "bias_scales"], args
        for opt in schema.arguments[-2:]:  # optional, default None: the ops run as before without them
            assert str(opt.type) == "Optional[Tensor]" and opt.has_default_value() and opt.default_value is None
        assert {"params", "exp_avgs", "exp_avg_sq_rows", "exp_avg_sqs"} <= mutated and "grads" not in mutated
        assert not mutated & {"amp", "bias_scales", "rng"}
        if schema.name == "came_kernels::came_step_lowbit":  # the low-precision state, between lists and lr
            assert args[8:12] == ["exp_avg_absmaxes", "param_comps", "param_rounding", "rng"], args
            assert {"exp_avg_absmaxes", "param_comps"} <= mutated
    assert sorted(names) == sorted(["came_kernels::" + n for n in (
        "came_step", "came_step_lowbit", "sq_stats", "clip_stats", "momentum_res", "param_step", "came_plan_create",
        "came_plan_create_lowbit", "came_plan_step", "came_plan_free")])


def test_plan_op_schemas():
    # came_plan_create takes the contract's lists (kept, not written) and returns a handle, and so does
    # came_plan_create_lowbit with the low-precision state's lists after them (as came_step_lowbit);
    # came_plan_step takes the handle, the grads, the hyperparameters of came_step and the low-precision
    # state's rng, and answers 0/1/2; came_plan_free takes a handle.
    schemas = {x.name: x for x in (torch._C.parse_schema("came_kernels::" + s) for s in _schemas())}
    create, low, step, free = (schemas["came_kernels::came_plan_" + n]
                               for n in ("create", "create_lowbit", "step", "free"))
    lists = ["params", "grads", "exp_avgs", "exp_avg_sq_rows", "exp_avg_sq_cols", "exp_avg_res_rows",
             "exp_avg_res_cols", "exp_avg_sqs"]
    assert [a.name for a in create.arguments] == lists
    assert [a.name for a in low.arguments] == lists + ["exp_avg_absmaxes", "param_comps", "param_rounding", "rng"]
    assert str(create.returns[0].type) == str(low.returns[0].type) == "int"
    assert [a.name for a in step.arguments] == ["plan", "grads"] + _HYPER_ARGS + ["rng"]
    assert str(step.arguments[-1].type) == "Optional[Tensor]" and step.arguments[-1].default_value is None
    assert str(step.returns[0].type) == "int"
    assert [a.name for a in free.arguments] == ["plan"] and not free.returns
    for schema in (create, low, step, free):
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


# ------------------------------------------------------------------ the opt-in low-precision state
# csrc/came_math.cuh's Philox, stochastic rounding and int8 quantization against the spec (torch_backend's
# philox, random_bits, sr_bf16, quantize_blockwise, dequantize_blockwise), bit for bit on the same inputs.
@pytest.fixture(scope="module")
def lp(lib):
    u32, i64, f, ptr = ctypes.c_uint32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.came_philox_first.restype = u32
    lib.came_philox_first.argtypes = [ctypes.c_uint64, u32, u32, u32, u32]
    lib.came_random_bits.argtypes = [i64, i64, ptr, i64, u32, ptr]
    lib.came_sr_bf16.argtypes = [ptr, ptr, i64, ptr]
    lib.came_rne_bf16.argtypes = [ptr, i64, ptr]
    lib.came_quantize_blockwise.argtypes = [ptr, ptr, i64, ptr, ptr, ptr]
    lib.came_dequantize_blockwise.argtypes = [ptr, ptr, i64, ptr]
    lib.came_param_store_bf16.argtypes = [ptr, ptr, ptr, i64, f, f, ctypes.c_int, i64, i64]
    return lib


def _bits(lib, key, step, idx, stream):
    out = torch.empty(idx.numel(), dtype=torch.int32)
    lib.came_random_bits(key, step, idx.data_ptr(), idx.numel(), stream, out.data_ptr())
    return out.to(torch.int64) & 0xFFFFFFFF


def _special_floats(gen, n):
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-130, 128, (n,), generator=gen).float())
    return torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40,
                                       3.3895e38, -3.4e38, 1.0, 1.00390625, 1.0 + 2 ** -9, 255.5])])


def test_host_philox_matches_the_published_vectors_and_the_spec(lp):
    # Random123's known answers (first word), then the spec on random keys and counters
    kat = [((0, 0), (0, 0, 0, 0), 0x6627e8d5), ((0xffffffff, 0xffffffff), (0xffffffff,) * 4, 0x408f276d),
           ((0xa4093822, 0x299f31d0), (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), 0xd16cfe09)]
    for (k0, k1), ctr, want in kat:
        assert lp.came_philox_first(k0 | (k1 << 32), *ctr) == want
    gen = torch.Generator().manual_seed(20)
    for _ in range(20):
        key = int(torch.randint(0, 2 ** 62, (), generator=gen)) | (1 << 63 if _ % 2 else 0)
        c = [int(x) for x in torch.randint(0, 2 ** 32, (4,), generator=gen)]
        skey = torch.tensor(key - 2 ** 64 if key >= 2 ** 63 else key)
        want = int(torch_backend.philox(skey, torch.tensor([c[0]]), c[1], c[2], c[3])[0])
        assert lp.came_philox_first(key, *c) == want


@pytest.mark.parametrize("stream", [torch_backend.STREAM_MOMENTUM, torch_backend.STREAM_PARAM])
def test_host_random_bits_equal_the_specs_per_element(lp, stream):
    # counters (index lo, index hi, step lo, stream) and key (seed, tensor id), indices past 2^32 included
    gen = torch.Generator().manual_seed(21)
    idx = torch.cat([torch.arange(3000), torch.randint(0, 2 ** 40, (3000,), generator=gen),
                     torch.tensor([2 ** 32 - 1, 2 ** 32, 2 ** 33 + 5])])
    for seed, tid, step in [(0, 0, 1), (1234, 7, 99), (2 ** 32 - 1, 2 ** 31 - 1, 2 ** 33 + 3)]:
        key = torch_backend.rng_keys(seed, [tid])[0]
        rng = torch.tensor([key, step])
        want = torch_backend.philox(rng[0], idx & 0xFFFFFFFF, idx >> 32, rng[1] & 0xFFFFFFFF, stream)[0]
        got = _bits(lp, key, step, idx, stream)
        assert torch.equal(got, want)
        # and the spec's random_bits over a whole tensor, element i
        assert torch.equal(_bits(lp, key, step, torch.arange(500), stream), torch_backend.random_bits(rng, 500, stream, "cpu"))
    # a check that can fail: another stream gives other bits
    other = _bits(lp, key, step, idx, 1 - stream)
    assert (other != got).float().mean() > 0.99


def test_host_stochastic_and_nearest_bf16_rounding_equal_the_specs(lp):
    gen = torch.Generator().manual_seed(22)
    x = _special_floats(gen, 20000)
    r = torch.randint(0, 2 ** 32, x.shape, generator=gen)
    r32 = r.to(torch.int32)  # (kept alive: ctypes reads its memory)
    out = torch.empty(x.numel(), dtype=torch.int16)
    lp.came_sr_bf16(x.data_ptr(), r32.data_ptr(), x.numel(), out.data_ptr())
    want = torch_backend.sr_bf16(x, r)
    nan = x.isnan()
    assert torch.equal(out[~nan], want.view(torch.int16)[~nan])
    assert out.view(torch.bfloat16)[nan].isnan().all()
    lp.came_rne_bf16(x.data_ptr(), x.numel(), out.data_ptr())
    assert torch.equal(out[~nan], x.to(torch.bfloat16).view(torch.int16)[~nan])
    assert out.view(torch.bfloat16)[nan].isnan().all()
    # a check that can fail: stochastic rounding is not rounding to nearest
    lp.came_sr_bf16(x.data_ptr(), r32.data_ptr(), x.numel(), out.data_ptr())
    assert (out[~nan] != x.to(torch.bfloat16).view(torch.int16)[~nan]).float().mean() > 0.2


@pytest.mark.parametrize("n", [256, 4096, 4096 + 77, 1000])
def test_host_int8_quantization_equals_the_specs(lp, n):
    # Block maxima as the kernels gather them (|m| bits, atomic max), codes and dequantized values: bit for
    # bit the spec's quantize_blockwise / dequantize_blockwise on the same m and bits; an all-zero block, a
    # block holding a NaN (its absmax is NaN, its codes 0) and a huge value included.
    gen = torch.Generator().manual_seed(23)
    m = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 20, (n,), generator=gen).float())
    m[:256] = 0.0 if n > 512 else m[:256]
    if n > 1000:
        m[600] = float("nan")
        m[900] = 3e38
    bits = torch.randint(0, 2 ** 32, (n,), generator=gen)
    nb = -(-n // 256)
    q = torch.empty(n, dtype=torch.int8)
    absmax = torch.empty(nb)
    deq = torch.empty(n)
    bits32 = bits.to(torch.int32)  # (kept alive: ctypes reads its memory)
    lp.came_quantize_blockwise(m.data_ptr(), bits32.data_ptr(), n, q.data_ptr(), absmax.data_ptr(),
                               deq.data_ptr())
    want_q, want_absmax = torch_backend.quantize_blockwise(m, bits)
    assert torch.equal(absmax.view(torch.int32), want_absmax.view(torch.int32)) or \
        torch.equal(absmax.nan_to_num(), want_absmax.nan_to_num())
    assert torch.equal(q, want_q)
    want_deq = torch_backend.dequantize_blockwise(want_q, want_absmax)
    ok = ~want_deq.isnan()
    assert torch.equal(deq[ok], want_deq[ok]) and deq[~ok].isnan().all()
    out = torch.empty(n)
    lp.came_dequantize_blockwise(q.data_ptr(), absmax.data_ptr(), n, out.data_ptr())
    assert torch.equal(out[ok], want_deq[ok])
    # a check that can fail: the codes use the random bits (other bits, other codes somewhere)
    q2 = torch.empty_like(q)
    flipped = (bits ^ 0x80000000).to(torch.int32)
    lp.came_quantize_blockwise(m.data_ptr(), flipped.data_ptr(), n, q2.data_ptr(),
                               absmax.data_ptr(), deq.data_ptr())
    assert not torch.equal(q2, q)


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_host_bf16_param_rounding_equals_the_specs(lp, rounding, weight_decay):
    # param_step.cu's store of a bf16 param: x = p (+ comp), x - (lr*update + lr*wd*x), then stochastically
    # (Philox stream 1, counter = element index) or to nearest with the compensation, for 30 steps of tiny
    # updates (below half a bf16 ulp, where nearest rounding would lose them) against the spec's
    # _apply_update_. The spec may fuse a multiply-add on the CPU: nearly all elements equal, bit for bit.
    gen = torch.Generator().manual_seed(24)
    n = 5000
    p0 = (torch.randn(n, generator=gen) * 4).to(torch.bfloat16)
    ours, spec = p0.clone(), p0.clone()
    comp_ours = torch.zeros(n, dtype=torch.bfloat16)
    comp_spec = torch.zeros(n, dtype=torch.bfloat16) if rounding == "kahan" else None
    key = torch_backend.rng_keys(5, [3])[0]
    lr = 1e-3
    for step in range(1, 31):
        update = torch.randn(n, generator=gen)
        lp.came_param_store_bf16(ours.data_ptr(), comp_ours.data_ptr(), update.data_ptr(), n, lr, weight_decay,
                                 1 if rounding == "stochastic" else 2, key, step)
        torch_backend._apply_update_(spec, update.clone(), lr, weight_decay, comp_spec, rounding,
                                     torch.tensor([key, step]))
    assert (ours.view(torch.int16) == spec.view(torch.int16)).float().mean() >= 0.99
    assert ((ours.float() - spec.float()).abs() <= spec.float().abs() * 2 ** -7).all()
    if rounding == "kahan":
        assert ((ours.float() + comp_ours.float()) - (spec.float() + comp_spec.float())).abs().max() < 1e-3
    # a check that can fail: the updates are below half an ulp for most elements, so rounding to nearest
    # would leave those params where they were; these moved
    assert (ours != p0).float().mean() > 0.2
