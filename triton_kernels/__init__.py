"""Triton kernels of came_kernels (installed as `came_kernels.triton_kernels`).

One file per phase family, with the same stems and kernel names as csrc/ (the CUDA mirror):

    multi_tensor.py   the device-side tensor table and block tables every phase reads, built once per
                      parameter set; shared @triton.jit plumbing (addresses, stripe geometry, finalize)
    came_math.py      per-element math on registers (@triton.jit helpers), in the torch backend's order
    sq_stats.py       phase 1: g^2 row sums + column partials, EMA of r (and v), the clip's sums of
                      (g*rsqrt(r))^2; finalize: c, mean_M(r), P / c
    clip_stats.py     phase 2 (rows wider than NPAD_MAX, shards only): per-block sums of u^2; finalize:
                      per-tensor clip divisor
    momentum_res.py   phase 3: u_hat, momentum, residual row sums + column partials, EMA of R; finalize: C, mean_M(R)
    param_step.py     phase 4: update and decoupled weight decay

`came_kernels.backends.triton_backend.came_step` runs them in order: 6 launches per (device, dtype) group
(up to 8: see its docstring).
"""
from .clip_stats import clip_stats
from .momentum_res import momentum_res
from .multi_tensor import Plan, build_plan
from .param_step import param_step
from .sq_stats import sq_stats

__all__ = ["Plan", "build_plan", "sq_stats", "clip_stats", "momentum_res", "param_step"]
