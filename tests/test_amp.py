"""GradScaler support (`_step_supports_amp_scaling`): step() reads the optimizer's `grad_scale` and
`found_inf`, as torch.optim.AdamW(fused=True) does. The result must equal unscaling first and stepping,
and a step with an inf/NaN grad must change nothing at all, step counters included."""
import copy

import pytest
import torch

import came_kernels
from came_kernels import CAME
from came_kernels.backends import triton_backend

_GPU = torch.cuda.is_available()
DEVICE = "cuda" if _GPU else "cpu"


def _backends():
    """torch, triton, and "auto" on a GPU (the CUDA kernels do not take the scale yet: auto runs GradScaler
    steps on Triton; an explicit backend="cuda" refuses them, see the last test)."""
    out = [pytest.param("torch", "cpu")]
    why = came_kernels.backends.unavailable_reason("triton", DEVICE)
    out.append(pytest.param("triton", DEVICE, marks=pytest.mark.skipif(why is not None, reason=str(why))))
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


@pytest.mark.skipif(came_kernels.backends.unavailable_reason("cuda", "cuda") is not None,
                    reason="needs the CUDA extension and a GPU")
def test_explicit_cuda_backend_refuses_a_grad_scale_and_says_what_to_do():
    ps = _params(device="cuda")
    opt = CAME(ps, lr=1e-2, backend="cuda")
    for p, g in zip(ps, _grads(0)):
        p.grad = g.cuda()
    before = [p.detach().clone() for p in ps]
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device="cuda"), torch.tensor(0.0, device="cuda")
    with pytest.raises(NotImplementedError, match="backend='triton'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    assert all(float(st["step"]) == 0 for st in opt.state.values())  # refused before anything changed
