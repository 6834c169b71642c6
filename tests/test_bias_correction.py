"""Opt-in bias correction (`bias_correction=`): the torch backend against the float64 oracle, every fused
backend against the torch backend, the default untouched, checkpoints, validation and torch.compile.

The correction is two device scalars per tensor (torch_backend.bias_scales); tensors whose step counters
differ (a param that got its first grad later) must each get their own, which the tests below arrange.
"""
import math

import pytest
import torch

import came_kernels
from came_kernels.backends import torch_backend, triton_backend
from came_testing import SHAPES_CPU, SHAPES_GPU, fused_backend_params
from oracle import OracleCAME, assert_close_rel

_GPU = torch.cuda.is_available()
TERM_SETS = [True, ("exp_avg",), ("exp_avg_sq",), ("exp_avg_res",), ("exp_avg_sq", "exp_avg_res")]
SHAPES = [(5, 7), (3, 4, 6), (9,), (1, 6), (6, 1), (1, 1), (2, 1, 3, 4), ()]


def _grads(shapes, gen, dtype, device):
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


def _train(shapes, steps, backend, bc, dtype=torch.float32, device="cpu", late=(), seed=0, **kw):
    """`steps` steps of CAME; params whose index is in `late` get no grad for the first 2 steps, so their
    step counters lag behind the others'. Returns (params, optimizer, the grads of every step)."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]
    kw = dict(dict(lr=1e-2, weight_decay=0.1), **kw)
    opt = came_kernels.CAME(ps, backend=backend, bias_correction=bc, **kw)
    history = []
    for t in range(steps):
        gs = _grads(shapes, gen, dtype, device)
        history.append(gs)
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if (i in late and t < 2) else g
        opt.step()
    return ps, opt, history


@pytest.mark.parametrize("bc", TERM_SETS)
def test_torch_backend_matches_float64_oracle(bc):
    ps, _, history = _train(SHAPES, 30, "torch", bc)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    oracle = OracleCAME(init, lr=1e-2, weight_decay=0.1, bias_correction=bc)
    for gs in history:
        oracle.step(gs)
    for p, ref in zip(ps, oracle.p):
        assert_close_rel(p, ref, 1e-5, f"bias_correction={bc} param {tuple(p.shape)}")


def test_float64_params_match_the_oracle_tightly():
    ps, _, history = _train(SHAPES, 20, "torch", True, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    oracle = OracleCAME([torch.randn(s, generator=gen).double() for s in SHAPES], lr=1e-2, weight_decay=0.1,
                        bias_correction=True)
    for gs in history:
        oracle.step(gs)
    for p, ref in zip(ps, oracle.p):
        assert p.dtype == torch.float64
        assert_close_rel(p, ref, 1e-12, f"fp64 param {tuple(p.shape)}")


def test_corrected_first_step_is_the_textbook_one():
    # At t = 1 with every term corrected: c_hat = mean_M(g^2 + eps1), m_hat = u_hat and C_hat = mean_M of
    # (u_hat - (1-b1) u_hat)^2 + eps2: written out by hand here for one matrix, without the oracle.
    g = torch.randn(4, 5, dtype=torch.float64)
    p = torch.randn(4, 5, dtype=torch.float64)
    b1, e1, e2, lr = 0.9, 1e-30, 1e-16, 0.1
    sq = g * g + e1
    r, c = sq.mean(1), sq.mean(0)
    u = g / torch.sqrt(r[:, None] * c[None, :] / r.mean())
    u_hat = u / max(1.0, u.pow(2).mean().sqrt().item())
    res = (u_hat - (1 - b1) * u_hat) ** 2 + e2
    R, C = res.mean(1), res.mean(0)
    want = p - lr * u_hat / torch.sqrt(R[:, None] * C[None, :] / R.mean())
    q = p.clone().requires_grad_()
    q.grad = g
    came_kernels.CAME([q], lr=lr, bias_correction=True, backend="torch").step()
    assert_close_rel(q.detach(), want, 1e-12, "corrected first step")


def test_default_is_uncorrected_and_equal_to_false():
    a, _, _ = _train(SHAPES, 5, "torch", False)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = came_kernels.CAME(ps, lr=1e-2, weight_decay=0.1, backend="torch")
    assert opt.param_groups[0]["bias_correction"] is False
    for _ in range(5):
        for p, g in zip(ps, _grads(SHAPES, gen, torch.float32, "cpu")):
            p.grad = g
        opt.step()
    for x, y in zip(a, ps):
        assert torch.equal(x, y)
    c, _, _ = _train(SHAPES, 5, "torch", True)
    assert not any(torch.equal(x, y) for x, y in zip(a, c) if x.ndim >= 1)  # the option does something


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("bc", [True, ("exp_avg",), ("exp_avg_sq",), ("exp_avg_res",)])
def test_fused_matches_torch_backend(backend, bc, monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    device = "cuda" if _GPU else "cpu"
    shapes = SHAPES_GPU if _GPU else SHAPES_CPU
    steps = 20 if _GPU else 4
    late = (2, 5, len(shapes) - 1)  # 1-D, a matrix, a large flat tensor: their own step counts
    ours, o1, _ = _train(shapes, steps, backend, bc, device=device, late=late)
    spec, o2, _ = _train(shapes, steps, "torch", bc, device=device, late=late)
    for a, b in zip(ours, spec):
        assert_close_rel(a, b, 1e-5, f"{backend} bias_correction={bc} param {tuple(a.shape)}")
        for k, v in o1.state[a].items():
            assert_close_rel(v, o2.state[b][k], 2e-4, f"{backend} state {k} of {tuple(a.shape)}")
    assert float(o1.state[ours[2]]["step"]) == steps - 2


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_torch_backend_low_precision(backend, dtype, monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    device = "cuda" if _GPU else "cpu"
    shapes = [(5, 7), (3, 4, 6), (9,), (1, 6), ()]
    ours, _, _ = _train(shapes, 4, backend, True, dtype=dtype, device=device)
    spec, _, _ = _train(shapes, 4, "torch", True, dtype=dtype, device=device)
    for a, b in zip(ours, spec):
        assert a.dtype == dtype
        assert_close_rel(a, b, 4 * torch.finfo(dtype).eps, f"{dtype} param {tuple(a.shape)}")


def test_bias_scales_are_exact_where_fp32_powers_are_not():
    # 1 - 0.9999^1 computed as 1 - fp32(0.9999)^1 is off by 2e-4 relative; the scales must not be.
    steps = [torch.tensor(float(t)) for t in (1, 10, 1000, 100000)]
    s = torch_backend.bias_scales(steps, [True] * 4, {"exp_avg", "exp_avg_sq", "exp_avg_res"}, beta1=0.9,
                                  beta2=0.999, beta3=0.9999)
    for (s_u, s_m), t in zip(s.tolist(), (1, 10, 1000, 100000)):
        want_u = math.sqrt(1 - 0.999 ** t)
        want_m = math.sqrt(1 - 0.9999 ** t) / (1 - 0.9 ** t)
        assert abs(s_u - want_u) <= 1e-6 * want_u and abs(s_m - want_m) <= 1e-6 * want_m, (t, s_u, s_m)
    flat = torch_backend.bias_scales(steps[:1], [False], {"exp_avg_res"}, beta1=0.9, beta2=0.999, beta3=0.9999)
    assert flat.tolist() == [[1.0, 1.0]]  # no confidence statistic: nothing to correct


@pytest.mark.parametrize("bad", [torch.ones(3, 2), torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 3)[:, :2],
                                 torch.ones(2)])
def test_fused_backend_rejects_a_malformed_bias_scales_before_any_change(bad):
    if triton_backend.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter is not available")
    ps = [torch.randn(4, 3), torch.randn(5)]
    before = [p.clone() for p in ps]
    m = [torch.zeros_like(p) for p in ps]
    with pytest.raises(ValueError, match="bias_scales must be a contiguous float32 tensor of shape \\(2, 2\\)"):
        triton_backend.came_step(ps, [torch.ones_like(p) for p in ps], m, [torch.zeros(4), None],
                                 [torch.zeros(3), None], [torch.zeros(4), None], [torch.zeros(3), None],
                                 [None, torch.zeros(5)], lr=0.1, beta1=0.9, beta2=0.999, beta3=0.9999,
                                 eps1=1e-30, eps2=1e-16, clip_threshold=1.0, weight_decay=0.0, maximize=False,
                                 cache={}, bias_scales=bad)
    assert all(torch.equal(a, b) for a, b in zip(ps, before)) and all(not x.any() for x in m)


@pytest.mark.parametrize("bad", ["yes", ("exp_avg", "rms"), (), 1])
def test_bad_option_is_rejected_naming_it(bad):
    with pytest.raises(ValueError, match="bias_correction must be True, False or a tuple of terms"):
        came_kernels.CAME([torch.zeros(2, 2, requires_grad=True)], lr=0.1, bias_correction=bad)


def test_option_is_saved_and_loaded_and_checked():
    ps, opt, _ = _train(SHAPES, 3, "torch", ("exp_avg_res", "exp_avg"))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["bias_correction"] == ("exp_avg", "exp_avg_res")  # one order
    fresh = came_kernels.CAME(ps, lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["bias_correction"] == ("exp_avg", "exp_avg_res")
    sd["param_groups"][0]["bias_correction"] = ("nonsense",)
    with pytest.raises(ValueError, match="bias_correction"):
        fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["bias_correction"] == ("exp_avg", "exp_avg_res")


def test_came_pytorch_checkpoint_loads_uncorrected():
    came_pytorch = pytest.importorskip("came_pytorch")
    ps = [torch.randn(4, 3, requires_grad=True)]
    theirs = came_pytorch.CAME(ps, lr=1e-2)
    ps[0].grad = torch.randn(4, 3)
    theirs.step()
    ours = came_kernels.CAME(ps, lr=1e-2, bias_correction=True)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["bias_correction"] is False  # the checkpoint's training had none


def test_compiled_step_equals_eager_and_never_recompiles_as_t_grows():
    from torch._dynamo.utils import counters
    shapes = [(5, 7), (9,), (3, 4, 6)]

    def run(compiled):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        opt = came_kernels.CAME(ps, lr=torch.tensor(1e-2), bias_correction=True, backend="torch")
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        for _ in range(4):
            for p, g in zip(ps, _grads(shapes, gen, torch.float32, "cpu")):
                p.grad = g
            step()
        return ps

    ref = run(False)
    counters.clear()
    ours = run(True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for a, b in zip(ours, ref):
        assert_close_rel(a, b, 1e-6, f"compiled param {tuple(a.shape)}")


@pytest.mark.skipif(not _GPU, reason="host syncs only exist with a GPU")
@pytest.mark.parametrize("backend", ["torch"] + fused_backend_params())
def test_step_makes_no_host_sync(backend):
    ps = [torch.randn(64, 32, device="cuda", requires_grad=True), torch.randn(32, device="cuda", requires_grad=True)]
    opt = came_kernels.CAME(ps, lr=torch.tensor(1e-2, device="cuda"), bias_correction=True, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: JIT, tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
