"""A few CAME steps of one fused backend on every shape class, small enough to run under compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu_sanitize.py cuda
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/gpu_sanitize.py cuda

bench/gpu_check.sh runs it for both fused backends. It also checks the result against the torch backend,
so a run that the sanitizer passes but that computes garbage still fails. Needs a GPU.
"""
import sys

import torch

import came_kernels

from came_testing import SHAPES_GPU  # every shape class, tall matrices included

# ... and small matrices packed several blocks' worth (4x4 tiles of 3x3, 1x1 elementwise): see csrc/plan.h
SHAPES = SHAPES_GPU + [(300, 3, 3), (5000, 1, 1), (70, 2, 8, 8)]


# (param dtype, bias_correction, GradScaler scale): the plain step, and one that also reads the optional
# device tensors (GradScaler's flags, the bias scales), whose addresses the kernels use too.
CONFIGS = [(torch.float32, False, None), (torch.bfloat16, False, None), (torch.float32, True, 2.0 ** 10)]


def main(backend: str) -> int:
    worst = 0.0
    for dtype, bias_correction, scale in CONFIGS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        init = [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in SHAPES]
        ours = [torch.nn.Parameter(x.clone()) for x in init]
        spec = [torch.nn.Parameter(x.clone()) for x in init]
        o = came_kernels.CAME(ours, lr=1e-2, weight_decay=0.1, backend=backend, bias_correction=bias_correction)
        s = came_kernels.CAME(spec, lr=1e-2, weight_decay=0.1, backend="torch", bias_correction=bias_correction)
        if scale is not None:  # what GradScaler.step sets: the grads below are scaled
            for opt in (o, s):
                opt.grad_scale = torch.tensor(scale, device="cuda")
                opt.found_inf = torch.tensor(0.0, device="cuda")
        for _ in range(3):
            for a, b in zip(ours, spec):
                g = (torch.randn(a.shape, generator=gen, device="cuda") * (scale or 1.0)).to(dtype)
                a.grad, b.grad = g.clone(), g.clone()
            o.step()
            s.step()
        torch.cuda.synchronize()
        for a, b in zip(ours, spec):
            assert torch.isfinite(a).all(), (backend, dtype, bias_correction, tuple(a.shape))
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            worst = max(worst, err if dtype == torch.float32 else 0.0)
            tol = 1e-5 if dtype == torch.float32 else 4 * 2.0 ** -7
            assert err <= tol, (backend, dtype, bias_correction, tuple(a.shape), err)
    print(f"gpu_sanitize {backend}: ok, worst fp32 relative difference to the torch backend {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
