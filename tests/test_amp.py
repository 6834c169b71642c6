"""GradScaler support (`_step_supports_amp_scaling`): step() reads the optimizer's `grad_scale` and
`found_inf`, as torch.optim.AdamW(fused=True) does. The result must equal unscaling first and stepping,
and a step with an inf/NaN grad must change nothing at all, step counters included."""
import copy

import pytest
import torch

from came_kernels import CAME

SHAPES = [(6, 5), (5,), (2, 3, 4), (1, 7)]


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(t, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_in_step_equals_unscale_then_step(dtype):
    a, b = _params(dtype), _params(dtype)
    oa, ob = CAME(a, lr=1e-2, weight_decay=0.1), CAME(b, lr=1e-2, weight_decay=0.1)
    scale = 2.0 ** 14
    for t in range(5):
        for p, q, g in zip(a, b, _grads(t)):
            p.grad = (g * scale).to(dtype)   # what backward produces under a GradScaler
            q.grad = g.to(dtype)             # unscaled (exactly: the scale is a power of 2)
        oa.grad_scale = torch.tensor(scale)
        oa.found_inf = torch.tensor(0.0)
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for p, q in zip(a, b):
        for k in oa.state[p]:
            assert torch.equal(oa.state[p][k], ob.state[q][k]), k


def test_found_inf_changes_nothing_at_all():
    ps = _params()
    opt = CAME(ps, lr=1e-2, weight_decay=0.1)
    for t in range(2):
        for p, g in zip(ps, _grads(t)):
            p.grad = g
        opt.step()
    before = ([p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict()))
    for p, g in zip(ps, _grads(9)):
        p.grad = g
    ps[0].grad[1, 2] = float("inf")
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
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
