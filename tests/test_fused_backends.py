"""The fused backends (backend="triton" and backend="cuda") against the torch backend, came-pytorch and a
float64 oracle: one suite, parametrized over the backend.

Where they run: "cuda" needs the built extension and a GPU. "triton" runs compiled on a GPU, and without one
on CPU tensors through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): that is how CI
proves the Triton kernels. The interpreter runs ~10 ms per program, so on the CPU the shapes are smaller
(still every shape class, ragged sizes, several stripes and flat chunks) and the step counts shorter.
Every test is skipped, with the reason, where its backend cannot run.
"""
import copy

import pytest
import torch

import came_kernels
from came_kernels.backends import cuda_backend, torch_backend, triton_backend
from came_testing import HYPER, SHAPES_CPU, SHAPES_GPU, backend_step, new_state
from oracle import OracleCAME, assert_close_rel, rel_err

_MODULES = {"triton": triton_backend, "cuda": cuda_backend}
_GPU = torch.cuda.is_available()
DEVICE = {"triton": "cuda" if _GPU else "cpu", "cuda": "cuda"}
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    _MODULES[name].unavailable_reason(torch.device(DEVICE[name])) is not None,
    reason=f"backend={name!r} unavailable: {_MODULES[name].unavailable_reason(torch.device(DEVICE[name]))}"))
    for name in ("triton", "cuda")]

# |fused - torch backend| / max|torch backend| after many steps: fp32 differs by summation order only;
# bf16/fp16 params by a rounding flip now and then (a few ulps of the param dtype).
PARAM_TOL = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0 ** -7, torch.float16: 4 * 2.0 ** -10}
STATE_TOL = 2e-4


def _shapes(backend):
    return SHAPES_GPU if DEVICE[backend] == "cuda" else SHAPES_CPU


def _steps(backend, gpu_steps, cpu_steps):
    return gpu_steps if DEVICE[backend] == "cuda" else cpu_steps


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    # NaN in the workspace and stats before every fused step: an element no kernel wrote shows as NaN.
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    monkeypatch.setenv("CAME_KERNELS_CUDA_POISON", "1")  # read by the extension at each step (ops.cpp)


def _state(p):
    return new_state(p)


def _step(backend, ps, gs, sts, cache=None, **kw):
    backend_step(_MODULES.get(backend, backend), ps, gs, sts, cache, **kw)


def _grads(shapes, gen, dtype, step, device):
    scale = 1e4 if step % 11 == 5 else (0.0 if step % 13 == 6 else 1.0)  # clipping spikes and zero grads
    return [(torch.randn(s, generator=gen) * scale).to(device, dtype) for s in shapes]


def _run_both(backend, shapes, dtype, steps, **kw):
    """The fused backend and the torch backend side by side; the fused one keeps its cache across steps
    and gets freshly allocated grads every step (as after zero_grad(set_to_none=True))."""
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(dev, dtype) for s in shapes]
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    cache = {}
    for t in range(steps):
        gs = _grads(shapes, gen, dtype, t, dev)
        _step(backend, ours, gs, ours_st, cache=cache, **kw)
        _step(torch_backend, spec, gs, spec_st, **kw)
    return ours, spec, ours_st, spec_st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,weight_decay,maximize", [(torch.float32, 0.0, False), (torch.float32, 0.1, True),
                                                         (torch.bfloat16, 0.1, False), (torch.float16, 0.0, True)])
def test_fused_matches_torch_backend_on_every_shape_class(backend, dtype, weight_decay, maximize):
    steps = _steps(backend, 60, 12 if dtype == torch.float32 else 6)
    ours, spec, ours_st, spec_st = _run_both(backend, _shapes(backend), dtype, steps, weight_decay=weight_decay,
                                             maximize=maximize)
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert a.dtype == dtype
        assert_close_rel(a, b, PARAM_TOL[dtype], f"{dtype} param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], STATE_TOL, f"{dtype} state {k} of {tuple(a.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_torch_backend_per_step_fp32(backend):
    # One step from the same state: <= 1e-6 relative (summation order and rsqrt rounding only).
    ours, spec, _, _ = _run_both(backend, _shapes(backend), torch.float32, 1, weight_decay=0.1)
    for a, b in zip(ours, spec):
        assert_close_rel(a, b, 1e-6, f"param {tuple(a.shape)} after one step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_stays_close_to_torch_backend_over_many_steps(backend):
    # 60 steps (100 on a GPU) with spikes and zero-gradient steps; a few shapes so the interpreter keeps up.
    shapes = _shapes(backend) if DEVICE[backend] == "cuda" else [(37, 53), (7,), (2, 3, 5), (1, 9)]
    ours, spec, _, _ = _run_both(backend, shapes, torch.float32, _steps(backend, 100, 60), weight_decay=0.01)
    for a, b in zip(ours, spec):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)} after many steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_came_pytorch_through_the_optimizer(backend):
    came_pytorch = pytest.importorskip("came_pytorch", reason="came-pytorch is a test dependency")
    dev, shapes = DEVICE[backend], _shapes(backend)
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    ours = [x.clone().requires_grad_() for x in init]
    theirs = [x.clone().requires_grad_() for x in init]
    o1 = came_kernels.CAME(ours, lr=1e-2, weight_decay=0.05, backend=backend)
    o2 = came_pytorch.CAME(theirs, lr=1e-2, weight_decay=0.05)
    for t in range(_steps(backend, 50, 10)):
        for a, b, g in zip(ours, theirs, _grads(shapes, gen, torch.float32, t, dev)):
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, theirs):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_error_vs_float64_oracle_at_most_twice_torch_backends(backend, dtype):
    dev, shapes = DEVICE[backend], _shapes(backend)
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen).to(dev, dtype) for s in shapes]
    oracle = OracleCAME([x.cpu() for x in init], lr=1e-2, weight_decay=0.1)
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    for t in range(_steps(backend, 30, 6)):
        gs = _grads(shapes, gen, dtype, t, dev)
        _step(backend, ours, gs, ours_st, weight_decay=0.1)
        _step(torch_backend, spec, gs, spec_st, weight_decay=0.1)
        oracle.step([g.cpu() for g in gs])
    ulp = torch.finfo(dtype).eps
    for a, b, ref in zip(ours, spec, oracle.p):
        assert rel_err(a, ref) <= 2 * rel_err(b, ref) + 2 * ulp, f"{dtype} param {tuple(a.shape)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_runs_are_bitwise_identical(backend):
    runs = [_run_both(backend, _shapes(backend), torch.float32, _steps(backend, 10, 3))[0] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b), tuple(a.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_in_one_group(backend):
    # Many tensors in one launch (100 on a GPU, 40 in the interpreter): the block -> tensor search over a long table.
    n = _steps(backend, 100, 40)
    shapes = [(5 + i % 7, 3 + i % 11) if i % 3 else (9 + i,) for i in range(n)]
    ours, spec, _, _ = _run_both(backend, shapes, torch.float32, _steps(backend, 5, 2))
    for a, b in zip(ours, spec):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_param_and_grad_are_handled(backend):
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(48, 40, generator=gen).to(dev)
    p = base.t()  # non-contiguous view: the glue runs on a copy and writes it back into `base`
    spec = p.contiguous().clone()
    st, st2 = _state(p.contiguous()), _state(spec)
    cache = {}
    for _ in range(2):
        g = torch.randn(48, 40, generator=gen).to(dev).t()  # non-contiguous grad too
        _step(backend, [p], [g], [st], cache=cache)
        _step(torch_backend, [spec], [g.contiguous()], [st2])
    assert_close_rel(base.t(), spec, 1e-6, "non-contiguous param")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_gradient_shows_in_the_param(backend):
    dev = DEVICE[backend]
    ps = [torch.zeros(8, 8, device=dev), torch.zeros(8, device=dev)]
    gs = [torch.ones(8, 8, device=dev), torch.ones(8, device=dev)]
    gs[0][3, 3] = float("nan")
    gs[1][2] = float("nan")
    _step(backend, ps, gs, [_state(p) for p in ps])
    # As in the torch backend (and came-pytorch): the NaN reaches the RMS clip divisor, so the whole tensor
    # turns NaN; a max() that drops NaN would leave the other elements finite and hide it.
    assert torch.isnan(ps[0]).all() and torch.isnan(ps[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-15, 1e-6, 1.0, 1e6, 1e15, 1e18])
def test_grads_from_1e_minus_30_to_1e18_in_scale_match_torch_backend(backend, scale):
    # The clip's sum of u^2 comes out of phase 1 as sum_b mean_M(r) sum_n P/c (P = column sums of
    # (g*rsqrt(r))^2): it must stay right where g^2 is denormal or near fp32's top. (Above ~1e19 g^2
    # overflows fp32 in every backend, the torch backend and came-pytorch included.)
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 53), (1, 33), (33, 1), (3, 5, 7), (7,), ()]
    ours = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    spec = [p.clone() for p in ours]
    ours_st, spec_st = [_state(p) for p in ours], [_state(p) for p in spec]
    cache = {}
    for t in range(3):
        gs = [(torch.randn(s, generator=gen) * scale).to(dev) for s in shapes]
        _step(backend, ours, gs, ours_st, cache=cache)
        _step(torch_backend, spec, gs, spec_st)
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert torch.isfinite(a).all()
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)} at grad scale {scale:g}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], STATE_TOL, f"state {k} of {tuple(a.shape)} at grad scale {scale:g}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_tiny_gradient_keeps_the_clip_finite(backend):
    # One nonzero element x with x^2 ~ sqrt(M*N)*eps1 in a zero grad: u^2 = x^2 mean_M(r) / (r c) is
    # moderate, but P/c alone ~ sqrt(M*N) / (4*eps1*(1-beta2)^2) = 2e41 passes fp32's range (the fused
    # backends keep W = P/c in fp64). The torch backend clips that element to the threshold.
    dev = DEVICE[backend]
    eps1 = 1e-35
    ours = [torch.zeros(64, 64, device=dev)]
    spec = [torch.zeros(64, 64, device=dev)]
    ours_st, spec_st = [_state(ours[0])], [_state(spec[0])]
    g = torch.zeros(64, 64, device=dev)
    g[5, 7] = (64 * eps1) ** 0.5
    _step(backend, ours, [g], ours_st, eps1=eps1)
    _step(torch_backend, spec, [g], spec_st, eps1=eps1)
    assert torch.isfinite(ours[0]).all() and spec[0][5, 7] != 0
    assert_close_rel(ours[0], spec[0], 1e-6, "param after a single tiny gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grads_and_lr_zero_give_no_nan(backend):
    dev = DEVICE[backend]
    ps = [torch.randn(s, device=dev) for s in [(5, 6), (6,), ()]]
    before = [p.clone() for p in ps]
    sts = [_state(p) for p in ps]
    for _ in range(2):
        _step(backend, ps, [torch.zeros_like(p) for p in ps], sts, lr=0.0, weight_decay=0.1)
    for p, q in zip(ps, before):
        assert torch.equal(p, q)
    _step(backend, ps, [torch.zeros_like(p) for p in ps], sts, weight_decay=0.1)
    for p in ps:
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_tables_follow_moving_grads_and_new_params(backend):
    # One cache across calls: grads reallocated every step, then a different param set with the same cache.
    dev = DEVICE[backend]
    cache = {}
    for shapes in ([(9, 13), (13,)], [(4, 3, 5), (11,), (2, 2)]):
        ps = [torch.randn(s, device=dev) for s in shapes]
        spec = [p.clone() for p in ps]
        st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
        for _ in range(3):
            gs = [torch.randn(s, device=dev) for s in shapes]
            _step(backend, ps, gs, st, cache=cache)
            _step(torch_backend, spec, gs, st2)
        for a, b in zip(ps, spec):
            assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_matches_float_lr(backend):
    dev = DEVICE[backend]
    ps = [torch.randn(s, device=dev) for s in [(6, 10), (10,)]]
    qs = [p.clone() for p in ps]
    st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    gs = [torch.randn_like(p) for p in ps]
    _step(backend, ps, gs, st, lr=torch.tensor(0.01, device=dev), weight_decay=0.1)
    _step(backend, qs, gs, st2, lr=0.01, weight_decay=0.1)
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not _GPU, reason="host syncs only exist with a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_makes_no_host_sync(backend):
    ps = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    sts = [_state(p) for p in ps]
    cache = {}
    for lr in (1e-2, torch.tensor(1e-2, device="cuda")):
        _step(backend, ps, [torch.randn_like(p) for p in ps], sts, cache=cache, lr=lr)  # warm-up: JIT, tables
        gs = [torch.randn_like(p) for p in ps]  # new grads: the table's grad column moves
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(backend, ps, gs, sts, cache=cache, lr=lr)
            _step(backend, ps, gs, sts, cache=cache, lr=lr * 0.5)  # a new lr: no sync, no recompile
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_state_dict_matches_uninterrupted_run(backend):
    dev, shapes = DEVICE[backend], _shapes(backend)
    n = _steps(backend, 20, 4)
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    grads = [_grads(shapes, gen, torch.float32, t, dev) for t in range(n)]

    def run(params, opt, ts):
        for t in ts:
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            opt.step()

    a = [x.clone().requires_grad_() for x in init]
    oa = came_kernels.CAME(a, lr=1e-2, weight_decay=0.01, backend=backend)
    run(a, oa, range(n))
    b = [x.clone().requires_grad_() for x in init]
    ob = came_kernels.CAME(b, lr=1e-2, weight_decay=0.01, backend=backend)
    run(b, ob, range(n // 2))
    saved = copy.deepcopy(ob.state_dict())
    c = [x.detach().clone().requires_grad_() for x in b]
    oc = came_kernels.CAME(c, lr=1e-2, weight_decay=0.01, backend=backend)
    oc.load_state_dict(saved)
    run(c, oc, range(n // 2, n))
    for x, y in zip(a, c):
        assert torch.equal(x, y), tuple(x.shape)


# ---- availability: runs everywhere
def test_triton_on_cpu_without_the_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = triton_backend.unavailable_reason(torch.device("cpu"))
    assert why is not None and "TRITON_INTERPRET=1" in why and "backend='torch'" in why


def test_auto_picks_a_fused_backend_only_for_cuda_tensors():
    assert came_kernels.default_backend("cpu") == "torch"
    if _GPU:
        assert came_kernels.default_backend("cuda") in ("cuda", "triton")
