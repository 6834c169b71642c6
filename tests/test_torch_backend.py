"""The torch backend (the spec) against the float64 oracle and against came-pytorch 0.1.3."""
import math

import pytest
import torch

import came_kernels
from oracle import OracleCAME, assert_close_rel, rel_err

came_pytorch = pytest.importorskip("came_pytorch", reason="came-pytorch is a test dependency: pip install -e .[test]")

# Every shape class of the spec: 0-d, 1-D, 1xN, Nx1, 1x1, ragged 2-D, 3-D and 4-D (conv) batches.
SHAPES = [(), (7,), (1, 33), (33, 1), (1, 1), (129, 257), (37, 53), (3, 5, 7), (4, 3, 3, 3), (2, 1, 5, 1)]


def _grads(shapes, gen, scale=1.0):
    return [torch.randn(s, generator=gen) * scale for s in shapes]


def _run_pair(shapes, steps, dtype=torch.float32, kw=None, grad_fn=None, seed=0):
    """Run came_kernels (torch backend) and came-pytorch side by side on identical grads."""
    kw = dict(lr=1e-2, weight_decay=0.0) | (kw or {})
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone().to(dtype) for p in init]
    theirs = [p.clone().to(dtype) for p in init]
    o1 = came_kernels.CAME(ours, backend="torch", **kw)
    o2 = came_pytorch.CAME(theirs, **kw)
    for t in range(steps):
        gs = grad_fn(t, gen) if grad_fn else _grads(shapes, gen)
        for a, b, g in zip(ours, theirs, gs):
            a.grad = g.to(dtype)
            b.grad = g.to(dtype)
        o1.step()
        o2.step()
    return ours, theirs, o1, o2


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_torch_backend_matches_came_pytorch_fp32_100_steps(weight_decay):
    ours, theirs, o1, o2 = _run_pair(SHAPES, 120, kw=dict(weight_decay=weight_decay))
    for a, b in zip(ours, theirs):
        assert_close_rel(a, b, 1e-6, f"param {tuple(a.shape)}")
    for a, b in zip(ours, theirs):
        s1, s2 = o1.state[a], o2.state[b]
        for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "exp_avg_sq"):
            assert (key in s1) == (key in s2), key
            if key in s1:
                assert s1[key].shape == s2[key].shape and s1[key].dtype == torch.float32
                assert_close_rel(s1[key], s2[key], 1e-5, f"state {key} of {tuple(a.shape)}")


def test_torch_backend_matches_came_pytorch_with_zero_grads_and_spikes():
    def grad_fn(t, gen):
        if t % 7 == 3:
            return [torch.zeros(s) for s in SHAPES]                      # a step with all-zero gradients
        if t % 11 == 5:
            return _grads(SHAPES, gen, scale=1e4)                         # a gradient spike (clipping kicks in)
        if t % 13 == 6:
            return _grads(SHAPES, gen, scale=1e-6)                        # tiny gradients
        return _grads(SHAPES, gen)
    ours, theirs, _, _ = _run_pair(SHAPES, 100, kw=dict(weight_decay=0.05), grad_fn=grad_fn)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all()
        assert_close_rel(a, b, 1e-6, f"param {tuple(a.shape)}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_no_less_accurate_than_came_pytorch(dtype):
    # bf16/fp16 params: came-pytorch rounds them twice per step (after the decay and after the update), we
    # round once, so the two drift apart by ulps of the param dtype. Both are compared with a float64 oracle
    # that starts from the same rounded values and never rounds: ours may not be the less accurate one.
    kw = dict(weight_decay=0.1, lr=1e-2)
    ours, theirs, o1, _ = _run_pair(SHAPES, 30, dtype=dtype, kw=kw)
    _, oracle = _run_vs_oracle(SHAPES, 30, dtype, kw)  # same seed: same init and grads as _run_pair
    for a, b, ref in zip(ours, theirs, oracle.p):
        assert a.dtype == dtype and torch.isfinite(a).all()
        ulp = torch.finfo(dtype).eps
        assert rel_err(a, ref) <= 1.1 * rel_err(b, ref) + 2 * ulp, f"{dtype} param {tuple(a.shape)}"
        assert all(v.dtype == torch.float32 for k, v in o1.state[a].items() if k != "step")


def _run_vs_oracle(shapes, steps, dtype, kw, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone().to(dtype) for p in init]
    opt = came_kernels.CAME(ours, backend="torch", **kw)
    oracle = OracleCAME([p.to(dtype) for p in init], **kw)
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        for p, g in zip(ours, gs):
            p.grad = g
        opt.step()
        oracle.step(gs)
    return ours, oracle


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=3e-2, weight_decay=0.1, maximize=True),
                                dict(lr=1e-2, clip_threshold=0.5, betas=(0.8, 0.99, 0.999), eps=(1e-20, 1e-10))])
def test_torch_backend_matches_float64_oracle(kw):
    ours, oracle = _run_vs_oracle(SHAPES, 50, torch.float32, kw)
    for p, ref in zip(ours, oracle.p):
        assert_close_rel(p, ref, 1e-5, f"param {tuple(p.shape)} vs oracle")


def test_float64_params_stay_float64_and_match_oracle_tightly():
    ours, oracle = _run_vs_oracle(SHAPES, 30, torch.float64, dict(lr=1e-2, weight_decay=0.1))
    for p, ref in zip(ours, oracle.p):
        assert p.dtype == torch.float64
        assert_close_rel(p, ref, 1e-12, f"fp64 param {tuple(p.shape)} vs oracle")


def test_oracle_comparison_can_fail():
    # The oracle comparison is sensitive: a different beta3 must show up as a mismatch.
    ours, _ = _run_vs_oracle(SHAPES[5:6], 20, torch.float32, dict(lr=1e-2))
    _, other = _run_vs_oracle(SHAPES[5:6], 20, torch.float32, dict(lr=1e-2, betas=(0.9, 0.999, 0.99)))
    assert rel_err(ours[0], other.p[0]) > 1e-4


def test_maximize_equals_minimizing_the_negated_gradient():
    a = [torch.randn(6, 9), torch.randn(9)]
    b = [p.clone() for p in a]
    oa = came_kernels.CAME(a, lr=1e-2, backend="torch", maximize=True)
    ob = came_kernels.CAME(b, lr=1e-2, backend="torch")
    for _ in range(5):
        gs = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), -g
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_lr_zero_and_zero_grads_give_no_nan():
    params = [torch.randn(s) for s in SHAPES]
    before = [p.clone() for p in params]
    opt = came_kernels.CAME(params, lr=1e-2, weight_decay=0.1, backend="torch")
    opt.param_groups[0]["lr"] = 0.0  # as a scheduler may set it
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    opt.param_groups[0]["lr"] = 1e-2
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()
    for st in opt.state.values():
        for v in st.values():
            assert torch.isfinite(v).all()


def test_tensor_lr_matches_float_lr():
    a = [torch.randn(5, 4), torch.randn(4)]
    b = [p.clone() for p in a]
    oa = came_kernels.CAME(a, lr=torch.tensor(0.01), weight_decay=0.1, backend="torch")
    ob = came_kernels.CAME(b, lr=0.01, weight_decay=0.1, backend="torch")
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert_close_rel(p, q, 1e-7, "tensor lr")


def test_non_contiguous_params_and_grads():
    base = torch.randn(12, 10)
    p = base.t()  # non-contiguous view
    q = p.contiguous().clone()
    leaf_p = torch.nn.Parameter(p)  # Parameter keeps the strides
    oa = came_kernels.CAME([leaf_p], lr=1e-2, backend="torch")
    ob = came_kernels.CAME([q], lr=1e-2, backend="torch")
    for _ in range(3):
        g = torch.randn(12, 10).t()
        leaf_p.grad, q.grad = g, g.contiguous()
        oa.step()
        ob.step()
    assert torch.equal(leaf_p.detach(), q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_on_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(3)
    cpu = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    gpu = [p.clone().cuda() for p in cpu]
    o1 = came_kernels.CAME(cpu, lr=1e-2, weight_decay=0.1, backend="torch")
    o2 = came_kernels.CAME(gpu, lr=torch.tensor(1e-2), weight_decay=0.1, backend="torch")
    for _ in range(20):
        for a, b in zip(cpu, gpu):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            b.grad = a.grad.cuda()
        o1.step()
        o2.step()
    for a, b in zip(cpu, gpu):
        assert_close_rel(b, a, 1e-5 if dtype == torch.float32 else 1e-2, f"cuda vs cpu {tuple(a.shape)}")
