"""The steady-state fast path of CAME.step (CAME._unchanged): when a step's grads and state are the very
objects of the previous step, the lists and the validation are reused. It must never change a result,
never miss a change, and never keep a grad alive."""
import gc
import weakref

import pytest
import torch

from came_kernels import CAME, _fastpath

SHAPES = [(6, 5), (5,), (2, 3, 4)]


@pytest.fixture(autouse=True, params=["cpp", "python"])
def checks(request, monkeypatch):
    """Every test here runs with the per-step checks in C++ (came_kernels._host, where it is built) and in
    Python (_fastpath's fallback): both must make the same decisions."""
    if request.param == "cpp" and not _fastpath.native():
        pytest.skip("came_kernels._host is not built (pip install --no-build-isolation -e .)")
    if request.param == "python":
        monkeypatch.setattr(_fastpath, "_native", None)
    return request.param


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=g) for s in SHAPES]


def test_reused_grad_objects_give_the_same_result_as_fresh_ones():
    a, b = _params(), _params()
    oa, ob = CAME(a, lr=1e-2, weight_decay=0.1), CAME(b, lr=1e-2, weight_decay=0.1)
    for p in a:
        p.grad = torch.zeros_like(p)
    for t in range(6):
        for p, q, g in zip(a, b, _grads(t)):
            p.grad.copy_(g)      # same grad objects every step: the fast path
            q.grad = g.clone()   # new grad objects every step: the full path
        oa.step()
        ob.step()
        assert oa._caches[0]["fast"]["lists"][0] == tuple(a)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_a_bad_grad_after_steady_state_is_still_caught_and_changes_nothing():
    ps = _params()
    opt = CAME(ps, lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()  # steady state
    before = [p.detach().clone() for p in ps]
    steps = [float(opt.state[p]["step"]) for p in ps]
    ps[0].grad = torch.randn(6, 5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    assert [float(opt.state[p]["step"]) for p in ps] == steps


def test_a_state_tensor_replaced_in_place_of_the_old_one_is_used():
    ps = _params()
    opt = CAME(ps, lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    new_m = torch.zeros(6, 5)
    opt.state[ps[0]]["exp_avg"] = new_m
    opt.step()
    assert new_m.abs().sum() > 0  # the step wrote the new tensor, not the remembered one


def test_a_new_param_group_and_a_param_without_grad_are_seen():
    ps = _params()
    opt = CAME(ps[:2], lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    opt.add_param_group({"params": [ps[2]]})
    opt.step()
    assert float(opt.state[ps[2]]["step"]) == 1
    ps[1].grad = None
    before = ps[1].detach().clone()
    opt.step()
    assert torch.equal(ps[1], before) and float(opt.state[ps[1]]["step"]) == 3


def test_last_steps_grads_are_not_kept_alive():
    ps = _params()
    opt = CAME(ps, lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    refs = [weakref.ref(p.grad) for p in ps]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs), "the optimizer holds on to freed grads"


# ------------------------------------------------------------------ the Triton backend's steady state
def _triton_or_skip():
    from came_kernels.backends import triton_backend
    why = triton_backend.unavailable_reason(torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    return triton_backend


@pytest.mark.parametrize("change", ["data", "restride", "grad_layout", "none"])
def test_triton_steady_state_sees_storage_swaps_restrides_and_odd_grads(change, monkeypatch):
    # After a first step, the backend skips its checks while nothing changed (triton_backend._steady); a
    # param whose .data is swapped or restrided, or a non-contiguous grad, must send it back to the full
    # path: the result equals the torch backend's either way.
    tb = _triton_or_skip()
    monkeypatch.setattr(tb, "POISON_SCRATCH", True)
    shapes = [(6, 6), (5,), (2, 3, 4)]
    runs = {}
    for backend in ("triton", "torch"):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = CAME(ps, lr=1e-2, weight_decay=0.1, backend=backend)
        calls = []
        if backend == "triton":
            real = tb._prepare
            monkeypatch.setattr(tb, "_prepare", lambda *a: calls.append(1) or real(*a))
        for t in range(4):
            gs = [torch.randn(s, generator=gen) for s in shapes]
            if t == 2 and change == "data":
                ps[0].data = ps[0].data.clone()  # same values, new storage
            if t == 2 and change == "restride":
                ps[0].data = ps[0].data.t().contiguous().t()  # same values, column-major
            if t == 2 and change == "grad_layout":
                gs[0] = gs[0].t().contiguous().t()
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        runs[backend] = ps
        if backend == "triton":
            # Full path: step 0 (first), step 1 (the optimizer's lists become tuples), then only where a
            # change was made (a restrided param keeps going through a contiguous copy).
            assert len(calls) == {"none": 2, "data": 3, "grad_layout": 3, "restride": 4}[change], calls
    for a, b in zip(*runs.values()):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), a.shape


# ------------------------------------------------------------------ the fast path against the full path
# What the fast path assumes (CAME._unchanged): torch checks the shape, device and dtype of every tensor
# assigned to .grad (the dtype unless the param's grad_dtype allows others); a grad changed in place moves
# its address; state entries are compared by identity. Each case below changes one thing after two steps
# of steady state, and the step must do what a step with no remembered lists does (CAME._reset_caches
# before it): the same error, changing nothing, or the same result.
def _mutate(case, ps, opt, gen):
    p = ps[0]
    if case == "new_grads":  # zero_grad(set_to_none=True) and a new backward
        for q in ps:
            q.grad = torch.randn(q.shape, generator=gen)
    elif case == "grad_dtype":  # allowed by the param's grad_dtype; the same address is likely
        p.grad_dtype = None
        p.grad = p.grad.to(torch.bfloat16)
    elif case == "grad_data_shape":  # same numel, another shape, in place: torch does not see it
        p.grad.data = torch.randn(5, 6, generator=gen)
    elif case == "grad_data_flat":
        p.grad.data = torch.randn(30, generator=gen)
    elif case == "grad_data_size":
        p.grad.data = torch.randn(7, 5, generator=gen)
    elif case == "grad_resized":  # in place, within the storage, same address
        p.grad.resize_(3, 5)
    elif case == "grad_sparse":
        p.grad = p.grad.to_sparse()
    elif case == "grad_noncontiguous":
        p.grad = torch.randn(5, 6, generator=gen).t()
    elif case == "grad_removed":
        ps[1].grad = None
    elif case == "state_step_same_value":  # a new 1-element tensor of the same value: identity, not value
        opt.state[p]["step"] = opt.state[p]["step"].clone()
    elif case == "state_dict_replaced":
        opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
    elif case == "state_entry_data":  # a state tensor's storage swapped in place
        opt.state[p]["exp_avg"].data = opt.state[p]["exp_avg"].clone()
    elif case == "param_data":
        p.data = p.data.clone()
    elif case == "lr_tensor":  # a float lr becomes a tensor
        opt.param_groups[0]["lr"] = torch.tensor(2e-2)


_CASES = ["new_grads", "grad_dtype", "grad_data_shape", "grad_data_flat", "grad_data_size", "grad_resized",
          "grad_sparse", "grad_noncontiguous", "grad_removed", "state_step_same_value", "state_dict_replaced",
          "state_entry_data", "param_data", "lr_tensor"]


def _run_case(case, backend, full):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (2, 3, 4)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = CAME(ps, lr=1e-2, weight_decay=0.1, backend=backend)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    opt.step()
    _mutate(case, ps, opt, gen)
    if full:
        opt._reset_caches()
    before = ([p.detach().clone() for p in ps],
              {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps})
    try:
        opt.step()
        err = None
    except Exception as e:  # noqa: BLE001 (compared with the full path's)
        err = (type(e), str(e))
        assert all(torch.equal(p, q) for p, q in zip(ps, before[0])), "a failed step changed a param"
        for p in ps:
            assert all(torch.equal(v, before[1][id(p)][k]) for k, v in opt.state[p].items()), \
                "a failed step changed the state"
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    return err, [p.detach().clone() for p in ps], state


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", _CASES)
def test_fast_path_does_what_the_full_path_does(case, backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setattr(_triton_or_skip(), "POISON_SCRATCH", True)
    fast = _run_case(case, backend, full=False)
    full = _run_case(case, backend, full=True)
    assert fast[0] == full[0], (fast[0], full[0])
    for a, b in zip(fast[1], full[1]):
        assert torch.equal(a, b)
    for a, b in zip(fast[2], full[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
