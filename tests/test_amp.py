"""GradScaler support (`_step_supports_amp_scaling`): step() reads the optimizer's `grad_scale` and
`found_inf`, as torch.optim.AdamW(fused=True) does. The result must equal unscaling first and stepping,
and a step with an inf/NaN grad must change nothing at all, step counters included. Every backend takes
them: the fused kernels (Triton and CUDA) read [found_inf, 1/scale] on the device, without a host sync.
"""
import copy

import pytest
import torch

import came_kernels
import came_kernels.functional
from came_kernels import CAME
from came_kernels.backends import cuda_backend, torch_backend, triton_backend
from came_testing import HYPER, SHAPES_GPU, new_state, state_lists
from oracle import assert_close_rel

_GPU = torch.cuda.is_available()
DEVICE = "cuda" if _GPU else "cpu"
_CUDA_WHY = came_kernels.backends.unavailable_reason("cuda", "cuda")
needs_cuda = pytest.mark.skipif(_CUDA_WHY is not None, reason=f"backend='cuda' unavailable: {_CUDA_WHY}")


def _backends():
    """torch, triton, cuda (the extension, on a GPU) and "auto" on a GPU (the extension when built)."""
    out = [pytest.param("torch", "cpu")]
    why = came_kernels.backends.unavailable_reason("triton", DEVICE)
    out.append(pytest.param("triton", DEVICE, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    out.append(pytest.param("cuda", "cuda", marks=needs_cuda))
    out.append(pytest.param("auto", "cuda", marks=pytest.mark.skipif(not _GPU, reason="needs a GPU")))
    return out


def _assert_close(a, b, backend, what):
    # The torch backend unscales exactly as unscale_ + step: bitwise. A compiled fused kernel is a different
    # program with and without the scale (the compiler may order a reduction differently): rounding only.
    if backend == "torch" or a.device.type == "cpu":
        assert torch.equal(a, b), what
    else:
        tol = 1e-6 if a.dtype == torch.float32 else 2.0 ** -6
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{what}: {err:.2e}"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)

SHAPES = [(6, 5), (5,), (2, 3, 4), (1, 7)]


def _params(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in SHAPES]


def _grads(t, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_in_step_equals_unscale_then_step(backend, device, dtype):
    a, b = _params(dtype, device), _params(dtype, device)
    oa = CAME(a, lr=1e-2, weight_decay=0.1, backend=backend)
    ob = CAME(b, lr=1e-2, weight_decay=0.1, backend=backend)
    scale = 2.0 ** 14
    for t in range(5):
        for p, q, g in zip(a, b, _grads(t)):
            p.grad = (g * scale).to(device, dtype)   # what backward produces under a GradScaler
            q.grad = g.to(device, dtype)             # unscaled (exactly: the scale is a power of 2)
        oa.grad_scale = torch.tensor(scale, device=device)
        oa.found_inf = torch.tensor(0.0, device=device)
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        _assert_close(p, q, backend, f"param {tuple(p.shape)}")
    for p, q in zip(a, b):
        for k in oa.state[p]:
            _assert_close(oa.state[p][k], ob.state[q][k], backend, k)


@pytest.mark.parametrize("backend,device", _backends())
def test_found_inf_changes_nothing_at_all(backend, device):
    ps = _params(device=device)
    opt = CAME(ps, lr=1e-2, weight_decay=0.1, backend=backend)
    for t in range(2):
        for p, g in zip(ps, _grads(t)):
            p.grad = g.to(device)
        opt.step()
    before = ([p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict()))
    for p, g in zip(ps, _grads(9)):
        p.grad = g.to(device)
    ps[0].grad[1, 2] = float("inf")
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=device), torch.tensor(1.0, device=device)
    opt.step()
    for p, q in zip(ps, before[0]):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for k, st in before[1]["state"].items():
        for key, v in st.items():
            assert torch.equal(after["state"][k][key], v), key  # "step" included


def test_with_torch_grad_scaler_end_to_end():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ref = copy.deepcopy(model)
    opt, ropt = CAME(model.parameters(), lr=1e-2), CAME(ref.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for t in range(4):
        opt.zero_grad()
        ropt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if t == 2:  # an overflow step: GradScaler skips it and halves its scale
            next(model.parameters()).grad[0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
        if t != 2:
            torch.nn.functional.mse_loss(ref(x), y).backward()
            ropt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert float(opt.state[next(model.parameters())]["step"]) == 3


def test_every_backend_gets_the_scale_itself_none_is_rerouted(monkeypatch):
    # functional.came hands grad_scale/found_inf to the backend that resolve_backend picked, "cuda" included
    # (it used to reroute GradScaler steps away from it). Runs anywhere: the backend is a recorder.
    calls = []
    monkeypatch.setattr(came_kernels.functional, "resolve_backend", lambda *a, **k: "cuda")
    monkeypatch.setattr(came_kernels.functional, "get_step_fn",
                        lambda name, device: lambda *a, **kw: calls.append((name, kw)))
    ps = [torch.zeros(3, 2), torch.zeros(2)]
    st = [new_state(p) for p in ps]
    scale, found = torch.tensor(8.0), torch.tensor(0.0)
    came_kernels.functional.came(ps, [torch.ones_like(p) for p in ps], *state_lists(st), backend="cuda",
                                 grad_scale=scale, found_inf=found, **HYPER)
    assert [name for name, _ in calls] == ["cuda"]
    assert torch.equal(calls[0][1]["grad_scale"], scale) and torch.equal(calls[0][1]["found_inf"], found)


def _cuda_and_spec(dtype, grad_scale, steps, maximize, found_at=()):
    """cuda_backend.came_step and the torch backend side by side, both with GradScaler's scale; the grads are
    scaled as backward produces them. found_at: steps at which found_inf is set (a skipped step)."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to("cuda", dtype) for s in SHAPES_GPU]
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [new_state(x) for x in init], [new_state(x) for x in init]
    hyper = HYPER | dict(weight_decay=0.1, maximize=maximize)
    scale = torch.tensor(grad_scale, device="cuda")
    for t in range(steps):
        big = 1e4 if t % 11 == 5 else 1.0  # a clipping spike
        gs = [(torch.randn(s, generator=gen) * big * grad_scale).to("cuda", dtype) for s in SHAPES_GPU]
        found = torch.tensor(float(t in found_at), device="cuda")
        cuda_backend.came_step(ours, gs, *state_lists(ours_st), cache={}, grad_scale=scale, found_inf=found,
                               **hyper)
        torch_backend.came_step(spec, gs, *state_lists(spec_st), cache={}, grad_scale=scale, found_inf=found,
                                **hyper)
    return ours, spec, ours_st, spec_st


@needs_cuda
@pytest.mark.parametrize("dtype,grad_scale,maximize", [(torch.float32, 2.0 ** 14, False),
                                                       (torch.float32, 3.0, True),
                                                       (torch.bfloat16, 2.0 ** 16, False),
                                                       (torch.float16, 0.5, True)])
def test_cuda_kernels_with_grad_scale_match_torch_backend(dtype, grad_scale, maximize):
    # Every shape class (stripes, flat chunks, ragged and aligned rows): the kernels unscale g in phases 1-3
    # where the Triton kernels do; 3.0 is not a power of 2, so the unscale rounds (summation order only).
    ours, spec, ours_st, spec_st = _cuda_and_spec(dtype, grad_scale, 12, maximize, found_at=(4,))
    tol = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0 ** -7, torch.float16: 4 * 2.0 ** -10}[dtype]
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert_close_rel(a, b, tol, f"{dtype} param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 2e-4, f"{dtype} state {k} of {tuple(a.shape)}")


@needs_cuda
def test_cuda_kernels_with_grad_scale_are_not_the_unscaled_step():
    # The check above can fail: the same scaled grads without the scale give statistics that grow with the
    # scale squared (r, c, v), and with it give those of the unscaled grads.
    gen = torch.Generator().manual_seed(1)
    ps = [torch.randn(s, generator=gen).cuda() for s in [(70, 33), (40000,)]]
    gs = [torch.randn(p.shape, generator=gen).cuda() for p in ps]
    runs = {}
    for name, grads, amp in (("unscaled", gs, {}), ("scaled", [g * 1024.0 for g in gs], {}),
                             ("with_scale", [g * 1024.0 for g in gs], dict(grad_scale=torch.tensor(1024.0).cuda()))):
        st = [new_state(p) for p in ps]
        cuda_backend.came_step([p.clone() for p in ps], grads, *state_lists(st), cache={}, **HYPER, **amp)
        runs[name] = st
    for k, key in ((0, "r"), (0, "c"), (1, "v")):
        assert torch.allclose(runs["with_scale"][k][key], runs["unscaled"][k][key], rtol=1e-6, atol=0), key
        assert not torch.allclose(runs["scaled"][k][key], runs["unscaled"][k][key], rtol=0.5), key


@pytest.mark.skipif(not _GPU, reason="host syncs only exist with a GPU")
@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] in ("triton", "cuda")])
def test_grad_scaler_step_makes_no_host_sync(backend, device):
    ps = [torch.randn(64, 32, device="cuda", requires_grad=True), torch.randn(32, device="cuda", requires_grad=True)]
    opt = CAME(ps, lr=torch.tensor(1e-2, device="cuda"), backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device="cuda"), torch.tensor(0.0, device="cuda")
    opt.step()  # warm-up: JIT, tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.found_inf.fill_(1.0)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
