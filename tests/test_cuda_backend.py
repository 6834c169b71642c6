"""What only backend="cuda" (the extension came_kernels._C) has: its per-phase ops, how its ops take the optional
device tensors (GradScaler's flags, the bias scales), its availability messages.

Its parity, determinism, resume and no-sync tests are shared with the Triton backend in
test_fused_backends.py. GPU tests are skipped, with the reason, when there is no GPU or the extension was
not built; the availability tests at the bottom run everywhere. Without a GPU the CUDA sources are proven by
.ci/check_cuda.sh (nvcc compile of every file) and tests/test_cuda_math_host.py (the per-element math on
the CPU).
"""
import pytest
import torch

from came_kernels.backends import cuda_backend, torch_backend
from came_testing import HYPER, SHAPES_GPU as SHAPES, backend_step, new_state as _state, state_lists
from oracle import assert_close_rel

_REASON = cuda_backend.unavailable_reason(torch.device("cuda"))
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"backend='cuda' unavailable: {_REASON}")



@needs_cuda
def test_cuda_matches_torch_backend_per_phase_op():
    # The per-phase ops run in sequence equal the one-call came_step op bit for bit.
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    gs = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    ps2 = [p.clone() for p in ps]
    st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    backend_step(cuda_backend, ps, gs, st)
    lists = [ps2, gs, [s["m"] for s in st2]] + [[s.get(k) for s in st2] for k in ("r", "c", "R", "C", "v")]
    nstats = sum(2 * (p.numel() // (p.shape[-1] * p.shape[-2])) + 1 if p.ndim >= 2 else 1 for p in ps2)
    stats = torch.full((nstats,), float("nan"), device="cuda")  # poisoned: every slot used must be written
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    args = (lr, 0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0, 0.0, False)
    for op in ("sq_stats", "clip_stats", "momentum_res", "param_step"):
        getattr(torch.ops.came_kernels, op)(*lists, stats, *args)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b), tuple(a.shape)


def _op_inputs(shapes, seed=3):
    """Params, grads, random state (so that a skipped EMA shows), the op lists and a NaN-poisoned stats buffer."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).cuda() for s in shapes]
    gs = [torch.randn(s, generator=gen).cuda() for s in shapes]
    sts = [_state(p, gen) for p in ps]
    lists = [ps, gs] + list(state_lists(sts))
    # 2*B + 1 per non-empty tensor, 1 per packed one (ndim >= 3, M, N <= 8: came_ops.h's stats_numel_of); empty
    # tensors have no slice
    def floats(p):
        if p.numel() == 0:
            return 0
        if p.ndim < 2 or (p.ndim >= 3 and max(p.shape[-2:]) <= 8):
            return 1
        return 2 * (p.numel() // (p.shape[-1] * p.shape[-2])) + 1
    nstats = sum(map(floats, ps))
    return lists, torch.full((nstats,), float("nan"), device="cuda")


def _bits(lists, stats):
    """Everything an op may write, as raw bits (NaN compares equal to itself)."""
    flat = [x for lst in lists for x in lst if x is not None] + [stats]
    return [x.detach().clone().view(torch.int32) for x in flat]


_ARGS = (0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0, 0.1, False)


@needs_cuda
@pytest.mark.parametrize("which", ["every shape class", "packed"])
def test_found_inf_makes_every_op_write_nothing(which):
    # GradScaler found an inf: every kernel of every phase returns before writing (params, state and even the
    # scratch stats, which are NaN here and would be overwritten by any phase that ran), also with bias scales;
    # the packed kernels (conv weights: PACKED_SHAPES) too.
    shapes = SHAPES if which == "every shape class" else PACKED_SHAPES
    lists, stats = _op_inputs(shapes)
    before = _bits(lists, stats)
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    amp = torch.tensor([1.0, 0.5], device="cuda")
    bias = torch.rand(len(shapes), 2, device="cuda") + 0.5
    for op in ("sq_stats", "clip_stats", "momentum_res", "param_step"):
        getattr(torch.ops.came_kernels, op)(*lists, stats, lr, *_ARGS, amp, bias)
    torch.ops.came_kernels.came_step(*lists, lr, *_ARGS, amp, bias)
    for a, b in zip(_bits(lists, stats), before):
        assert torch.equal(a, b)
    amp[0] = 0.0  # the same call without the flag writes: the check above can fail
    torch.ops.came_kernels.came_step(*lists, lr, *_ARGS, amp, bias)
    assert not torch.equal(lists[0][0].view(torch.int32), before[0])


@needs_cuda
def test_per_phase_ops_with_amp_equal_came_step_with_amp():
    # The phase ops chained with amp = [0, 1/scale] equal the one-call op bit for bit (amp reaches every phase).
    lists, stats = _op_inputs(SHAPES, seed=4)
    lists2 = [[None if x is None else x.clone() for x in lst] for lst in lists]
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    amp = torch.tensor([0.0, 1.0 / 3.0], device="cuda")
    torch.ops.came_kernels.came_step(*lists, lr, *_ARGS, amp)
    for op in ("sq_stats", "clip_stats", "momentum_res", "param_step"):
        getattr(torch.ops.came_kernels, op)(*lists2, stats, lr, *_ARGS, amp)
    for a, b in zip(lists[0] + lists[2], lists2[0] + lists2[2]):
        assert torch.equal(a, b), tuple(a.shape)


def _bad_amps():
    cuda = "cuda" if torch.cuda.is_available() else "cpu"  # only built where the tests run
    return {"float64": lambda: torch.zeros(2, dtype=torch.float64, device=cuda),
            "3 elements": lambda: torch.zeros(3, device=cuda),
            "on the CPU": lambda: torch.zeros(2),
            "non-contiguous": lambda: torch.zeros(4, device=cuda)[::2]}


@needs_cuda
@pytest.mark.parametrize("bad", list(_bad_amps()))
def test_amp_tensor_is_checked_before_any_launch(bad):
    lists, stats = _op_inputs([(5, 7), (9,)])
    before = _bits(lists, stats)
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    with pytest.raises(RuntimeError, match="amp must be a contiguous float32 tensor"):
        torch.ops.came_kernels.came_step(*lists, lr, *_ARGS, _bad_amps()[bad]())
    with pytest.raises(RuntimeError, match="amp must be a contiguous float32 tensor"):
        torch.ops.came_kernels.sq_stats(*lists, stats, lr, *_ARGS, _bad_amps()[bad]())
    for a, b in zip(_bits(lists, stats), before):
        assert torch.equal(a, b)


# Every argument check of the ops, each in a fresh process: a check must raise a RuntimeError naming the
# argument, never take the process down (a crash in one case would otherwise hide which check it was).
_OP_ERROR_SETUP = """
import torch
from came_kernels.backends import cuda_backend
cuda_backend._load()
ops = torch.ops.came_kernels
ps = [torch.randn(5, 7, device="cuda"), torch.randn(9, device="cuda")]
gs = [torch.randn_like(p) for p in ps]
ms = [torch.zeros_like(p) for p in ps]
r, c = [torch.zeros(5, device="cuda"), None], [torch.zeros(7, device="cuda"), None]
R, C = [torch.zeros(5, device="cuda"), None], [torch.zeros(7, device="cuda"), None]
v = [None, torch.zeros(9, device="cuda")]
lr = torch.full((1,), 1e-3, device="cuda")
H = (0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0, 0.0, False)
stats = torch.zeros(4, device="cuda")
"""
_OP_ERRORS = {
    "amp float64": ("ops.came_step(ps, gs, ms, r, c, R, C, v, lr, *H, torch.zeros(2, dtype=torch.float64, "
                    "device='cuda'))", "amp must be"),
    "amp on the CPU": ("ops.came_step(ps, gs, ms, r, c, R, C, v, lr, *H, torch.zeros(2))", "amp must be"),
    "lr float64": ("ops.came_step(ps, gs, ms, r, c, R, C, v, lr.double(), *H)", "lr must be"),
    "bias_scales short": ("ops.came_step(ps, gs, ms, r, c, R, C, v, lr, *H, None, torch.ones(1, 2, "
                          "device='cuda'))", "bias_scales must be"),
    "param on the CPU": ("ops.came_step([ps[0], ps[1].cpu()], gs, ms, r, c, R, C, v, lr, *H)",
                         "params[1] is Float on cpu"),
    "grad shape": ("ops.came_step(ps, [gs[0].t().contiguous(), gs[1]], ms, r, c, R, C, v, lr, *H)", "grads"),
    "plan handle": ("ops.came_plan_step(987654, gs, lr, *H)", "plan"),
    "plan amp float64": ("ops.came_plan_step(ops.came_plan_create(ps, gs, ms, r, c, R, C, v), gs, lr, *H, "
                         "torch.zeros(2, dtype=torch.float64, device='cuda'))", "amp must be"),
    "clip_stats first": ("ops.clip_stats(ps, gs, ms, r, c, R, C, v, stats, lr, *H)", "sq_stats"),
}


def _op_error_outcome(case: str):
    """None when `case` raised its RuntimeError in a fresh process, else what happened instead."""
    import subprocess
    import sys
    call, match = _OP_ERRORS[case]
    code = _OP_ERROR_SETUP + f"""
try:
    {call}
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
else:
    torch.cuda.synchronize()
    print("RETURNED")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return f"the process died (rc {out.returncode}): {out.stderr[-1500:]}"
    if "RAISED" not in out.stdout or match not in out.stdout:
        return f"expected a RuntimeError with {match!r}, got: {out.stdout[-500:]} {out.stderr[-1000:]}"
    return None


@needs_cuda
def test_op_argument_errors_raise_and_never_crash():
    # The cases in parallel processes (each starts CUDA: about as long as all the checks).
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(_OP_ERRORS)) as pool:
        outcomes = dict(zip(_OP_ERRORS, pool.map(_op_error_outcome, _OP_ERRORS)))
    bad = {case: what for case, what in outcomes.items() if what is not None}
    assert not bad, bad


@needs_cuda
@pytest.mark.parametrize("bad", ["one row short", "float64", "[T, 3]", "non-contiguous", "on the CPU"])
def test_bias_scales_are_checked_before_any_launch(bad):
    lists, stats = _op_inputs([(5, 7), (0, 3), (9,)])  # the empty tensor still has its row
    before = _bits(lists, stats)
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    x = {"one row short": lambda: torch.ones(2, 2, device="cuda"),
         "float64": lambda: torch.ones(3, 2, dtype=torch.float64, device="cuda"),
         "[T, 3]": lambda: torch.ones(3, 3, device="cuda"),
         "non-contiguous": lambda: torch.ones(3, 4, device="cuda")[:, ::2],
         "on the CPU": lambda: torch.ones(3, 2)}[bad]()
    with pytest.raises(RuntimeError, match=r"bias_scales must be a contiguous float32 tensor of shape \[3, 2\]"):
        torch.ops.came_kernels.came_step(*lists, lr, *_ARGS, None, x)
    with pytest.raises(ValueError, match=r"bias_scales must be a contiguous float32 tensor of shape \(3, 2\)"):
        cuda_backend.came_step(*lists, cache={}, bias_scales=x, **HYPER)
    for a, b in zip(_bits(lists, stats), before):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("shape", [(2,), (1, 3)])
def test_grad_scale_must_have_one_element(shape):
    lists, _ = _op_inputs([(5, 7)])
    with pytest.raises(ValueError, match="grad_scale must be a 1-element tensor"):
        cuda_backend.came_step(*lists, cache={}, grad_scale=torch.ones(shape, device="cuda"), **HYPER)


@needs_cuda
@pytest.mark.parametrize("dtype,grad_scale", [(torch.float32, None), (torch.float32, 3.0), (torch.bfloat16, 2.0 ** 12)])
def test_bias_scales_rows_follow_the_lists_past_empty_tensors(dtype, grad_scale):
    # Row i of bias_scales belongs to params[i]: the op drops empty tensors and orders the rest largest first
    # on the device, and every tensor must still read its own (s_u, s_m). Distinct scales per row, against the
    # torch backend; with a GradScaler too (both on one step).
    shapes = [(0, 3)] + list(SHAPES[:8]) + [(0,)] + list(SHAPES[8:])
    _bias_scales_and_amp_vs_torch(shapes, dtype, grad_scale, seed=6, steps=8, spike_at=5, spike=1e4)


def _bias_scales_and_amp_vs_torch(shapes, dtype, grad_scale, seed, steps, spike_at, spike):
    """`steps` steps of both backends with distinct random bias scales per tensor every step (and a GradScaler
    when grad_scale is set), one of them with grads `spike` times larger (where s_u decides how much is
    clipped); params and states then agree."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    amp = {} if grad_scale is None else dict(grad_scale=torch.tensor(grad_scale, device="cuda"),
                                             found_inf=torch.tensor(0.0, device="cuda"))
    for t in range(steps):
        big = spike if t == spike_at else 1.0
        gs = [(torch.randn(s, generator=gen) * big * (grad_scale or 1.0)).to("cuda", dtype) for s in shapes]
        assert all(torch.isfinite(g).all() for g in gs), "the scaled spike overflows the param dtype"
        scales = torch.stack([torch.rand(len(shapes), generator=gen) * 0.95 + 0.05,
                              torch.rand(len(shapes), generator=gen) * 1.95 + 0.05], dim=1).cuda()
        for mod, ps, sts in ((cuda_backend, ours, ours_st), (torch_backend, spec, spec_st)):
            mod.came_step(ps, gs, *state_lists(sts), cache={}, bias_scales=scales, **amp,
                          **HYPER | dict(weight_decay=0.1))
    tol = 1e-5 if dtype == torch.float32 else 4 * 2.0 ** -7
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        if a.numel() == 0:  # nothing to compare (and no row read)
            continue
        assert_close_rel(a, b, tol, f"{dtype} param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 2e-4, f"{dtype} state {k} of {tuple(a.shape)}")


@needs_cuda
def test_bias_scales_of_one_are_the_uncorrected_step_bit_for_bit():
    # s_u = s_m = 1: the scaled divisor and the scaled update are exactly today's (x * 1 and x / 1 are exact).
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    sa, sb = [_state(x) for x in init], [_state(x) for x in init]
    for _ in range(3):
        gs = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
        cuda_backend.came_step(a, gs, *state_lists(sa), cache={}, bias_scales=torch.ones(len(SHAPES), 2).cuda(),
                               **HYPER)
        cuda_backend.came_step(b, gs, *state_lists(sb), cache={}, **HYPER)
    for x, y in zip(a, b):
        assert torch.equal(x, y), tuple(x.shape)


# ---- the clip's statistics in phase 1 (N <= 8192), phase 2 (N > 8192), and taller stripes under the workspace cap
# Small N, 1xN, Nx1, ragged, 3-D, 4-D, N just past the register path (8193), N > 8192 in 3-D and with many
# stripes, flat tensors, and widths at each register-path step (1024, 2048, 4096, 8192 fp32 columns).
CLIP_SHAPES = [(1, 1), (1, 33), (33, 1), (5, 3), (37, 53), (129, 257), (3, 5, 7), (4, 3, 3, 3), (2, 1, 5, 1),
               (200, 64), (3, 70, 1024), (4100, 8), (2, 2053, 6), (65, 2048), (7, 4096), (130, 8192), (3, 8193),
               (2, 67, 11008), (1, 20000), (7,), (40000,), ()]


def _run_vs_torch(shapes, dtype, steps, monkeypatch=None, env=None, seed=40, **hyper):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, str(v))
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    for t in range(steps):
        scale = [1.0, 1e4, 1e-20, 0.0][t % 4]  # plain, clipping spike, tiny (g^2 underflows), zero grads
        gs = [(torch.randn(s, generator=gen) * scale).to("cuda", dtype) for s in shapes]
        cuda_backend.came_step(ours, gs, *state_lists(ours_st), cache={}, **HYPER | hyper)
        torch_backend.came_step(spec, gs, *state_lists(spec_st), cache={}, **HYPER | hyper)
    tol = 2e-5 if dtype == torch.float32 else 4 * 2.0 ** -7
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert_close_rel(a, b, tol, f"{dtype} param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 2e-4, f"{dtype} state {k} of {tuple(a.shape)}")
    return ours


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_from_phase_one_and_phase_two_matches_torch_backend(dtype):
    _run_vs_torch(CLIP_SHAPES, dtype, 8, weight_decay=0.1)


@needs_cuda
@pytest.mark.parametrize("env", [dict(CAME_KERNELS_CUDA_CLIP_COLS=0), dict(CAME_KERNELS_CUDA_CLIP_COLS=40),
                                 dict(CAME_KERNELS_CUDA_WS_CAP_FLOATS=20000),
                                 dict(CAME_KERNELS_CUDA_WS_CAP_FLOATS=1, CAME_KERNELS_CUDA_CLIP_COLS=40)],
                         ids=["all-phase2", "phase2-past-40-cols", "tall-stripes", "tallest-stripes-and-phase2"])
def test_clip_paths_and_tall_stripes_under_test_hooks_match_torch_backend(monkeypatch, env):
    # The layout's test hooks (ops.cpp): every factored tensor through phase 2 on small shapes (phase 1 then
    # takes its row-tile path), and stripes of several row tiles (phase 1's register path over tall stripes,
    # phase 3's partials added over row tiles, phase 4's row-tile loop) under a small workspace cap.
    _run_vs_torch(CLIP_SHAPES, torch.float32, 8, monkeypatch, env, maximize=True)


@needs_cuda
def test_tall_stripes_give_the_same_step_to_rounding(monkeypatch):
    # The cap changes the launch only: default and tallest stripes (one stripe per matrix) agree to rounding
    # (the column sums are added in another order).
    a = _run_vs_torch(CLIP_SHAPES, torch.float32, 3)
    b = _run_vs_torch(CLIP_SHAPES, torch.float32, 3, monkeypatch, dict(CAME_KERNELS_CUDA_WS_CAP_FLOATS=1))
    for x, y in zip(a, b):
        assert_close_rel(x, y, 2e-5, tuple(x.shape))


@needs_cuda
def test_clip_stats_op_needs_the_sq_stats_op_first():
    # The per-phase ops hand phase 1's clip inputs to clip_stats in sq_stats' workspace: clip_stats alone, or
    # with another stats buffer, fails before any launch.
    lists, stats = _op_inputs([(5, 7), (9,)])
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    with pytest.raises(RuntimeError, match="call sq_stats with the same tensors and stats buffer first"):
        torch.ops.came_kernels.clip_stats(*lists, stats, lr, *_ARGS)
    torch.ops.came_kernels.sq_stats(*lists, stats, lr, *_ARGS)
    with pytest.raises(RuntimeError, match="call sq_stats with the same tensors and stats buffer first"):
        torch.ops.came_kernels.clip_stats(*lists, stats.clone(), lr, *_ARGS)
    torch.ops.came_kernels.sq_stats(*lists, stats, lr, *_ARGS)
    torch.ops.came_kernels.clip_stats(*lists, stats, lr, *_ARGS)
    # Slices (ops.cpp): (5, 7) mean_M(r), mean_M(R), clip; (9,) clip. mean_M(R) is momentum_res' to write.
    assert torch.isfinite(stats[[0, 2, 3]]).all() and torch.isnan(stats[1]), stats
    with pytest.raises(RuntimeError, match="call sq_stats with the same tensors and stats buffer first"):
        torch.ops.came_kernels.clip_stats(*lists, stats, lr, *_ARGS)  # taken once


# ---- availability: runs everywhere
def test_unavailable_reason_on_cpu_says_cuda_tensors_only_not_how_to_build():
    # Building the extension would not help CPU tensors: the reason says what would.
    why = cuda_backend.unavailable_reason(torch.device("cpu"))
    assert isinstance(why, str) and "CUDA tensors only" in why
    assert "pip install" not in why


def test_unavailable_reason_names_the_build_command_when_not_built():
    if cuda_backend._load() is not None:
        pytest.skip("came_kernels._C is built here")
    why = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "pip install -e . --no-build-isolation" in why and "CAME_KERNELS_BUILD_CUDA=1" in why
    assert type(cuda_backend._import_error).__name__ in why


@needs_cuda
def test_extension_ops_have_fake_kernels_for_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p, g, m = (torch.empty(4, 3, device="cuda") for _ in range(3))
        r, c = torch.empty(4, device="cuda"), torch.empty(3, device="cuda")
        lr = torch.empty(1, device="cuda")
        torch.ops.came_kernels.came_step([p], [g], [m], [r], [c], [r.clone()], [c.clone()], [None], lr,
                                         0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0, 0.0, False)


# ---- plans: the checked group and its uploaded table kept between steps (ops.cpp's Plan)
def _tuples(ps, sts):
    """The contract's lists as tuples (what the optimizer passes): the backend keeps a plan for them."""
    return (tuple(ps),) + tuple(tuple(x) for x in state_lists(sts))


@pytest.fixture
def _poison(monkeypatch):
    monkeypatch.setenv("CAME_KERNELS_CUDA_POISON", "1")  # NaN in workspace and stats before every step


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_planned_steps_equal_checked_steps_bit_for_bit(_poison, dtype):
    # The plan path (tuples) against came_step (lists: checked and uploaded at every call) over many steps:
    # grads that stay put (written in place), grads that move (new tensors), bias scales and GradScaler's
    # flags that are new tensors every step, a skipped step (found_inf), lr changes.
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen).to("cuda", dtype) for s in SHAPES]
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    sa, sb = [_state(x) for x in init], [_state(x) for x in init]
    ta = _tuples(a, sa)
    cache = {}
    fixed = [torch.empty_like(x) for x in init]
    for t in range(12):
        gs = [(torch.randn(s, generator=gen) * [1.0, 1e4, 0.0][t % 3]).to("cuda", dtype) for s in SHAPES]
        if t % 2:  # the same grad tensors as two steps ago, new values
            for f, g in zip(fixed, gs):
                f.copy_(g)
            gs = fixed
        kw = dict(HYPER, lr=1e-2 / (1 + t), weight_decay=0.1,
                  bias_scales=torch.rand(len(SHAPES), 2, generator=gen).add(0.5).cuda(),
                  grad_scale=torch.full((1,), 4.0, device="cuda"),
                  found_inf=torch.full((1,), float(t == 5), device="cuda"))
        gs_scaled = [g * 4 for g in gs] if t % 2 == 0 else gs
        if t % 2:
            for f in fixed:
                f.mul_(4)
        cuda_backend.came_step(ta[0], gs_scaled, *ta[1:], cache=cache, **kw)
        cuda_backend.came_step(b, gs_scaled, *state_lists(sb), cache={}, **kw)
        if t == 0:
            assert "plan" in cache
    for x, y in zip(a, b):
        assert torch.equal(x, y) and not x.isnan().any(), tuple(x.shape)
    for x, y in zip(sa, sb):
        for k in x:
            assert torch.equal(x[k], y[k]), k


@needs_cuda
def test_plan_follows_params_and_states_that_move(_poison):
    # `p.data = ...` (same tensor object, new memory), a state resized in place, and a new state tensor
    # (new tuples): each step still equals the checked one.
    gen = torch.Generator().manual_seed(8)
    shapes = [(37, 53), (7,), (4, 3, 3, 3)]
    init = [torch.randn(s, generator=gen).cuda() for s in shapes]
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    sa, sb = [_state(x) for x in init], [_state(x) for x in init]
    cache = {}
    for t in range(6):
        if t == 2:
            a[0].data = a[0].data.clone()
            b[0].data = b[0].data.clone()
        if t == 3:
            sa[0]["r"].data = sa[0]["r"].data.clone()
        if t == 4:
            sa[1]["v"] = sa[1]["v"].clone()
        gs = [torch.randn(s, generator=gen).cuda() for s in shapes]
        ta = _tuples(a, sa)
        cuda_backend.came_step(ta[0], gs, *ta[1:], cache=cache, **HYPER)
        cuda_backend.came_step(b, gs, *state_lists(sb), cache={}, **HYPER)
        for x, y in zip(a, b):
            assert torch.equal(x, y), (t, tuple(x.shape))


@needs_cuda
def test_plan_takes_non_contiguous_grads_through_copies():
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(37, 53, generator=gen).cuda(), torch.randn(64, 32, generator=gen).cuda()]
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    sa, sb = [_state(x) for x in init], [_state(x) for x in init]
    ta, cache = _tuples(a, sa), {}
    for _ in range(3):
        gs = [torch.randn(53, 37, generator=gen).cuda().t(), torch.randn(64, 32, generator=gen).cuda()]
        cuda_backend.came_step(ta[0], gs, *ta[1:], cache=cache, **HYPER)
        cuda_backend.came_step(b, [g.contiguous() for g in gs], *state_lists(sb), cache={}, **HYPER)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_cuda
def test_a_bad_grad_in_steady_state_is_named_and_changes_nothing():
    gen = torch.Generator().manual_seed(10)
    ps = [torch.randn(37, 53, generator=gen).cuda(), torch.randn(7, generator=gen).cuda()]
    sts = [_state(x) for x in ps]
    ts, cache = _tuples(ps, sts), {}
    cuda_backend.came_step(ts[0], [torch.randn_like(p) for p in ps], *ts[1:], cache=cache, **HYPER)
    before = [p.clone() for p in ps] + [x.clone() for s in sts for x in s.values()]
    for bad in ([torch.randn(53, 37, device="cuda"), torch.randn(7, device="cuda")],
                [torch.randn(37, 53, device="cuda"), torch.randn(7, device="cuda", dtype=torch.float64)]):
        with pytest.raises(RuntimeError, match=r"grads\[[01]\]"):
            cuda_backend.came_step(ts[0], bad, *ts[1:], cache=cache, **HYPER)
    after = [p.clone() for p in ps] + [x.clone() for s in sts for x in s.values()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@needs_cuda
def test_plan_keeps_no_grad_alive_and_a_freed_plan_is_refused():
    import weakref
    ps = [torch.randn(64, 32, device="cuda")]
    sts = [_state(ps[0])]
    ts, cache = _tuples(ps, sts), {}
    g = torch.randn(64, 32, device="cuda")
    cuda_backend.came_step(ts[0], [g], *ts[1:], cache=cache, **HYPER)
    ref = weakref.ref(g)
    del g
    assert ref() is None  # the plan holds params and states only
    handle = cache["plan"].handle
    lr = torch.full((1,), 1e-2, device="cuda")
    assert torch.ops.came_kernels.came_plan_step(handle, [torch.randn(64, 32, device="cuda")], lr, 0.9, 0.999,
                                                 0.9999, 1e-30, 1e-16, 1.0, 0.0, False) == 0
    cache.clear()  # the handle is freed with the plan object
    with pytest.raises(RuntimeError, match="no plan"):
        torch.ops.came_kernels.came_plan_step(handle, [torch.randn(64, 32, device="cuda")], lr, 0.9, 0.999,
                                              0.9999, 1e-30, 1e-16, 1.0, 0.0, False)


@needs_cuda
def test_planned_steps_make_no_host_sync():
    ps = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    sts = [_state(p) for p in ps]
    ts, cache = _tuples(ps, sts), {}
    cuda_backend.came_step(ts[0], [torch.randn_like(p) for p in ps], *ts[1:], cache=cache, **HYPER)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(3):  # grads that move, and an lr that changes
            cuda_backend.came_step(ts[0], [torch.randn_like(p) for p in ps], *ts[1:], cache=cache,
                                   **dict(HYPER, lr=1e-3 * (t + 1)))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- the glue's choice of op, on any machine (the extension's ops replaced by a recorder)
class _FakeOps:
    """Records the calls the cuda backend makes; came_plan_step answers from `answers` (default: ran)."""

    def __init__(self):
        self.calls, self.answers, self.plans, self.freed = [], [], 0, []

    def came_plan_create(self, *lists):
        self.plans += 1
        self.calls.append("create")
        return self.plans

    def came_plan_create_lowbit(self, *lists):
        self.plans += 1
        self.calls.append("create_lowbit")
        return self.plans

    def came_plan_step(self, handle, grads, *hyper):
        self.calls.append(("plan_step", handle) if len(hyper) == 11 else ("plan_step_lowbit", handle))
        return self.answers.pop(0) if self.answers else 0

    def came_plan_free(self, handle):
        self.freed.append(handle)

    def came_step(self, *args):
        self.calls.append("step")

    def came_step_lowbit(self, *args):
        self.calls.append("lowbit")


@pytest.fixture
def fake_ops(monkeypatch):
    ops = _FakeOps()
    monkeypatch.setattr(cuda_backend, "_ops", lambda: ops)
    monkeypatch.setattr(cuda_backend, "_load", lambda: True)
    return ops


def _glue_step(ps, sts, cache, grads=None, as_tuples=True, **kw):
    lists = _tuples(ps, sts) if as_tuples else (ps,) + tuple(state_lists(sts))
    grads = [torch.randn_like(p) for p in ps] if grads is None else grads
    cuda_backend.came_step(lists[0], grads, *lists[1:], cache=cache, **(HYPER | kw))
    return lists


def test_glue_makes_one_plan_per_set_of_tensors_and_reuses_it(fake_ops):
    ps = [torch.randn(5, 3), torch.randn(4)]
    sts = [_state(p) for p in ps]
    cache = {}
    lists = _glue_step(ps, sts, cache)
    for _ in range(3):
        cuda_backend.came_step(lists[0], [torch.randn_like(p) for p in ps], *lists[1:], cache=cache, **HYPER)
    assert fake_ops.calls == ["create"] + [("plan_step", 1)] * 4
    _glue_step(ps, sts, cache)  # new tuples, the same tensors: the same plan
    assert fake_ops.calls[-1] == ("plan_step", 1)
    sts[0]["m"] = torch.zeros_like(sts[0]["m"])  # a new state tensor (a loaded checkpoint, say)
    _glue_step(ps, sts, cache)  # a new plan, the old one freed
    import gc
    gc.collect()
    assert fake_ops.calls[-2:] == ["create", ("plan_step", 2)] and fake_ops.freed == [1]


def test_glue_remakes_a_stale_plan_and_sends_odd_grads_to_the_checked_op(fake_ops):
    ps = [torch.randn(5, 3)]
    sts = [_state(p) for p in ps]
    cache = {}
    lists = _glue_step(ps, sts, cache)
    fake_ops.answers = [1]  # a param moved: make a new plan, step with it
    cuda_backend.came_step(lists[0], [torch.randn(5, 3)], *lists[1:], cache=cache, **HYPER)
    assert fake_ops.calls[2:] == [("plan_step", 1), "create", ("plan_step", 2)]
    fake_ops.answers = [2, 2]  # grads the plan does not take: the checked op names the problem
    cuda_backend.came_step(lists[0], [torch.randn(5, 3)], *lists[1:], cache=cache, **HYPER)
    assert fake_ops.calls[5:] == [("plan_step", 2), ("plan_step", 2), "step"]


def test_glue_finds_the_plan_of_lists_by_their_tensors(fake_ops):
    # New list objects every call (torch.compile's custom op): the same tensors find the plan, one changed
    # entry (a list changed in place, a new state tensor) makes a new one.
    ps = [torch.randn(5, 3), torch.randn(4)]
    sts = [_state(p) for p in ps]
    cache = {}
    _glue_step(ps, sts, cache, as_tuples=False)
    _glue_step(list(ps), sts, cache, as_tuples=False)
    assert fake_ops.calls == ["create", ("plan_step", 1), ("plan_step", 1)]
    sts[1]["v"] = sts[1]["v"].clone()
    _glue_step(ps, sts, cache, as_tuples=False)
    assert fake_ops.calls[3:] == ["create", ("plan_step", 2)]


def test_glue_takes_the_checked_op_for_copies(fake_ops):
    t = torch.randn(3, 5).t()  # a non-contiguous param: runs on a copy, written back
    _glue_step([t], [_state(t.contiguous())], {})
    t = torch.randn(3, 5).bfloat16().t()
    _glue_step([t], [_state(t.contiguous())], {}, rng=torch.zeros(1, 2, dtype=torch.int64),
               param_rounding="stochastic")
    assert fake_ops.calls == ["step", "lowbit"]


def test_glue_keeps_a_plan_for_the_low_precision_state(fake_ops):
    # bf16 momentum: a plan of its own, stepped with the rng; its absmax and compensation lists are compared
    # entry by entry (new lists every step), and another param_rounding is another plan.
    ps = [torch.randn(5, 3).bfloat16()]
    sts = [_state(p) for p in ps]
    sts[0]["m"] = sts[0]["m"].bfloat16()
    cache, rng = {}, torch.zeros(1, 2, dtype=torch.int64)
    for _ in range(2):
        _glue_step(ps, sts, cache, rng=rng, exp_avg_absmaxes=[None])
    assert fake_ops.calls == ["create_lowbit", ("plan_step_lowbit", 1), ("plan_step_lowbit", 1)]
    comps = [torch.zeros(5, 3, dtype=torch.bfloat16)]
    for _ in range(2):
        _glue_step(ps, sts, cache, rng=rng, param_rounding="kahan", param_comps=list(comps))
    assert fake_ops.calls[3:] == ["create_lowbit", ("plan_step_lowbit", 2), ("plan_step_lowbit", 2)]
    with pytest.raises(ValueError, match="rng"):  # checked before the plan runs
        _glue_step(ps, sts, cache, rng=None, param_rounding="kahan", param_comps=list(comps))


def test_glue_float_lr_lives_in_one_cached_buffer(fake_ops):
    ps = [torch.randn(5, 3)]
    sts = [_state(p) for p in ps]
    cache = {}
    lists = _glue_step(ps, sts, cache, lr=1e-3)
    buf = cache["lr"][0]
    for lr in (1e-3, 2e-3):
        cuda_backend.came_step(lists[0], [torch.randn(5, 3)], *lists[1:], cache=cache, **(HYPER | dict(lr=lr)))
        assert cache["lr"][0] is buf and buf.item() == pytest.approx(lr)


# ---- packed small matrices (csrc/plan.h: ndim >= 3, M, N <= 8; 4096 / PM^2 whole matrices per block, PM = 1, 4, 8)
# Conv weights (3x3, 1x1, 5x5, 8x8 in 5-D), several blocks per tensor (B above the matrices per block: 4096 for
# 1x1, 256 for 4x4 tiles, 64 for 8x8), full blocks of 4096 elements (4x4, 8x8), 2x2 in the 4x4 tile, Nx1 and 1xN
# matrices, a single 1x1 matrix, next to a 3-D tensor too tall to pack (M = 9), matrices and 1-D tensors in the
# same group.
PACKED_SHAPES = [(8, 3, 3, 3), (5, 7, 1, 1), (3, 2, 5, 5), (2, 3, 4, 8, 8), (4100, 1, 1), (300, 3, 3), (65, 7, 5),
                 (257, 4, 4), (65, 8, 8), (3, 2, 2), (20, 1, 6), (5, 6, 1), (1, 1, 1), (5, 9, 3), (37, 53),
                 (129, 257), (1, 33), (7,), (40000,), ()]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_small_matrices_match_torch_backend(dtype):
    # 8 steps of plain, spiking (the clip acts), tiny (g^2 underflows) and zero grads, weight decay.
    _run_vs_torch(PACKED_SHAPES, dtype, 8, weight_decay=0.1)


@needs_cuda
def test_packed_small_matrices_with_maximize_and_tall_stripes_match_torch_backend(monkeypatch):
    # maximize (g negated in phase 3), and the other tensors on tall stripes and phase 2 (the test hooks change
    # nothing for packed tensors: phase 1 always sums their u^2).
    _run_vs_torch(PACKED_SHAPES, torch.float32, 8, monkeypatch,
                  dict(CAME_KERNELS_CUDA_WS_CAP_FLOATS=1, CAME_KERNELS_CUDA_CLIP_COLS=0), maximize=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_and_striped_small_matrices_give_the_same_step_to_rounding(monkeypatch, dtype):
    # CAME_KERNELS_CUDA_PACK=0 cuts the same tensors into stripes (one block per matrix, finalize, W): the same
    # math, sums in another order.
    a = _run_vs_torch(PACKED_SHAPES, dtype, 4)
    b = _run_vs_torch(PACKED_SHAPES, dtype, 4, monkeypatch, dict(CAME_KERNELS_CUDA_PACK=0))
    for x, y in zip(a, b):
        assert_close_rel(x, y, 2e-5 if dtype == torch.float32 else 4 * 2.0 ** -7, tuple(x.shape))


@needs_cuda
@pytest.mark.parametrize("dtype,grad_scale", [(torch.float32, None), (torch.float32, 3.0), (torch.bfloat16, 2.0 ** 12),
                                              (torch.float16, 2.0 ** 10)])
def test_packed_small_matrices_with_amp_and_bias_correction_match_torch_backend(dtype, grad_scale):
    # GradScaler (1/scale as g is read, in every packed kernel) and bias correction (s_u in the clip finalize from
    # the packed blocks' sums, s_m in the packed phase 4), distinct scales per tensor, an empty tensor first.
    # (fp16: a spike of 8 times 2^10 stays finite, 1e3 overflowed to inf and every param went NaN, as in the
    # torch backend; GradScaler would have skipped that step)
    shapes = [(0, 3, 3)] + PACKED_SHAPES
    _bias_scales_and_amp_vs_torch(shapes, dtype, grad_scale, seed=8, steps=6, spike_at=3,
                                  spike=8.0 if dtype == torch.float16 else 1e3)


@needs_cuda
def test_packed_blocks_per_phase_ops_write_every_stat_and_equal_came_step():
    # The per-phase ops with a NaN-poisoned stats buffer of one float per packed tensor (their means are summed
    # in-block from r and R, never stored): the clip finalize writes every divisor from the block sums; bit for
    # bit the one-call op; two runs identical.
    lists, stats = _op_inputs(PACKED_SHAPES, seed=9)
    lists2 = [[None if x is None else x.clone() for x in lst] for lst in lists]
    lists3 = [[None if x is None else x.clone() for x in lst] for lst in lists]
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    for op in ("sq_stats", "clip_stats", "momentum_res", "param_step"):
        getattr(torch.ops.came_kernels, op)(*lists, stats, lr, *_ARGS)
    assert torch.isfinite(stats).all()
    torch.ops.came_kernels.came_step(*lists2, lr, *_ARGS)
    torch.ops.came_kernels.came_step(*lists3, lr, *_ARGS)
    for a, b, c in zip(_bits(lists, stats)[:-1], _bits(lists2, stats)[:-1], _bits(lists3, stats)[:-1]):
        assert torch.equal(a, b) and torch.equal(b, c)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_tensors_without_16_byte_alignment_match_torch_backend(dtype):
    # Params and grads that start 4 (fp32) or 2 (bf16) bytes past a 16-byte boundary: vec_ok is off, the packed
    # kernels take their scalar loads; only packed tensors, so no other kernel runs in phases 1, 3, 4.
    shapes = [(8, 3, 3, 3), (300, 3, 3), (65, 7, 5), (4100, 1, 1)]

    def shifted(x):
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
        y = buf[1:].view(x.shape)
        y.copy_(x)
        assert y.data_ptr() % 16 != 0
        return y

    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    ours, spec = [shifted(x) for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    for t in range(4):
        gs = [(torch.randn(s, generator=gen) * (1e3 if t == 1 else 1.0)).to("cuda", dtype) for s in shapes]
        cuda_backend.came_step(ours, [shifted(g) for g in gs], *state_lists(ours_st), cache={}, **HYPER)
        torch_backend.came_step(spec, gs, *state_lists(spec_st), cache={}, **HYPER)
    tol = 2e-5 if dtype == torch.float32 else 4 * 2.0 ** -7
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert_close_rel(a, b, tol, f"{dtype} param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 2e-4, f"{dtype} state {k} of {tuple(a.shape)}")
