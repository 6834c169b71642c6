"""capturable=True: CAME.step() inside a CUDA graph.

A captured step must do only device work: no table build, no copy from host memory, no host read. On a
CPU the rules of the capture path are checked by pretending the stream is capturing (the `_capturing`
hooks): the Triton backend must then find its tables ready, point them at the step's grads with a kernel
(whose arguments a graph replays) rather than an upload, and refuse what a graph could not replay. On a GPU
the real thing is tested: capture, replay, compare with eager steps.
"""
import pytest
import torch

import came_kernels
from came_kernels import optimizer as optimizer_mod
from came_kernels.backends import triton_backend
from came_kernels.triton_kernels import multi_tensor
from oracle import assert_close_rel

_GPU = torch.cuda.is_available()
_TRITON_WHY = triton_backend.unavailable_reason(torch.device("cuda" if _GPU else "cpu"))
needs_triton = pytest.mark.skipif(_TRITON_WHY is not None, reason=str(_TRITON_WHY))
SHAPES = [(5, 7), (3, 4, 6), (9,), (1, 6), ()]
# Where backend='triton' runs: compiled on a GPU, under the interpreter (conftest.py) on a CPU. The pretended
# captures below run on either.
DEVICE = "cuda" if _GPU else "cpu"


def _params(shapes=SHAPES, device=DEVICE):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]


def _grads(shapes, t, device=DEVICE):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen).to(device) for s in shapes]


def _eager_reference(shapes, steps, backend, **kw):
    ps = _params(shapes)
    opt = came_kernels.CAME(ps, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    for t in range(steps):
        for p, g in zip(ps, _grads(shapes, t)):
            p.grad = g
        opt.step()
    return ps


@pytest.fixture
def pretend_capture(monkeypatch):
    """Switch the pretended capture on and off; on means both hooks say the stream is capturing."""
    state = {"on": False}
    monkeypatch.setattr(optimizer_mod, "_capturing", lambda: state["on"])
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: state["on"])

    def set_on(on):
        state["on"] = on
    return set_on


@pytest.fixture
def no_host_copies(monkeypatch):
    """Make any table build or upload fail while switched on."""
    state = {"on": False}
    real_build, real_upload = triton_backend._tk.build_plan, multi_tensor.Plan._upload

    def build(*a, **k):
        assert not state["on"], "a table was built during capture"
        return real_build(*a, **k)

    def upload(self, *a, **k):
        assert not state["on"], "a table column was uploaded from host memory during capture"
        return real_upload(self, *a, **k)
    monkeypatch.setattr(triton_backend._tk, "build_plan", build)
    monkeypatch.setattr(multi_tensor.Plan, "_upload", upload)

    def set_on(on):
        state["on"] = on
    return set_on


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_capturable_trains_like_the_default(backend):
    a = _eager_reference(SHAPES, 4, backend)
    b = _eager_reference(SHAPES, 4, backend, capturable=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_capturable_refuses_the_cuda_extension_by_name():
    with pytest.raises(ValueError, match="capturable=True cannot use backend='cuda'"):
        came_kernels.CAME(_params(), lr=1e-2, backend="cuda", capturable=True)


def test_capture_without_capturable_is_refused(pretend_capture):
    ps = _params()
    opt = came_kernels.CAME(ps, lr=1e-2, backend="torch")
    for p, g in zip(ps, _grads(SHAPES, 0)):
        p.grad = g
    before = [p.detach().clone() for p in ps]
    pretend_capture(True)
    with pytest.raises(RuntimeError, match="pass capturable=True"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before)) and not opt.state


@needs_triton
def test_capture_needs_an_eager_step_first(pretend_capture):
    ps = _params()
    opt = came_kernels.CAME(ps, lr=1e-2, backend="triton", capturable=True)
    for p, g in zip(ps, _grads(SHAPES, 0)):
        p.grad = g
    pretend_capture(True)
    with pytest.raises(RuntimeError, match="run one step eagerly before capturing"):
        opt.step()


@needs_triton
@pytest.mark.parametrize("n_tensors", [5, 20])  # 20: more grads than one table-writing launch takes
def test_captured_steps_build_and_upload_nothing_and_follow_moving_grads(pretend_capture, no_host_copies,
                                                                        n_tensors):
    shapes = (SHAPES * 4)[:n_tensors]
    ref = _eager_reference(shapes, 5, "triton")
    ps = _params(shapes)
    opt = came_kernels.CAME(ps, lr=1e-2, weight_decay=0.1, backend="triton", capturable=True)
    for t in range(5):
        capture = t in (1, 2, 4)  # eager, captured (new grads), captured (new grads), eager, captured
        for p, g in zip(ps, _grads(shapes, t)):
            p.grad = g  # fresh tensors every step: the table's grad column must follow
        pretend_capture(capture)
        no_host_copies(capture)
        opt.step()
        pretend_capture(False)
        no_host_copies(False)
    for a, b in zip(ps, ref):
        assert_close_rel(a, b, 0.0, f"param {tuple(a.shape)}")  # the same kernels on the same data: bitwise
    cache = next(v for v in opt._caches[0].values() if isinstance(v, dict) and "plan" in v)
    assert len(cache["captured"]) == 3  # every captured step keeps its tables and tensors alive


@needs_triton
def test_capture_after_params_moved_is_refused(pretend_capture):
    ps = _params()
    opt = came_kernels.CAME(ps, lr=1e-2, backend="triton", capturable=True)
    for p, g in zip(ps, _grads(SHAPES, 0)):
        p.grad = g
    opt.step()
    for st in opt.state.values():
        st["exp_avg"] = st["exp_avg"].clone()  # a new address (same shape)
    pretend_capture(True)
    with pytest.raises(RuntimeError, match="moved since the last eager step"):
        opt.step()


@needs_triton
def test_non_contiguous_tensors_cannot_be_captured(pretend_capture):
    p = torch.randn(6, 4, device=DEVICE).t().contiguous().t().requires_grad_()  # a transposed view
    opt = came_kernels.CAME([p], lr=1e-2, backend="triton", capturable=True)
    p.grad = torch.randn(6, 4, device=DEVICE)
    opt.step()
    pretend_capture(True)
    with pytest.raises(RuntimeError, match="non-contiguous"):
        opt.step()


@needs_triton
def test_replacing_the_state_after_a_capture_warns_and_keeps_the_old_tensors_alive(pretend_capture):
    ps = _params()
    opt = came_kernels.CAME(ps, lr=1e-2, backend="triton", capturable=True)
    for p, g in zip(ps, _grads(SHAPES, 0)):
        p.grad = g
    opt.step()
    pretend_capture(True)
    opt.step()
    pretend_capture(False)
    old = [st["exp_avg"] for st in opt.state.values()]
    with pytest.warns(RuntimeWarning, match="capture the step again"):
        opt.load_state_dict(opt.state_dict())
    kept = [x for c in opt._graph_keepalive for v in c.values() if isinstance(v, dict)
            for _, tensors in v.get("captured", ()) for x in tensors]
    assert all(any(x is m for x in kept) for m in old)


# ------------------------------------------------------------------ on a GPU: real graphs
@pytest.mark.skipif(not _GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("amp", [False, True])
def test_graph_replays_equal_eager_steps(backend, amp):
    if amp and backend == "torch":
        pytest.skip("GradScaler under capture needs a fused backend")
    shapes = [(64, 48), (3, 20, 33), (70,), (1, 9), ()]

    def make():
        ps = _params(shapes, "cuda")
        lr = torch.tensor(1e-2, device="cuda")
        opt = came_kernels.CAME(ps, lr=lr, weight_decay=0.1, backend=backend, capturable=True,
                                bias_correction=True)
        static = [torch.zeros(s, device="cuda") for s in shapes]
        for p, g in zip(ps, static):
            p.grad = g  # the graph reads these grads: refilled before every replay
        return ps, opt, static, lr

    amp_kw = {}
    if amp:
        scale = torch.full((), 1024.0, device="cuda")
        found = torch.zeros((), device="cuda")
        amp_kw = dict(grad_scale=scale, found_inf=found)

    def step(opt):
        for k, v in amp_kw.items():
            setattr(opt, k, v)
        opt.step()

    ps_e, opt_e, grads_e, lr_e = make()
    ps_g, opt_g, grads_g, lr_g = make()
    for g, x in zip(grads_g, _grads(shapes, 0, "cuda")):
        g.copy_(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(opt_g)  # the eager warm-up: tables built here
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(opt_g)
    for g, x in zip(grads_e, _grads(shapes, 0, "cuda")):
        g.copy_(x)
    step(opt_e)
    for t in range(1, 6):
        new_lr = 1e-2 / (1 + t)
        for lr in (lr_e, lr_g):
            lr.fill_(new_lr)  # what a scheduler does to a tensor lr
        for g, x in zip(grads_g, _grads(shapes, t, "cuda")):
            g.copy_(x)
        graph.replay()
        for g, x in zip(grads_e, _grads(shapes, t, "cuda")):
            g.copy_(x)
        step(opt_e)
    torch.cuda.synchronize()
    for a, b in zip(ps_g, ps_e):
        assert_close_rel(a, b, 1e-6, f"{backend} param {tuple(a.shape)} after replays")
    for sa, sb in zip(opt_g.state.values(), opt_e.state.values()):
        assert float(sa["step"]) == float(sb["step"]) == 6


@pytest.mark.skipif(not _GPU, reason="CUDA graphs need a GPU")
@needs_triton
def test_whole_training_step_captured_with_grads_allocated_in_the_graph():
    # torch's whole-network capture recipe: grads set to None before capture, so backward allocates them
    # from the graph's pool (new addresses): the captured optimizer step must point its tables at them.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda()
    ref.load_state_dict(model.state_dict())
    opt = came_kernels.CAME(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), backend="triton",
                            capturable=True)
    opt_ref = came_kernels.CAME(ref.parameters(), lr=1e-2, backend="triton")
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for _ in range(2):  # the reference: the warm-up's steps (capturing records the step, it does not run it)
        opt_ref.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt_ref.step()
    for _ in range(4):
        graph.replay()
        opt_ref.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt_ref.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)}")


@pytest.mark.skipif(not _GPU, reason="needs a GPU")
def test_capturable_needs_the_lr_tensor_on_the_params_device():
    ps = _params(device="cuda")
    with pytest.raises(ValueError, match="capturable=True needs a tensor lr on the params' device"):
        came_kernels.CAME(ps, lr=torch.tensor(1e-2), capturable=True)
