"""came_kernels._host (csrc/host/fast_checks.cpp): the fast path's per-step checks in C++ read what the
Python getters read, see every change the Python path sees, and hand anything unusual back to Python."""
import array

import pytest
import torch

from came_kernels import _fastpath

_host = pytest.importorskip("came_kernels._host", reason="came_kernels._host is not built "
                                                          "(pip install --no-build-isolation -e .)")


def _words(b):
    return list(array.array("q", b))


def _params():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (), (1, 7), (7, 1), (1, 1), (2, 3, 4), (0, 3), (2, 1, 3, 2)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ps.append(torch.randn(3, 3, generator=g))  # a plain tensor may be a param too
    for i, p in enumerate(ps):
        if i != 1:  # one param without a grad
            p.grad = torch.randn(p.shape, generator=g)
    ps[3].grad = torch.randn(7, 1, generator=g).t()  # a (1, 7) view: contiguous by torch's rules
    return ps


def test_addresses_and_strides_are_the_python_getters():
    ts = _params() + [torch.randn(4, 6)[:, 1:], torch.randn(3, 4).t(), torch.zeros(2, dtype=torch.bfloat16)]
    assert _words(_host.ptrs(ts)) == [t.data_ptr() for t in ts]
    assert _words(_host.ptrs(tuple(ts))) == [t.data_ptr() for t in ts]
    assert _words(_host.strides(ts)) == [w for t in ts for w in (t.dim(),) + t.stride()]
    assert _host.ptrs([]) == b"" and _host.strides(()) == b""


def test_grads_are_the_params_own_grad_objects_with_their_addresses():
    ps = _params()
    grads, kinds, ptrs, contiguous = _host.grads(ps)
    assert len(grads) == len(ps) - 1
    assert all(g is p.grad for g, p in zip(grads, [p for p in ps if p.grad is not None]))
    assert _words(ptrs) == [g.data_ptr() for g in grads]
    assert contiguous is True
    words = _words(kinds)
    assert words.count(-1) == 1  # the param without a grad
    assert _host.grads([torch.nn.Parameter(torch.zeros(2))]) == ([], array.array("q", [-1]).tobytes(), b"", True)


@pytest.mark.parametrize("change", ["dtype", "shape_in_place", "removed", "added", "flattened", "bigger"])
def test_every_change_of_kind_shows_in_kinds(change):
    ps = _params()
    before = _host.grads(ps)[1]
    p = ps[0]
    if change == "dtype":
        p.grad_dtype = None
        p.grad = p.grad.to(torch.bfloat16)
    elif change == "shape_in_place":  # same address, torch's setter never sees it
        p.grad.resize_(3, 5)
    elif change == "removed":
        p.grad = None
    elif change == "added":
        ps[1].grad = torch.zeros(5)
    elif change == "flattened":
        p.grad.data = torch.randn(30)
    elif change == "bigger":
        p.grad.data = torch.randn(7, 5)
    assert _host.grads(ps)[1] != before


def test_new_grads_of_the_same_kind_keep_the_kinds_and_move_the_addresses():
    ps = _params()
    _, kinds, ptrs, _ = _host.grads(ps)
    for p in ps:
        if p.grad is not None:
            p.grad = torch.zeros_like(p.grad).clone()
    _, kinds2, ptrs2, _ = _host.grads(ps)
    assert kinds2 == kinds and ptrs2 != ptrs


def test_contiguity_is_reported_apart_from_kinds():
    ps = _params()
    kinds = _host.grads(ps)[1]
    ps[0].grad = torch.randn(5, 6).t()
    out = _host.grads(ps)
    assert out[3] is False and out[1] == kinds


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("case", ["sparse_grad", "subclass_grad", "subclass_param", "not_a_tensor"])
def test_anything_unusual_is_handed_back_to_python(case):
    ps = _params()
    if case == "sparse_grad":
        ps[0].grad = ps[0].grad.to_sparse()
    elif case == "subclass_grad":
        ps[0].grad = ps[0].grad.as_subclass(_Sub)
    elif case == "subclass_param":
        ps[-1] = ps[-1].as_subclass(_Sub)
    elif case == "not_a_tensor":
        ps[2] = 3.0
    assert _host.grads(ps) is None
    if case in ("subclass_param", "not_a_tensor"):
        assert _host.ptrs(ps) is None and _host.strides(ps) is None
        if case == "subclass_param":  # _fastpath's fallback: the Python getters
            assert _fastpath.ptrs(ps) == tuple(t.data_ptr() for t in ps)
    assert _host.ptrs([torch.zeros(3).to_sparse()]) is None


def test_a_non_sequence_is_a_type_error():
    for f in (_host.grads, _host.ptrs, _host.strides):
        with pytest.raises(TypeError, match="list or tuple"):
            f(3)


def test_it_knows_the_torch_it_was_built_against_and_is_used_only_with_it():
    assert _host.torch_version == torch.__version__.split("+")[0]
    assert _fastpath.native()


def test_built_against_another_torch_it_is_left_alone_with_a_warning(monkeypatch):
    import importlib
    import sys
    import types
    fake = types.ModuleType("came_kernels._host")
    fake.torch_version = "0.0.1"
    monkeypatch.setitem(sys.modules, "came_kernels._host", fake)
    monkeypatch.setattr(sys.modules["came_kernels"], "_host", fake, raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="built against torch 0.0.1"):
            importlib.reload(_fastpath)
        assert not _fastpath.native() and _fastpath.grads([]) is None
        t = torch.zeros(2)
        assert _fastpath.ptrs([t]) == (t.data_ptr(),)  # the Python getters' tuple, not C++ bytes
    finally:
        monkeypatch.undo()
        importlib.reload(_fastpath)
    assert _fastpath.native()


def _state():
    ps = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    state = {p: {"step": torch.zeros(()), "exp_avg": torch.zeros(p.shape), "lr_seen": 0.5} for p in ps}
    return ps, state, list(state), [dict(s) for s in state.values()]


@pytest.mark.parametrize("change", ["none", "tensor_clone", "float_equal", "float_other", "key_added", "key_removed",
                                    "param_removed", "param_added", "reordered", "not_a_dict"])
def test_same_state_compares_as_the_python_snapshot_does(change):
    ps, state, keys, values = _state()
    p = ps[0]
    if change == "tensor_clone":  # equal values, another object: a tensor is never compared by value
        state[p]["exp_avg"] = state[p]["exp_avg"].clone()
    elif change == "float_equal":
        state[p]["lr_seen"] = float("0.5")
    elif change == "float_other":
        state[p]["lr_seen"] = 0.25
    elif change == "key_added":
        state[p]["extra"] = torch.zeros(1)
    elif change == "key_removed":
        del state[p]["step"]
    elif change == "param_removed":
        del state[ps[1]]
    elif change == "param_added":
        state[torch.nn.Parameter(torch.zeros(1))] = {}
    elif change == "reordered":
        state = {ps[1]: state[ps[1]], p: state[p]}
    elif change == "not_a_dict":
        state[p] = list(state[p].items())
    assert _host.same_state(state, keys, values) is (change in ("none", "float_equal"))


def test_same_state_takes_a_dict_and_two_lists():
    _, state, keys, values = _state()
    with pytest.raises(TypeError):
        _host.same_state(list(state), keys, values)
    with pytest.raises(TypeError):
        _host.same_state(state, tuple(keys), values)
    from collections import defaultdict  # the optimizer's state is a defaultdict
    assert _host.same_state(defaultdict(dict, state), keys, values) is True
