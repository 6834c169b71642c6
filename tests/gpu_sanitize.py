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


# (param dtype, bias_correction, GradScaler scale, momentum_dtype): the plain step, one that also reads the
# optional device tensors (GradScaler's flags, the bias scales), whose addresses the kernels use too, and the
# low-precision momenta (bf16 ones in the default bodies, int8 ones in the _lp bodies).
CONFIGS = [(torch.float32, False, None, "fp32"), (torch.bfloat16, False, None, "fp32"),
           (torch.float32, True, 2.0 ** 10, "fp32"), (torch.float32, False, None, "bf16"),
           (torch.bfloat16, False, None, "bf16"), (torch.float32, False, None, "int8")]


def main(backend: str) -> int:
    worst = 0.0
    for dtype, bias_correction, scale, md in CONFIGS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        init = [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in SHAPES]
        ours = [torch.nn.Parameter(x.clone()) for x in init]
        spec = [torch.nn.Parameter(x.clone()) for x in init]
        kw = dict(lr=1e-2, weight_decay=0.1, bias_correction=bias_correction, momentum_dtype=md)
        o = came_kernels.CAME(ours, backend=backend, **kw)
        s = came_kernels.CAME(spec, backend="torch", **kw)
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
        for a, b, b0 in zip(ours, spec, init):
            assert torch.isfinite(a).all(), (backend, dtype, bias_correction, tuple(a.shape))
            scale = b.float().abs().max().clamp_min(1e-30)
            err = ((a.float() - b.float()).abs().max() / scale).item()
            if md == "fp32":
                worst = max(worst, err if dtype == torch.float32 else 0.0)
                tol = 1e-5 if dtype == torch.float32 else 4 * 2.0 ** -7
            else:
                # A low-precision momentum rounded the other way now and then (sums in another order) moves
                # an element's update by one step q of its format: the bound of tests/test_low_precision.py,
                # a few q of how far the spec's params moved (an H200 gave 1.5e-3 of max|p| for int8).
                q = 2.0 ** -8 if md == "bf16" else 1.0 / 127
                eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
                moved = (b.float() - b0.float()).abs().max()
                tol = ((2 * eps * scale + 4 * q * moved) / scale).item()
            assert err <= tol, (backend, dtype, bias_correction, md, tuple(a.shape), err, tol)
    print(f"gpu_sanitize {backend}: ok, worst fp32 relative difference to the torch backend {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
