"""What only backend="cuda" (the extension came_kernels._C) has: its per-phase ops, its availability messages.

Its parity, determinism, resume and no-sync tests are shared with the Triton backend in
test_fused_backends.py. GPU tests are skipped, with the reason, when there is no GPU or the extension was
not built; the availability tests at the bottom run everywhere. Without a GPU the CUDA sources are proven by
.ci/check_cuda.sh (nvcc compile of every file) and tests/test_cuda_math_host.py (the per-element math on
the CPU).
"""
import pytest
import torch

from came_kernels.backends import cuda_backend
from came_testing import HYPER, SHAPES_GPU as SHAPES, backend_step, new_state as _state

_REASON = cuda_backend.unavailable_reason(torch.device("cuda"))
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"backend='cuda' unavailable: {_REASON}")



@needs_cuda
def test_cuda_matches_torch_backend_per_phase_op():
    # The per-phase ops run in sequence equal the one-call came_step op bit for bit.
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    gs = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    ps2 = [p.clone() for p in ps]
    st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    backend_step(cuda_backend, ps, gs, st)
    lists = [ps2, gs, [s["m"] for s in st2]] + [[s.get(k) for s in st2] for k in ("r", "c", "R", "C", "v")]
    nstats = sum(2 * (p.numel() // (p.shape[-1] * p.shape[-2])) + 1 if p.ndim >= 2 else 1 for p in ps2)
    stats = torch.full((nstats,), float("nan"), device="cuda")  # poisoned: every slot used must be written
    lr = torch.full((1,), HYPER["lr"], device="cuda")
    args = (lr, 0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0, 0.0, False)
    for op in ("sq_stats", "clip_stats", "momentum_res", "param_step"):
        getattr(torch.ops.came_kernels, op)(*lists, stats, *args)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b), tuple(a.shape)


# ---- availability: runs everywhere
def test_unavailable_reason_on_cpu_says_cuda_tensors_only_not_how_to_build():
    # Building the extension would not help CPU tensors: the reason says what would.
    why = cuda_backend.unavailable_reason(torch.device("cpu"))
    assert isinstance(why, str) and "CUDA tensors only" in why
    assert "pip install" not in why


def test_unavailable_reason_names_the_build_command_when_not_built():
    if cuda_backend._load() is not None:
        pytest.skip("came_kernels._C is built here")
    why = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "pip install -e . --no-build-isolation" in why and "CAME_KERNELS_BUILD_CUDA=1" in why
    assert type(cuda_backend._import_error).__name__ in why


@needs_cuda
def test_extension_ops_have_fake_kernels_for_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p, g, m = (torch.empty(4, 3, device="cuda") for _ in range(3))
        r, c = torch.empty(4, device="cuda"), torch.empty(3, device="cuda")
        lr = torch.empty(1, device="cuda")
        torch.ops.came_kernels.came_step([p], [g], [m], [r], [c], [r.clone()], [c.clone()], [None], lr,
                                         0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0, 0.0, False)
