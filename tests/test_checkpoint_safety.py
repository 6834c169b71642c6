"""Nothing a user can load or pass may corrupt memory or half-apply: malformed state dicts, bad tensor lrs,
duplicate params, and run-time options that a checkpoint must not override.

Every bad state dict must raise at load, naming the param and what was expected, with the optimizer
unchanged. The fused-backend case runs in a subprocess: before these checks, a wrong-sized state tensor
made the Triton kernels write out of bounds and the process died (segfault), which would take the test
run down with it.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from came_kernels import CAME


def _setup(backend="torch"):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5)),
          torch.nn.Parameter(torch.randn(2, 3, 4))]
    opt = CAME(ps, lr=1e-2, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    return ps, opt


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def _assert_unchanged(ps, opt, snap):
    params, sd = snap
    for p, q in zip(ps, params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    for k, st in sd["state"].items():
        for key, v in st.items():
            assert torch.equal(now["state"][k][key], v), key


def _mutations():
    """(name, function that breaks a state dict in place, text the error must contain)."""
    def set_state(pid, key, value):
        def f(sd):
            sd["state"][pid][key] = value
        return f

    def drop_state(pid, key):
        def f(sd):
            del sd["state"][pid][key]
        return f

    def drop_group_key(key):
        def f(sd):
            del sd["param_groups"][0][key]
        return f

    def group_value(key, value):
        def f(sd):
            sd["param_groups"][0][key] = value
        return f

    def adamw_state(sd):
        for pid, st in sd["state"].items():
            m = st["exp_avg"]
            sd["state"][pid] = {"step": st["step"], "exp_avg": m, "exp_avg_sq": torch.zeros_like(m)}

    return [
        ("momentum too small", set_state(0, "exp_avg", torch.zeros(4)), "'exp_avg' has shape (4,)"),
        ("row statistic wrong", set_state(0, "exp_avg_sq_row", torch.zeros(5)), "'exp_avg_sq_row' has shape"),
        ("col statistic wrong", set_state(2, "exp_avg_res_col", torch.zeros(2, 3)), "'exp_avg_res_col'"),
        ("flat v wrong", set_state(1, "exp_avg_sq", torch.zeros(6)), "'exp_avg_sq' has shape (6,)"),
        ("missing key", drop_state(0, "exp_avg_res_col"), "expected ['exp_avg', 'exp_avg_res_col'"),
        ("missing step", drop_state(1, "step"), "lacks 'step'"),
        ("integer momentum", set_state(1, "exp_avg", torch.zeros(5, dtype=torch.int64)), "dense floating"),
        ("not a tensor", set_state(1, "exp_avg", [0.0] * 5), "expected a tensor"),
        ("AdamW state", adamw_state, "another optimizer's state"),
        ("missing eps", drop_group_key("eps"), "lacks ['eps']"),
        ("bad betas", group_value("betas", (0.9, 1.5, 0.9)), "invalid beta at index 1"),
        ("negative lr", group_value("lr", -1.0), "invalid lr"),
        ("too few params", group_value("params", [0, 1]), "has 2 params in the state dict, 3 here"),
    ]


@pytest.mark.parametrize("name,mutate,match", _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_state_dict_raises_at_load_and_changes_nothing(name, mutate, match):
    ps, opt = _setup()
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    snap = _snapshot(ps, opt)
    with pytest.raises(ValueError, match=None) as ei:
        opt.load_state_dict(sd)
    assert match in str(ei.value), str(ei.value)
    assert "nothing was loaded" in str(ei.value)
    _assert_unchanged(ps, opt, snap)
    opt.step()  # still usable


def test_wrong_number_of_groups_is_refused():
    ps, opt = _setup()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    with pytest.raises(ValueError, match="2 param groups, this optimizer 1"):
        opt.load_state_dict(sd)


def test_a_state_dict_with_lr_zero_from_a_scheduler_loads():
    ps, opt = _setup()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.0
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.0


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from came_kernels import CAME
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = CAME([p], lr=1e-2, backend="triton")
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(4)
    try:
        opt.load_state_dict(sd)
    except ValueError as e:
        print("REFUSED:", e)
    opt.step()
    print("STEP OK", bool(torch.isfinite(p).all()))
""")


_LIVE_STATE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from came_kernels import CAME
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = CAME([p], lr=1e-2, backend="triton")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.state[p]["KEY"] = torch.zeros(SIZE)  # the live state itself, behind the optimizer's back
    try:
        opt.step()
    except ValueError as e:
        print("REFUSED:", e)
""")


def _run(script):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode} (a crash, not an error): {out.stderr[-2000:]}"
    return out.stdout


def test_wrong_sized_state_from_a_state_dict_never_reaches_the_triton_kernels():
    stdout = _run(_CRASH_SCRIPT)
    assert "REFUSED:" in stdout and "'exp_avg' has shape (4,)" in stdout
    assert "STEP OK True" in stdout


@pytest.mark.parametrize("key,size", [("exp_avg", 4), ("exp_avg_sq_row", 8), ("exp_avg_res_col", 65)])
def test_fused_backend_refuses_a_wrong_sized_live_state(key, size):
    stdout = _run(_LIVE_STATE_SCRIPT.replace("KEY", key).replace("SIZE", str(size)))
    assert "REFUSED:" in stdout, stdout


# ------------------------------------------------------------------ run-time options are not training state
def test_backend_and_fused_are_kept_from_the_constructor():
    ps, opt = _setup()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0].update(backend="cuda", fused=True, foreach=None)  # saved on a GPU machine
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["backend"] == "torch" and opt.param_groups[0]["fused"] is None
    opt.step()  # would raise on a CPU if "cuda" had been taken from the file


def test_came_pytorch_checkpoint_keeps_the_requested_backend():
    came_pytorch = pytest.importorskip("came_pytorch")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    ref = came_pytorch.CAME([w], lr=1e-2)
    w.grad = torch.randn_like(w)
    ref.step()
    opt = CAME([w], lr=1e-2, backend="torch")
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["backend"] == "torch"


# ------------------------------------------------------------------ lr and params
@pytest.mark.parametrize("lr,match", [(torch.tensor(-1e-3), "invalid lr"), (torch.tensor(float("nan")), "invalid lr"),
                                      (torch.tensor(float("inf")), "invalid lr"),
                                      (torch.tensor([1e-3, 2e-3]), "0-d floating tensor"),
                                      (torch.tensor(1), "0-d floating tensor")])
def test_bad_tensor_lr_is_rejected_at_construction_and_in_add_param_group(lr, match):
    w, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=match):
        CAME([w], lr=lr)
    opt = CAME([w], lr=1e-3)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [b], "lr": lr})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_one_element_tensor_lr_is_taken_as_0d(shape):
    w = torch.nn.Parameter(torch.randn(3, 2))
    lr = torch.full(shape, 1e-2)
    opt = CAME([w], lr=lr)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt.step()
    assert opt.param_groups[0]["lr"].ndim == 0
    ref_w = torch.nn.Parameter(before.clone())
    ref = CAME([ref_w], lr=1e-2)
    ref_w.grad = w.grad.clone()
    ref.step()
    assert torch.equal(w, ref_w)
    lr.fill_(0.5)  # a view: the user's tensor still drives the lr
    assert float(opt.param_groups[0]["lr"]) == 0.5


def test_lr_given_only_in_every_param_group():
    w, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    opt = CAME([{"params": [w], "lr": 1e-2}, {"params": [b], "lr": 1e-3}])
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    with pytest.raises(ValueError, match="param group 1.*lr is required"):
        CAME([{"params": [w], "lr": 1e-2}, {"params": [b]}])
    with pytest.raises(ValueError, match="lr is required"):
        CAME([w])


def test_duplicate_params_are_rejected():
    w = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="same parameter appears more than once"):
        CAME([w, w], lr=1e-2)
    b = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        CAME([{"params": [w]}, {"params": [w, b]}], lr=1e-2)
