"""torch.compile of CAME.step: it must train (a compiled step that silently does nothing is the worst
failure an optimizer can have), equal the eager step, and not recompile when a scheduler changes a tensor lr.

The torch backend is traced and fused by the compiler; the fused backends run as one opaque custom op
(came_kernels/ops.py) whose schema declares what it mutates. On a CPU the Triton backend is compiled through
the interpreter, which checks the op plumbing; on a GPU the same tests run the compiled kernels.
"""
import pytest
import torch

import came_kernels
from came_kernels.backends import cuda_backend, torch_backend, triton_backend
from came_testing import fused_backend_params

SHAPES = [(5, 7), (3, 4, 6), (9,), (1, 6)]
_GPU = torch.cuda.is_available()


def _params(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def _grads(step, device="cpu"):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen).to(device) for s in SHAPES]


def _train(compile_backend, steps=3, backend="torch", lr=None, schedule=None, device="cpu"):
    """`steps` steps with fixed grads; compile_backend None means eager. Returns (params, optimizer)."""
    torch._dynamo.reset()
    ps = _params(device)
    lr = torch.tensor(1e-2) if lr is None else lr
    opt = came_kernels.CAME(ps, lr=lr, weight_decay=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    # With a scheduler, opt.step is torch's step-counting wrapper, which dynamo does not trace (as for
    # torch.optim.AdamW): the wrapper runs eagerly and CAME.step inside it is compiled as its own frame.
    step = opt.step if compile_backend is None else torch.compile(opt.step, backend=compile_backend,
                                                                    fullgraph=sched is None)
    for t in range(steps):
        for p, g in zip(ps, _grads(t, device)):
            p.grad = g
        step()
        if sched is not None:
            sched.step()
    return ps, opt


def _assert_trained_and_equal(ours, ref, opt, steps, tol):
    for p, q, s in zip(ours, _params(), SHAPES):
        assert not torch.equal(p.detach().cpu(), q.detach()), f"{s}: the compiled step did not change the param"
    for st in opt.state.values():
        assert float(st["step"]) == steps
    for a, b, s in zip(ours, ref, SHAPES):
        err = (a.detach() - b.detach()).abs().max().item() / b.detach().abs().max().item()
        assert err <= tol, f"{s}: compiled vs eager relative difference {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
def test_compiled_step_trains_and_equals_eager(compile_backend):
    ref, _ = _train(None)
    ours, opt = _train(compile_backend)
    _assert_trained_and_equal(ours, ref, opt, 3, 1e-6)


def test_compiled_step_is_one_graph_without_breaks():
    ps = _params()
    opt = came_kernels.CAME(ps, lr=torch.tensor(1e-2), backend="torch")
    for p, g in zip(ps, _grads(0)):
        p.grad = g
    torch._dynamo.reset()
    ex = torch._dynamo.explain(opt.step)()
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    assert ex.op_count > 10  # the update itself is in the graph, not just the step counters


def test_tensor_lr_changed_by_a_scheduler_never_recompiles():
    from torch._dynamo.utils import counters
    schedule = lambda t: 1.0 / (1 + t)  # noqa: E731  (a new lr every step)
    ref, _ = _train(None, steps=5, schedule=schedule)
    counters.clear()
    ours, opt = _train("aot_eager", steps=5, schedule=schedule)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the scheduler wrote into the tensor
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    _assert_trained_and_equal(ours, ref, opt, 5, 1e-6)


def test_float_lr_changes_recompile_but_stay_correct():
    # As with torch.optim's own optimizers, a float lr is a constant of the graph: each new value compiles
    # again (until dynamo's cache limit, after which the step runs eagerly). A tensor lr avoids that.
    from torch._dynamo.utils import counters
    schedule = lambda t: 1.0 / (1 + t)  # noqa: E731
    ref, _ = _train(None, steps=3, lr=1e-2, schedule=schedule)
    counters.clear()
    ours, opt = _train("aot_eager", steps=3, lr=1e-2, schedule=schedule)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    _assert_trained_and_equal(ours, ref, opt, 3, 1e-6)


@pytest.mark.parametrize("backend", fused_backend_params())
def test_fused_backend_compiles_as_one_custom_op(backend, monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    device = "cuda" if _GPU else "cpu"
    ref, _ = _train(None, backend=backend, device=device)
    ours, opt = _train("aot_eager", backend=backend, device=device)
    _assert_trained_and_equal([p.cpu() for p in ours], [p.cpu() for p in ref], opt, 3, 1e-6)

    for p, g in zip(ours, _grads(3, device)):
        p.grad = g
    torch._dynamo.reset()
    ex = torch._dynamo.explain(opt.step)()
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    code = "\n".join(g.code for g in ex.graphs)
    assert "came_kernels.fused_step" in code, code


def test_fused_step_op_has_a_fake_kernel():
    # Tracing with fake tensors (what the compiler does) must not run the kernels.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from came_kernels.ops import fused_step
    with FakeTensorMode():
        p, g, m = torch.empty(4, 3), torch.empty(4, 3), torch.empty(4, 3)
        r, c = torch.empty(4), torch.empty(3)
        fused_step([p], [g], [m], [r], [c], [r.clone()], [c.clone()], [], None, 1e-2, 0.9, 0.999, 0.9999,
                   1e-30, 1e-16, 1.0, 0.0, False, "triton")


class _ExtensionOnTheCPU:
    """The CUDA extension's plan ops, run by the torch backend on CPU tensors: the cuda backend's Python glue
    under torch.compile, on any machine (the kernels themselves are tested against the torch backend on a GPU)."""

    def __init__(self):
        self.plans, self.calls, self.made = {}, [], 0

    def _run(self, lists, grads, lr, hyper):
        b1, b2, b3, e1, e2, clip, wd, maximize = hyper[:8]
        torch_backend.came_step(lists[0], list(grads), *lists[2:8], lr=lr.reshape(()), beta1=b1, beta2=b2,
                                beta3=b3, eps1=e1, eps2=e2, clip_threshold=clip, weight_decay=wd, maximize=maximize)

    def came_plan_create(self, *lists):
        self.calls.append("create")
        self.made += 1
        self.plans[self.made] = [list(x) for x in lists]
        return self.made

    def came_plan_step(self, handle, grads, lr, *hyper):
        self.calls.append("plan_step")
        self._run(self.plans[handle], grads, lr, hyper)
        return 0

    def came_plan_free(self, handle):
        self.plans.pop(handle, None)

    def came_step(self, *args):
        self.calls.append("step")
        self._run([list(x) for x in args[:8]], args[1], args[8], args[9:])


@pytest.fixture
def extension_on_the_cpu(monkeypatch):
    from came_kernels import backends
    ext = _ExtensionOnTheCPU()
    monkeypatch.setattr(cuda_backend, "_ops", lambda: ext)
    monkeypatch.setattr(cuda_backend, "_load", lambda: True)
    monkeypatch.setitem(backends._REASONS, ("cuda", "cpu"), None)
    return ext


def test_cuda_backend_compiles_although_dynamo_sets_capturable(extension_on_the_cpu):
    # torch.compile's optimizer support sets group["capturable"] = True while tracing (and in the groups
    # themselves, for CUDA params without state): the step must keep the user's capturable=False, which
    # backend='cuda' needs, compiled and in eager steps afterwards.
    ref, _ = _train(None, backend="cuda")
    ours, opt = _train("aot_eager", backend="cuda")
    _assert_trained_and_equal(ours, ref, opt, 3, 1e-6)
    assert "plan_step" in extension_on_the_cpu.calls
    for g in opt.param_groups:
        g["capturable"] = True  # what dynamo leaves behind for CUDA params
    for p, g in zip(ours, _grads(3)):
        p.grad = g
    opt.step()  # eager: not refused
    assert opt._capturable == [False]


def test_compiled_fused_steps_keep_a_bounded_number_of_backend_caches(extension_on_the_cpu):
    # Without Inductor's reinplacing, the graph hands the op fresh copies of params and states at every
    # step; the op's caches (each keeping its tensors alive) must not pile up one per step.
    from came_kernels import ops
    ops._caches.clear()
    _train("aot_eager", steps=6, backend="cuda")
    assert sum(len(entries) if isinstance(entries, dict) else 1 for entries in ops._caches.values()) <= 2


def test_inductor_reuses_the_extensions_plan(extension_on_the_cpu):
    # Inductor reinplaces the op's mutated inputs: the op sees the very params and states every step, so the
    # CUDA backend makes its plan (checks and table upload) once, as in eager mode.
    _train("inductor", steps=4, backend="cuda")
    assert extension_on_the_cpu.calls == ["create"] + ["plan_step"] * 4
