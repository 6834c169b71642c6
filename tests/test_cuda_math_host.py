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

SHAPES = [(), (7,), (1, 33), (33, 1), (1, 1), (37, 53), (129, 70), (3, 5, 7), (4, 3, 3, 3), (2, 1, 5, 1)]


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
    so.came_clip_divisor.argtypes = [f, i64, f]
    so.came_clip_divisor_scaled.restype = f
    so.came_clip_divisor_scaled.argtypes = [f, i64, f, f]
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
    for name in ("CAME_SCHEMA_LISTS", "CAME_SCHEMA_HYPER"):
        body = re.search(rf"#define {name}\s*\\\n((?:.*\\\n)*.*\n)", src).group(1)
        macros[name] = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))
    defs = re.findall(r'm\.def\(((?:"[^"]*"|\s|CAME_SCHEMA_\w+)+)\);', src)
    assert len(defs) == 5, defs
    out = []
    for d in defs:
        parts = re.findall(r'"([^"]*)"|(CAME_SCHEMA_\w+)', d)
        out.append("".join(lit or macros[mac] for lit, mac in parts))
    return out


def test_op_schemas_in_ops_cpp_parse():
    names = []
    for s in _schemas():
        schema = torch._C.parse_schema("came_kernels::" + s)
        names.append(schema.name)
        args = [a.name for a in schema.arguments]
        assert args[:8] == ["params", "grads", "exp_avgs", "exp_avg_sq_rows", "exp_avg_sq_cols",
                            "exp_avg_res_rows", "exp_avg_res_cols", "exp_avg_sqs"], args
        assert args[-11:] == ["lr", "beta1", "beta2", "beta3", "eps1", "eps2", "clip_threshold", "weight_decay",
                              "maximize", "amp", "bias_scales"], args
        for opt in schema.arguments[-2:]:  # optional, default None: the ops run as before without them
            assert str(opt.type) == "Optional[Tensor]" and opt.has_default_value() and opt.default_value is None
        mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert {"params", "exp_avgs", "exp_avg_sq_rows", "exp_avg_sqs"} <= mutated and "grads" not in mutated
        assert not mutated & {"amp", "bias_scales"}
    assert sorted(names) == sorted(["came_kernels::" + n for n in
                                    ("came_step", "sq_stats", "clip_stats", "momentum_res", "param_step")])
