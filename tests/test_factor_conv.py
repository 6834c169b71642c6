"""Opt-in conv factoring (`factor_conv=True`): a param with ndim >= 3 is stepped as its [out, rest] matrix.

The spec is an equivalence: CAME(factor_conv=True) on a conv weight equals default CAME on the same weight
reshaped to 2-D. Every fused backend is checked against the torch backend, channels_last weights and grads
included (stepped through a copy that is written back).
"""
import pytest
import torch

import came_kernels
from came_kernels.backends import triton_backend
from came_testing import fused_backend_params
from oracle import OracleCAME, assert_close_rel

_GPU = torch.cuda.is_available()
SHAPES = [(8, 3, 3, 3), (6, 4, 1, 1), (5, 4, 3), (2, 3, 1, 1, 2), (7, 5), (9,)]


def _train(shapes, steps, backend="torch", device="cpu", channels_last=False, **kw):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).to(device) for s in shapes]
    fmt = lambda x: x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x  # noqa
    ps = [fmt(p).requires_grad_() for p in ps]
    opt = came_kernels.CAME(ps, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    history = []
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen).to(device) for s in shapes]
        history.append(gs)
        for p, g in zip(ps, gs):
            p.grad = fmt(g)
        opt.step()
    return ps, opt, history


def test_state_is_factored_over_out_and_the_rest():
    ps, opt, _ = _train(SHAPES, 1, factor_conv=True)
    for p in ps:
        st = opt.state[p]
        if p.ndim >= 3:
            rest = p.numel() // p.shape[0]
            assert st["exp_avg_sq_row"].shape == st["exp_avg_res_row"].shape == (p.shape[0],)
            assert st["exp_avg_sq_col"].shape == st["exp_avg_res_col"].shape == (rest,)
            assert st["exp_avg"].shape == p.shape
    d_ps, d_opt, _ = _train(SHAPES, 1)
    stats = lambda st: sum(v.numel() for k, v in st.items() if k not in ("step", "exp_avg"))  # noqa: E731
    # A 1x1 conv [6, 4, 1, 1]: by default its "matrices" are [4, 1], so r and c (and R and C) are [6, 4, 1]
    # each, as large as the weight; factored as [6, 4], they are 6 and 4 floats.
    assert stats(d_opt.state[d_ps[1]]) == 4 * 24
    assert stats(opt.state[ps[1]]) == 2 * (6 + 4)


def test_equals_default_came_on_the_weight_viewed_as_a_matrix_and_the_oracle():
    ps, _, history = _train(SHAPES, 20, factor_conv=True)
    flat_shapes = [(s[0], torch.Size(s[1:]).numel()) if len(s) >= 3 else s for s in SHAPES]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).reshape(f) for s, f in zip(SHAPES, flat_shapes)]
    qs = [x.clone().requires_grad_() for x in init]
    opt = came_kernels.CAME(qs, lr=1e-2, weight_decay=0.1, backend="torch")
    oracle = OracleCAME(init, lr=1e-2, weight_decay=0.1)
    for gs in history:
        flat = [g.reshape(f) for g, f in zip(gs, flat_shapes)]
        for q, g in zip(qs, flat):
            q.grad = g
        opt.step()
        oracle.step(flat)
    for p, q, ref in zip(ps, qs, oracle.p):
        assert torch.equal(p.detach().reshape(q.shape), q.detach()), f"param {tuple(p.shape)}"
        assert_close_rel(q, ref, 1e-5, f"param {tuple(p.shape)} vs oracle")


def test_channels_last_weights_are_written_back():
    a, _, _ = _train(SHAPES, 4, factor_conv=True)
    b, _, _ = _train(SHAPES, 4, factor_conv=True, channels_last=True)
    assert b[0].is_contiguous(memory_format=torch.channels_last)
    for x, y in zip(a, b):
        assert torch.equal(x, y), f"param {tuple(x.shape)}"


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_matches_torch_backend(backend, channels_last, monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    device = "cuda" if _GPU else "cpu"
    shapes = SHAPES + ([(64, 32, 3, 3), (256, 128, 1, 1)] if _GPU else [])
    ours, o1, _ = _train(shapes, 4, backend, device, channels_last, factor_conv=True)
    spec, o2, _ = _train(shapes, 4, "torch", device, channels_last, factor_conv=True)
    for a, b in zip(ours, spec):
        assert_close_rel(a, b, 1e-5, f"{backend} param {tuple(a.shape)}")
        for k, v in o1.state[a].items():
            assert_close_rel(v, o2.state[b][k], 2e-4, f"{backend} state {k} of {tuple(a.shape)}")


def test_checkpoint_keeps_the_layout_it_was_saved_with():
    ps, opt, _ = _train(SHAPES, 2, factor_conv=True)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["factor_conv"] is True
    fresh = came_kernels.CAME(ps, lr=1e-2)  # built without it: the checkpoint's layout wins
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["factor_conv"] is True
    for p in ps:
        p.grad = torch.randn_like(p)
    fresh.step()  # shapes consistent: no error
    bad = opt.state_dict()
    bad["param_groups"][0]["factor_conv"] = False  # the states no longer have the shapes it says
    with pytest.raises(ValueError, match="exp_avg_sq_row' has shape"):
        came_kernels.CAME(ps, lr=1e-2).load_state_dict(bad)
    bad["param_groups"][0]["factor_conv"] = "yes"
    with pytest.raises(ValueError, match="factor_conv must be a bool"):
        came_kernels.CAME(ps, lr=1e-2).load_state_dict(bad)


def test_came_pytorch_checkpoint_keeps_came_pytorch_layout():
    came_pytorch = pytest.importorskip("came_pytorch")
    p = torch.randn(6, 4, 1, 1, requires_grad=True)
    theirs = came_pytorch.CAME([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    theirs.step()
    ours = came_kernels.CAME([p], lr=1e-2, factor_conv=True)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["factor_conv"] is False
    assert ours.state[p]["exp_avg_sq_row"].shape == (6, 4, 1)


def test_bad_value_is_rejected():
    with pytest.raises(ValueError, match="factor_conv must be a bool"):
        came_kernels.CAME([torch.zeros(2, 2, 1, requires_grad=True)], lr=0.1, factor_conv=1)


def test_triton_steady_state_holds_for_conv_weights_and_sees_a_data_swap(monkeypatch):
    # The matrix views are reused while nothing changes, so the Triton backend skips its checks as for
    # any other model; a conv weight whose .data is swapped gets new views (and the right result).
    why = triton_backend.unavailable_reason(torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    calls = []
    real = triton_backend._prepare
    monkeypatch.setattr(triton_backend, "_prepare", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for backend in ("triton", "torch"):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
        opt = came_kernels.CAME(ps, lr=1e-2, backend=backend, factor_conv=True)
        for t in range(5):
            if t == 3:
                ps[0].data = ps[0].data.clone()  # same values, new storage
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs[backend] = ps
    # Full path: step 0, step 1 (the optimizer's lists become tuples), step 3 (the swap); not steps 2 and 4.
    assert len(calls) == 3, calls
    for a, b in zip(*runs.values()):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)}")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    triton_backend.unavailable_reason(torch.device("cuda" if _GPU else "cpu")) is not None,
    reason="Triton (or its interpreter) is not available"))])
def test_low_precision_state_of_a_conv_weight_is_that_of_its_matrix(backend):
    # bf16 conv weights with an int8 momentum and Kahan rounding: the compensation is stepped as the matrix
    # too (it has the param's shape), and the bits equal default factoring of the weight viewed as a matrix.
    device = "cuda" if _GPU else "cpu"
    shapes = [(64, 16, 2, 2), (6, 4, 3, 1)]
    kw = dict(lr=1e-2, weight_decay=0.1, momentum_dtype="int8", param_rounding="kahan", seed=3)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in shapes]
    ps = [x.clone().requires_grad_() for x in init]
    qs = [x.reshape(x.shape[0], -1).clone().requires_grad_() for x in init]
    a = came_kernels.CAME(ps, backend=backend, factor_conv=True, **kw)
    b = came_kernels.CAME(qs, backend=backend, **kw)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
            q.grad = p.grad.reshape(q.shape)
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach().reshape(q.shape), q.detach()), f"param {tuple(p.shape)}"
        assert torch.equal(a.state[p]["param_comp"].reshape(q.shape), b.state[q]["param_comp"])
    assert "exp_avg_q" in a.state[ps[0]]
