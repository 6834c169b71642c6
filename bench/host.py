"""How much host (Python) time does one optimizer step cost? (`python -m bench host`)

A fused optimizer step is a handful of kernel launches; the Python around them (validation, building the
tensor lists, grouping, table lookups) runs on the CPU before the GPU can start, and for a small model it
can take longer than the GPU work. This measures it with the device work stubbed out, so the number is the
same on any machine class and needs no GPU:

- came[torch]: the torch backend's `came_step` is replaced by a no-op (it is all device work);
- came[triton]: every Triton kernel launch is a no-op, so the backend's own host code (tables, workspace,
  grad-address checks) still runs. On a CPU the backend runs through TRITON_INTERPRET=1, which is set here
  before Triton is imported; with its launches stubbed the interpreter never runs;
- adamw[fused]: torch.optim.AdamW(fused=True) with `torch._fused_adamw_` replaced by a no-op;
- the step counters' `torch._foreach_add_` is stubbed as well on a CPU, where it is 200 tiny CPU ops
  (~0.5 ms) rather than the single launch it is on a GPU. State is created by a first, unstubbed step.

Reported: microseconds per step() (min / median / max over --iters steps after --warmup), per shape set,
with the same grad tensors every step, and with new grad tensors every step (what backward produces after
zero_grad(set_to_none=True), torch's default). The fast path's per-step checks run in C++ where the
extension came_kernels._host is built; then the came rows are also measured with the checks in Python
(", py checks"), the fallback of an install without it.

`--device cuda`: nothing is stubbed. Kernel launches are asynchronous, so the time step() takes to return is
its host time as long as the launch queue has room: the GPU is synchronized before each timed step, and the
row adds came[cuda] (the extension, when it is built). Shapes are scaled down (--scale) so that the GPU work
of one step stays short.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, List

from . import shapes as shapes_mod
from . import utils


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", default="gpt2,tinyllama", help="shape sets (default: %(default)s)")
    p.add_argument("--iters", type=int, default=200, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (default: %(default)s)")
    p.add_argument("--out", default=utils.DEFAULT_OUT, help="output directory (default: bench/out)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: device work stubbed; cuda: real launches, host time only (default: %(default)s)")
    p.add_argument("--scale", type=float, default=64.0, help="shape divisor for --device cuda (default: 64)")


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def _no_triton_launches():
    """Every `kernel[grid](...)` of came_kernels.triton_kernels becomes a no-op."""
    import importlib
    import pkgutil
    import came_kernels.triton_kernels as tk
    classes = set()
    for info in pkgutil.iter_modules(tk.__path__):
        mod = importlib.import_module(f"{tk.__name__}.{info.name}")
        for v in vars(mod).values():
            if hasattr(type(v), "__getitem__") and hasattr(v, "fn") and hasattr(v, "run"):
                classes.add(type(v))
    with contextlib.ExitStack() as stack:
        for cls in classes:
            stack.enter_context(_patched(cls, "__getitem__", lambda self, grid: _noop))
        yield


def _time(step: Callable[[], None], warmup: int, iters: int, before: Callable[[], None] = _noop) -> List[float]:
    """Microseconds per step(); `before` runs untimed before each (e.g. new grads, a GPU sync)."""
    for _ in range(warmup):
        before()
        step()
    out = []
    for _ in range(iters):
        before()
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _new_grads(params, then: Callable[[], None] = _noop) -> Callable[[], None]:
    """Gives every param a grad tensor other than last step's, as backward after zero_grad(set_to_none=True)
    does (two sets, alternated: new objects, and addresses that move); then runs `then`."""
    import torch
    sets = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    state = {"i": 0}

    def before():
        state["i"] ^= 1
        for p, g in zip(params, sets[state["i"]]):
            p.grad = g
        then()
    return before


def _measure(kind: str, params, gpu: bool, args) -> dict:
    """Host time of one optimizer's step() on `params`: kind "adamw" (fused AdamW) or a CAME backend."""
    import torch
    import came_kernels
    from came_kernels import backends
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    else:
        opt = came_kernels.CAME(params, lr=1e-3, weight_decay=0.01, backend=kind)
    if gpu:  # nothing stubbed: a sync before each timed step leaves the launch queue empty
        for p in params:
            p.grad = torch.zeros_like(p)
        t = _time(opt.step, args.warmup, args.iters, torch.cuda.synchronize)
        t_new = _time(opt.step, args.warmup, args.iters, _new_grads(params, torch.cuda.synchronize))
    else:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(torch, "_foreach_add_", _noop))
            if kind == "adamw":
                opt.step()
                stack.enter_context(_patched(torch, "_fused_adamw_", _noop))
            elif kind == "torch":
                backends.get_step_fn("torch", "cpu")
                stack.enter_context(_patched(backends, "_STEP_FNS", dict(backends._STEP_FNS, torch=_noop)))
                opt.step()
            else:
                stack.enter_context(_no_triton_launches())
                opt.step()
            t = _time(opt.step, args.warmup, args.iters)
            t_new = _time(opt.step, args.warmup, args.iters, _new_grads(params))
    return dict(us_min=min(t), us_median=statistics.median(t), us_max=max(t), steps=len(t), new_min=min(t_new),
                new_median=statistics.median(t_new))


def run(args: argparse.Namespace) -> dict:
    gpu = getattr(args, "device", "cpu") == "cuda"
    if "triton" not in sys.modules and not gpu:  # must precede Triton's import (CPU tensors only here)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from came_kernels import _fastpath

    device = torch.device("cuda" if gpu else "cpu")
    env = utils.environment(device)
    what = "real launches, host time only" if gpu else "device work stubbed"
    checks = "C++ (came_kernels._host)" if _fastpath.native() else "Python (came_kernels._host is not built)"
    print(f"# host time of step(), {what}; per-step checks in {checks} (commit {env['commit']}, "
          f"torch {env['torch']})")
    rows = []
    for set_name in args.sets.split(","):
        # Sizes do not matter on the CPU, only the tensor count; on a GPU they set how long the work takes.
        shapes = shapes_mod.shape_set(set_name, getattr(args, "scale", 64.0) if gpu else 64.0)
        cases = [("adamw[fused]", "adamw", False), ("came[torch]", "torch", False),
                 ("came[triton]", "triton", False)]
        if gpu:
            cases.append(("came[cuda]", "cuda", False))
        if _fastpath.native():  # the same steps with the checks in Python, as without came_kernels._host
            cases += [(name + ", py checks", kind, True) for name, kind, _ in cases if kind != "adamw"]
        for name, kind, py_checks in cases:
            params = utils.make_params(shapes, device, torch.float32)
            row = {"set": set_name, "optimizer": name, "tensors": len(params)}
            try:
                with _patched(_fastpath, "_native", None) if py_checks else contextlib.nullcontext():
                    row.update(_measure(kind, params, gpu, args))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{set_name} {name}: FAILED {row['error']}")
            rows.append(row)
    cols = [("set", "shapes", ""), ("tensors", "tensors", "d"), ("optimizer", "optimizer", ""),
            ("us_min", "us min", ".0f"), ("us_median", "us median", ".0f"), ("us_max", "us max", ".0f"),
            ("steps", "steps", "d"), ("new_min", "new grads: us min", ".0f"),
            ("new_median", "us median", ".0f")]
    print(utils.markdown_table(rows, cols))
    print(f"- {env['date']}, {env['device']}, commit {env['commit']}: `{env['command']}`")
    payload = {"benchmark": "host", "env": env, "checks": "cpp" if _fastpath.native() else "python", "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    utils.write_json(os.path.join(args.out, "host_cuda.json" if gpu else "host.json"), payload)
    return payload


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main() and 0)
