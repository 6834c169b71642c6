"""came_kernels.CAME as a torch.optim.Optimizer: API, validation, checkpoints (both ways with came-pytorch)."""
import copy
import io

import pytest
import torch

import came_kernels
from came_kernels import CAME, BackendUnavailableError
from oracle import assert_close_rel

came_pytorch = pytest.importorskip("came_pytorch", reason="came-pytorch is a test dependency: pip install -e .[test]")


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.LayerNorm(9), torch.nn.Conv1d(9, 4, 3),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False)).to(dtype)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=g).to(next(model.parameters()).dtype)
    h = model[1](model[0](x))             # (5, 9)
    h = model[2](h.t().unsqueeze(0))      # (1, 4, 3)
    return model[4](h.mean(-1)).pow(2).sum()


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()


# ------------------------------------------------------------------ drop-in use
def test_adamw_style_construction_and_training():
    model = _model()
    opt = CAME(model.parameters(), lr=2e-3, weight_decay=0.01)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999, 0.9999)
    first = _loss(model, 0).item()
    _train(model, opt, 30)
    assert _loss(model, 0).item() < first


def test_adamw_two_betas_get_default_beta3():
    opt = CAME([torch.nn.Parameter(torch.randn(3, 3))], lr=1e-3, betas=(0.9, 0.95))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95, 0.9999)


def test_positional_arguments_follow_came_pytorch():
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = CAME([p], 1e-3, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.5)
    g = opt.param_groups[0]
    assert (g["lr"], g["eps"], g["clip_threshold"], g["betas"], g["weight_decay"]) == \
        (1e-3, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.5)


def test_state_keys_and_shapes_match_came_pytorch():
    shapes = [(3, 4, 5), (7,), (2, 3)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1, o2 = CAME(ours, lr=1e-3), came_pytorch.CAME(theirs, lr=1e-3)
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    o1.step()
    o2.step()
    for a, b in zip(ours, theirs):
        s1, s2 = o1.state[a], o2.state[b]
        assert set(s1) == set(s2) - {"RMS"}
        for k in s1:
            if k != "step":
                assert s1[k].shape == s2[k].shape, k


def test_param_groups_with_their_own_hyperparameters_and_params_without_grad():
    a, b, frozen = (torch.nn.Parameter(torch.randn(4, 5)) for _ in range(3))
    ref_a, ref_b = (torch.nn.Parameter(x.detach().clone()) for x in (a, b))
    opt = CAME([{"params": [a], "lr": 1e-2}, {"params": [b, frozen], "weight_decay": 0.5, "betas": (0.5, 0.9)}],
               lr=1e-3)
    ra = came_pytorch.CAME([ref_a], lr=1e-2)
    rb = came_pytorch.CAME([ref_b], lr=1e-3, weight_decay=0.5, betas=(0.5, 0.9, 0.9999))
    frozen_before = frozen.detach().clone()
    for _ in range(5):
        for x, y in ((a, ref_a), (b, ref_b)):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        opt.step(), ra.step(), rb.step()
    assert_close_rel(a, ref_a, 1e-6, "group 0")
    assert_close_rel(b, ref_b, 1e-6, "group 1")
    assert torch.equal(frozen, frozen_before) and frozen not in opt.state


def test_add_param_group_zero_grad_closure_and_scheduler():
    model = _model()
    extra = torch.nn.Parameter(torch.randn(3, 2))
    opt = CAME(model.parameters(), lr=1e-2)
    opt.add_param_group({"params": [extra], "lr": 5e-3})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, len(calls)) + extra.sum()
        loss.backward()
        return loss

    for _ in range(4):
        loss = opt.step(closure)
        assert torch.is_tensor(loss)
        sched.step()
    assert len(calls) == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-3 * 0.25)
    opt.zero_grad()
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])


def test_step_hooks_run():
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = CAME([p], lr=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    p.grad = torch.randn_like(p)
    opt.step()
    assert seen == ["pre", "post"]


# ------------------------------------------------------------------ validation
def _p():
    return [torch.nn.Parameter(torch.randn(3, 4))]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=None), "lr is required"),
    (dict(lr=torch.ones(2)), "0-d"),
    (dict(lr=1e-3, betas=(0.9,)), "betas"), (dict(lr=1e-3, betas=(0.9, 0.99, 0.999, 0.9)), "betas"),
    (dict(lr=1e-3, betas=(1.0, 0.999, 0.9999)), "beta at index 0"),
    (dict(lr=1e-3, betas=(0.9, -0.1, 0.9999)), "beta at index 1"),
    (dict(lr=1e-3, betas=(0.9, 0.999, 1.5)), "beta at index 2"),
    (dict(lr=1e-3, eps=1e-8), "two epsilons|eps1 to g\\^2"), (dict(lr=1e-3, eps=(1e-30,)), "eps"),
    (dict(lr=1e-3, eps=(1e-30, -1.0)), "eps at index 1"),
    (dict(lr=1e-3, clip_threshold=0.0), "clip_threshold"), (dict(lr=1e-3, clip_threshold=-1), "clip_threshold"),
    (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
    (dict(lr=1e-3, backend="jax"), "unknown backend"),
    (dict(lr=1e-3, fused=True, foreach=True), "fused=True and foreach=True"),
    (dict(lr=1e-3, fused=True, backend="torch"), "fused=True"),
    (dict(lr=1e-3, capturable=True, backend="cuda"), "capturable"),
    (dict(lr=1e-3, differentiable=True), "differentiable"),
])
def test_bad_hyperparameters_are_rejected_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAME(_p(), **kwargs)


def test_bad_param_group_is_rejected_and_not_added():
    opt = CAME(_p(), lr=1e-3)
    with pytest.raises(ValueError, match="beta at index 2"):
        opt.add_param_group({"params": _p(), "betas": (0.9, 0.9, 2.0)})
    assert len(opt.param_groups) == 1


def test_complex_params_are_rejected():
    with pytest.raises(ValueError, match="complex"):
        CAME([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))], lr=1e-3)


def test_unavailable_backend_says_why_and_how():
    why = came_kernels.available_backends("cpu")["cuda"]
    assert why  # this test assumes a CPU machine or CPU tensors
    with pytest.raises(BackendUnavailableError, match="cuda"):
        CAME(_p(), lr=1e-3, backend="cuda")


def test_fused_backend_refuses_fp64():
    with pytest.raises(BackendUnavailableError, match="fp32/bf16/fp16"):
        CAME([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))], lr=1e-3, backend="triton")


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_untouched(opt, params, snap):
    ps, sd = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        for key, v in sd["state"][k].items():
            assert torch.equal(now["state"][k][key], v), key


@pytest.mark.parametrize("bad", ["sparse", "complex", "shape", "lr"])
def test_bad_step_leaves_params_and_state_untouched(bad):
    params = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(6)),
              torch.nn.Parameter(torch.randn(2, 3))]
    opt = CAME(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    snap = _snapshot(opt, params)
    if bad == "sparse":
        params[2].grad = torch.randn(2, 3).to_sparse()
    elif bad == "complex":
        params[2].grad_dtype = None  # torch refuses a complex grad on a real tensor unless told otherwise
        params[2].grad = torch.randn(2, 3, dtype=torch.complex64)
    elif bad == "shape":
        params[2].grad.resize_(3, 2)  # slips past the assignment-time shape check
    else:
        opt.param_groups[0]["lr"] = -1.0
    with pytest.raises((RuntimeError, ValueError), match={"sparse": "sparse", "complex": "complex",
                                                           "shape": "shape", "lr": "lr"}[bad]):
        opt.step()
    _assert_untouched(opt, params, snap)


# ------------------------------------------------------------------ checkpoints
def _two_runs_with_checkpoint(make_a, make_b, dtype=torch.float32, steps=(10, 10)):
    """Train with optimizer A, checkpoint, load into B on a fresh copy, continue; also continue A."""
    model_a = _model(dtype=dtype)
    opt_a = make_a(model_a.parameters())
    _train(model_a, opt_a, steps[0])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_b = _model(seed=99, dtype=dtype)
    model_b.load_state_dict(ckpt["model"])
    opt_b = make_b(model_b.parameters())
    opt_b.load_state_dict(ckpt["opt"])
    _train(model_a, opt_a, steps[1], start=steps[0])
    _train(model_b, opt_b, steps[1], start=steps[0])
    return model_a, opt_a, model_b, opt_b


def test_resume_is_bitwise_identical_to_uninterrupted_run():
    mk = lambda ps: CAME(ps, lr=1e-2, weight_decay=0.1)
    model_a, _, model_b, _ = _two_runs_with_checkpoint(mk, mk)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_came_pytorch_checkpoint_loads_and_training_continues_identically():
    # came-pytorch trains, we continue; came-pytorch continuing itself is the reference.
    mk_ref = lambda ps: came_pytorch.CAME(ps, lr=1e-2, weight_decay=0.1)
    mk_ours = lambda ps: CAME(ps, lr=1e-2, weight_decay=0.1)
    model_a, _, model_b, opt_b = _two_runs_with_checkpoint(mk_ref, mk_ours)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert_close_rel(b, a, 1e-6, "continued from a came-pytorch checkpoint")
    for st in opt_b.state.values():
        assert "RMS" not in st and torch.is_tensor(st["step"]) and st["step"].item() == 20


def test_our_checkpoint_loads_into_came_pytorch():
    mk_ours = lambda ps: CAME(ps, lr=1e-2, weight_decay=0.1)
    mk_ref = lambda ps: came_pytorch.CAME(ps, lr=1e-2, weight_decay=0.1)
    model_a, _, model_b, _ = _two_runs_with_checkpoint(mk_ours, mk_ref)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert_close_rel(b, a, 1e-6, "came-pytorch continued from our checkpoint")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_checkpoint_keeps_fp32_statistics(dtype):
    mk = lambda ps: CAME(ps, lr=1e-2)
    model_a, opt_a, model_b, opt_b = _two_runs_with_checkpoint(mk, mk, dtype=dtype)
    for st in opt_b.state.values():
        for k, v in st.items():
            if k != "step":
                assert v.dtype == torch.float32, k
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)  # the fp32 statistics survived the round trip exactly


def test_fused_false_means_the_torch_backend_and_auto_picks_triton_for_cuda_dtensors(monkeypatch):
    # resolve_backend alone (no GPU needed): what "auto" picks as if a fused backend could run.
    from came_kernels import functional
    f32, f64, cuda = torch.float32, torch.float64, torch.device("cuda")
    monkeypatch.setattr(functional, "default_backend", lambda *a, **k: "cuda")
    monkeypatch.setattr(functional, "unavailable_reason", lambda name, device: None)
    assert functional.resolve_backend("auto", cuda, f32, f32, fused=None) == "cuda"
    assert functional.resolve_backend("auto", cuda, f32, f32, fused=False) == "torch"
    assert functional.resolve_backend("auto", cuda, f32, f32, dtensor=True) == "triton"
    assert functional.resolve_backend("auto", cuda, f32, f32, fused=False, dtensor=True) == "torch"
    assert functional.resolve_backend("auto", cuda, f64, f64, dtensor=True) == "torch"
    assert functional.resolve_backend("torch", cuda, f32, f32, dtensor=True) == "torch"
    with pytest.raises(BackendUnavailableError, match="backend='cuda' does not take DTensor"):
        functional.resolve_backend("cuda", cuda, f32, f32, dtensor=True)
    with pytest.raises(BackendUnavailableError, match="torch.float64"):
        functional.resolve_backend("triton", cuda, f64, f64, dtensor=True)


def test_fused_true_on_cpu_says_why_for_each_fused_backend():
    with pytest.raises(BackendUnavailableError) as e:
        CAME([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, fused=True)
    msg = str(e.value)
    assert "triton: None" not in msg and "cuda: the CUDA extension runs on CUDA tensors only" in msg
    assert "triton:" in msg and "torch backend" in msg


def test_empty_params_keep_finite_statistics_in_every_backend_on_the_cpu():
    ps = [torch.nn.Parameter(torch.empty(0, 5)), torch.nn.Parameter(torch.empty(0)),
          torch.nn.Parameter(torch.randn(3, 4))]
    opt = CAME(ps, lr=1e-2, backend="torch")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for st in opt.state.values():
        for k, v in st.items():
            assert torch.isfinite(v).all(), k
