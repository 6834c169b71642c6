"""backend="cuda" (the extension came_kernels._C) against the torch backend, came-pytorch and a float64 oracle.

GPU tests are skipped, with the reason, when there is no GPU or the extension was not built; the
availability tests at the bottom run everywhere. Without a GPU the CUDA sources are proven by
.ci/check_cuda.sh (nvcc compile of every file) and tests/test_cuda_math_host.py (the per-element math on
the CPU).
"""
import copy

import pytest
import torch

import came_kernels
from came_kernels.backends import cuda_backend, torch_backend
from oracle import OracleCAME, assert_close_rel, rel_err

_REASON = cuda_backend.unavailable_reason(torch.device("cuda"))
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"backend='cuda' unavailable: {_REASON}")

# Every shape class: 0-d, 1-D, 1xN, Nx1, 1x1, ragged 2-D (N not a multiple of any vector width), 3-D, 4-D,
# several stripes per matrix (M > 64), a flat tensor of several chunks, and vector-friendly widths.
SHAPES = [(), (7,), (1, 33), (33, 1), (1, 1), (37, 53), (129, 257), (3, 5, 7), (4, 3, 3, 3), (2, 1, 5, 1),
          (200, 64), (40000,), (3, 70, 1024)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0)
# |cuda - torch backend| / max|torch backend| after many steps: fp32 differs by summation order only;
# bf16/fp16 params by a rounding flip now and then (a few ulps of the param dtype).
PARAM_TOL = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0 ** -7, torch.float16: 4 * 2.0 ** -10}
STATE_TOL = 2e-4


def _state(p):
    st = {"m": torch.zeros(p.shape, device=p.device)}
    if p.ndim >= 2:
        for k in ("r", "R"):
            st[k] = torch.zeros(p.shape[:-1], device=p.device)
        for k in ("c", "C"):
            st[k] = torch.zeros(p.shape[:-2] + p.shape[-1:], device=p.device)
    else:
        st["v"] = torch.zeros(p.shape, device=p.device)
    return st


def _step(backend, ps, gs, sts, **kw):
    backend.came_step(ps, gs, [s["m"] for s in sts], [s.get("r") for s in sts], [s.get("c") for s in sts],
                      [s.get("R") for s in sts], [s.get("C") for s in sts], [s.get("v") for s in sts],
                      cache={}, **(HYPER | kw))


def _grads(shapes, gen, dtype, step):
    scale = 1e4 if step % 11 == 5 else (0.0 if step % 13 == 6 else 1.0)  # clipping spikes and zero grads
    return [(torch.randn(s, generator=gen) * scale).to("cuda", dtype) for s in shapes]


def _run_both(shapes, dtype, steps, **kw):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    for t in range(steps):
        gs = _grads(shapes, gen, dtype, t)
        _step(cuda_backend, ours, gs, ours_st, **kw)
        _step(torch_backend, spec, gs, spec_st, **kw)
    return ours, spec, ours_st, spec_st


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, True)])
def test_cuda_matches_torch_backend_every_shape_60_steps(dtype, weight_decay, maximize):
    ours, spec, ours_st, spec_st = _run_both(SHAPES, dtype, 60, weight_decay=weight_decay, maximize=maximize)
    for a, b, sa, sb in zip(ours, spec, ours_st, spec_st):
        assert a.dtype == dtype
        assert_close_rel(a, b, PARAM_TOL[dtype], f"{dtype} param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], STATE_TOL, f"{dtype} state {k} of {tuple(a.shape)}")


@needs_cuda
def test_cuda_matches_torch_backend_per_phase_op():
    # The per-phase ops run in sequence equal the one-call came_step op bit for bit.
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    gs = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    ps2 = [p.clone() for p in ps]
    st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    _step(cuda_backend, ps, gs, st)
    lists = [ps2, gs, [s["m"] for s in st2]] + [[s.get(k) for s in st2] for k in ("r", "c", "R", "C", "v")]
    nstats = sum(2 * (p.numel() // (p.shape[-1] * p.shape[-2])) + 1 if p.ndim >= 2 else 1 for p in ps2)
    stats = torch.full((nstats,), float("nan"), device="cuda")  # poisoned: every slot used must be written
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    args = (lr, 0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0, 0.0, False)
    for op in ("sq_stats", "clip_stats", "momentum_res", "param_step"):
        getattr(torch.ops.came_kernels, op)(*lists, stats, *args)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b), tuple(a.shape)


@needs_cuda
def test_cuda_matches_came_pytorch_fp32():
    came_pytorch = pytest.importorskip("came_pytorch", reason="came-pytorch is a test dependency")
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    ours = [x.clone().requires_grad_() for x in init]
    theirs = [x.clone().requires_grad_() for x in init]
    o1 = came_kernels.CAME(ours, lr=1e-2, weight_decay=0.05, backend="cuda")
    o2 = came_pytorch.CAME(theirs, lr=1e-2, weight_decay=0.05)
    for t in range(50):
        for a, b, g in zip(ours, theirs, _grads(SHAPES, gen, torch.float32, t)):
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, theirs):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_error_vs_float64_oracle_at_most_twice_torch_backends(dtype):
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen).to("cuda", dtype) for s in SHAPES]
    oracle = OracleCAME([x.cpu() for x in init], lr=1e-2, weight_decay=0.1)
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    ours_st, spec_st = [_state(x) for x in init], [_state(x) for x in init]
    for t in range(30):
        gs = _grads(SHAPES, gen, dtype, t)
        _step(cuda_backend, ours, gs, ours_st, weight_decay=0.1)
        _step(torch_backend, spec, gs, spec_st, weight_decay=0.1)
        oracle.step([g.cpu() for g in gs])
    ulp = torch.finfo(dtype).eps
    for a, b, ref in zip(ours, spec, oracle.p):
        assert rel_err(a, ref) <= 2 * rel_err(b, ref) + 2 * ulp, f"{dtype} param {tuple(a.shape)}"


@needs_cuda
def test_two_runs_are_bitwise_identical():
    runs = [_run_both(SHAPES, torch.float32, 10)[0] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b), tuple(a.shape)


@needs_cuda
def test_more_tensors_than_one_launch_holds():
    # 36 tensors fit one kernel-argument table; 100 take three launch-chunks per phase.
    shapes = [(5 + i % 7, 3 + i % 11) if i % 3 else (9 + i,) for i in range(100)]
    ours, spec, _, _ = _run_both(shapes, torch.float32, 5)
    for a, b in zip(ours, spec):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)}")


@needs_cuda
def test_non_contiguous_param_is_updated_in_place():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(48, 40, generator=gen).cuda()
    p = base.t()  # non-contiguous view: the glue runs on a copy and writes it back into `base`
    spec = p.contiguous().clone()
    g = torch.randn(40, 48, generator=gen).cuda()
    st, st2 = _state(p.contiguous()), _state(spec)
    _step(cuda_backend, [p], [g], [st])
    _step(torch_backend, [spec], [g], [st2])
    assert_close_rel(base.t(), spec, 1e-6, "non-contiguous param")


@needs_cuda
def test_nan_gradient_shows_in_the_param():
    ps = [torch.zeros(8, 8, device="cuda"), torch.zeros(8, device="cuda")]
    gs = [torch.ones(8, 8, device="cuda"), torch.ones(8, device="cuda")]
    gs[0][3, 3] = float("nan")
    gs[1][2] = float("nan")
    _step(cuda_backend, ps, gs, [_state(p) for p in ps])
    assert torch.isnan(ps[0]).any() and torch.isnan(ps[1]).any()


@needs_cuda
def test_step_makes_no_host_sync_with_tensor_lr():
    ps = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    gs = [torch.randn_like(p) for p in ps]
    sts = [_state(p) for p in ps]
    lr = torch.tensor(1e-2, device="cuda")
    _step(cuda_backend, ps, gs, sts, lr=lr)  # warm-up (library load, allocator)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(cuda_backend, ps, gs, sts, lr=lr)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_resume_from_state_dict_matches_uninterrupted_run():
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    grads = [_grads(SHAPES, gen, torch.float32, t) for t in range(20)]

    def run(params, opt, ts):
        for t in ts:
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            opt.step()

    a = [x.clone().requires_grad_() for x in init]
    oa = came_kernels.CAME(a, lr=1e-2, weight_decay=0.01, backend="cuda")
    run(a, oa, range(20))
    b = [x.clone().requires_grad_() for x in init]
    ob = came_kernels.CAME(b, lr=1e-2, weight_decay=0.01, backend="cuda")
    run(b, ob, range(10))
    saved = copy.deepcopy(ob.state_dict())
    c = [x.detach().clone().requires_grad_() for x in b]
    oc = came_kernels.CAME(c, lr=1e-2, weight_decay=0.01, backend="cuda")
    oc.load_state_dict(saved)
    run(c, oc, range(10, 20))
    for x, y in zip(a, c):
        assert torch.equal(x, y), tuple(x.shape)


# ---- availability: runs everywhere
def test_unavailable_reason_on_cpu_is_a_sentence_not_an_error():
    why = cuda_backend.unavailable_reason(torch.device("cpu"))
    assert isinstance(why, str) and why
    if cuda_backend._load() is None:  # not built here: the original error and how to build it
        assert "pip install -e . --no-build-isolation" in why and "came_kernels._C" in why


def test_unavailable_reason_names_the_build_command_when_not_built():
    if cuda_backend._load() is not None:
        pytest.skip("came_kernels._C is built here")
    why = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "pip install -e . --no-build-isolation" in why and "CAME_KERNELS_BUILD_CUDA=1" in why
    assert type(cuda_backend._import_error).__name__ in why
