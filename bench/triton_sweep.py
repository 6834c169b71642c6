"""Tune and check the Triton kernels on a GPU in one short run (`python -m bench.triton_sweep`, CUDA only).

1. Checks: one step on GPT-2 124M shapes (fp32, bf16) against the torch backend, twice (bitwise equal), once
   with the workspace cap forced low so that stripes span several row tiles (TILED kernels), and once with
   the clip's statistic from phase 2 (multi_tensor.CLIP_IN_PHASE1 off).
2. Sweep: per-phase time (each phase's launcher with its finalize; CUDA events, median of --reps launches
   after one warm-up) of every phase on the
   full-size shape sets, for each setting of the pipeline depth (multi_tensor.STAGES), of the 2-byte read
   tile (multi_tensor.BLOCK_N_2B), of momentum_res's column slab (multi_tensor.SLAB_N), of the finalize's
   tile (column "fin tile": multi_tensor.FIN_STRIPES x FIN_COLS, in the sq_stats and momentum_res columns) and of
   CLIP_IN_PHASE1 (column "clip": 1 = phase 1 sums the clip's statistic, phase 2 runs only for rows wider
   than NPAD_MAX), with the achieved bandwidth as % of the device copy bandwidth.
Launches repeat on the same state, which drifts a little: timing only, the checks above prove the results.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from came_kernels.backends import torch_backend, triton_backend
from came_kernels import triton_kernels as tk
from came_kernels.triton_kernels import multi_tensor as mt

from . import shapes as shapes_mod

H = dict(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
         weight_decay=0.01, maximize=False)


def _state(p):
    st = {"m": torch.zeros(p.shape, device=p.device)}
    if p.ndim >= 2:
        st.update(r=torch.zeros(p.shape[:-1], device=p.device), R=torch.zeros(p.shape[:-1], device=p.device),
                  c=torch.zeros(p.shape[:-2] + p.shape[-1:], device=p.device),
                  C=torch.zeros(p.shape[:-2] + p.shape[-1:], device=p.device))
    else:
        st["v"] = torch.zeros(p.shape, device=p.device)
    return st


def _lists(sts):
    return ([s["m"] for s in sts], [s.get("r") for s in sts], [s.get("c") for s in sts], [s.get("R") for s in sts],
            [s.get("C") for s in sts], [s.get("v") for s in sts])


def _make(shapes, dtype, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    ps = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    gs = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    return ps, gs, [_state(p) for p in ps]


def _steps(mod, shapes, dtype, n=2):
    ps, gs, sts = _make(shapes, dtype)
    cache = {}
    for _ in range(n):
        mod.came_step(ps, gs, *_lists(sts), cache=cache, **H)
    return ps, sts


def check(shapes, dtype) -> str:
    ref, ref_st = _steps(torch_backend, shapes, dtype)
    out = []
    for label, cap, fused in (("", mt.WS_CAP_FLOATS, True), (" tiled", 1 << 16, True),
                              (" clip-in-phase2", mt.WS_CAP_FLOATS, False)):
        old = mt.WS_CAP_FLOATS, mt.CLIP_IN_PHASE1
        mt.WS_CAP_FLOATS, mt.CLIP_IN_PHASE1 = cap, fused
        try:
            a, a_st = _steps(triton_backend, shapes, dtype)
            b, _ = _steps(triton_backend, shapes, dtype)
            tiles = mt.choose_tiles([(1, s[0], s[1]) for s in shapes if len(s) == 2], 2 if fused else 1)
        finally:
            mt.WS_CAP_FLOATS, mt.CLIP_IN_PHASE1 = old
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        err = max(float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(a, ref))
        err_c = max(float((x["c"] - y["c"]).abs().max() / y["c"].abs().max()) for x, y in zip(a_st, ref_st) if "c" in x)
        out.append(f"{label.strip() or 'default'} (tiles {tiles}): bitwise repeatable {same}, "
                   f"max rel err p {err:.2e}, c {err_c:.2e}")
    return "; ".join(out)


def _time(fn, reps):
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    fn()
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) * 1e3  # us


def sweep_one(shapes, dtype, reps, copy_gbs, fused=True, device="cuda", timer=None):
    """Per-phase time of the package's own launchers (each phase with its finalize) on one shape set: what a
    step runs, so this cannot drift from the kernels' signatures. `device`/`timer`: the tests run it on a CPU
    under the Triton interpreter with a timer that only calls."""
    timer = _time if timer is None else timer
    ps, gs, sts = _make(shapes, dtype, device=device)
    plan = tk.build_plan(ps, gs, *_lists(sts), fused=fused)
    ws = torch.zeros(plan.ws_floats, device=device)
    wsd = torch.zeros(plan.w_doubles, dtype=torch.float64, device=device)
    stats = torch.ones(plan.stats_floats, device=device)
    lr = torch.tensor([1e-3], device=device)
    tk.sq_stats(plan, ws, stats, beta2=0.999, eps1=1e-30, wsd=wsd)
    tk.clip_stats(plan, ws, stats, clip_threshold=1.0, wsd=wsd)
    ge = ps[0].element_size()
    n = sum(p.numel() for p in ps)
    n_clip = sum(p.numel() for p in ps if p.ndim < 2 or not plan.fused or mt.npad_size(p.shape[-1]) == 0)
    rows = {
        "sq_stats": (lambda: tk.sq_stats(plan, ws, stats, beta2=0.999, eps1=1e-30, wsd=wsd), n * ge),
        "clip_stats": (lambda: tk.clip_stats(plan, ws, stats, clip_threshold=1.0, wsd=wsd), n_clip * ge),
        "momentum_res": (lambda: tk.momentum_res(plan, ws, stats, beta1=0.9, beta3=0.9999, eps2=1e-16,
                                                 maximize=False), n * (ge + 8)),
        "param_step": (lambda: tk.param_step(plan, stats, lr, weight_decay=0.0), n * (2 * ge + 4)),
    }
    out = {}
    for name, (fn, nbytes) in rows.items():
        us = timer(fn, reps)
        out[name] = f"{us:7.0f}" + (f" ({100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs:3.0f}%)" if nbytes else "      ")
    return out, plan


def copy_bandwidth() -> float:
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = _time(lambda: y.copy_(x), 20)
    return 2 * x.numel() / (us * 1e-6) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="gpt2,tinyllama")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--stages", default="1,2,3", help="pipeline depths to try (all phases at once)")
    ap.add_argument("--block-n-2b", default="64,32", help="2-byte read tiles to try (at the first depth)")
    ap.add_argument("--slab-n", default="128,64", help="momentum_res column slabs to try (at the first depth)")
    ap.add_argument("--fin", default="64x32,128x32,64x64,32x128",
                    help="finalize tiles STRIPESxCOLS to try (at the first depth; the first is the default)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA only")
        return 1
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print("device", torch.cuda.get_device_name(0))
    if not args.no_check:
        for dt in args.dtype.split(","):
            print(f"check gpt2 {dt}: {check(shapes_mod.SETS['gpt2'](1.0), dtypes[dt])}", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s")
    stages = [int(x) for x in args.stages.split(",")]
    bn2 = [int(x) for x in args.block_n_2b.split(",")]
    slabs = [int(x) for x in args.slab_n.split(",")]
    fins = [tuple(int(v) for v in x.split("x")) for x in args.fin.split(",")]
    # (stages, BLOCK_N_2B, clip in phase 1, slab, finalize tile): each setting alone against the first of each
    base = (stages[0], bn2[0], 1, slabs[0], fins[0])
    configs = [(s, *base[1:]) for s in stages] + [(base[0], b, *base[2:]) for b in bn2[1:]] + \
        [(*base[:2], 0, *base[3:])] + [(*base[:3], n, base[4]) for n in slabs[1:]] + [(*base[:4], f) for f in fins[1:]]
    header = None
    for name in args.sets.split(","):
        for dt in args.dtype.split(","):
            for s, b, fused, slab, fin in configs:
                if dt == "fp32" and b != bn2[0]:
                    continue  # BLOCK_N_2B is for 2-byte dtypes only
                mt.STAGES.update(dict.fromkeys(mt.STAGES, s))
                mt.BLOCK_N_2B = b
                mt.SLAB_N = slab
                mt.FIN_STRIPES, mt.FIN_COLS = fin  # (a plan keeps the FIN_COLS it is built with)
                res, plan = sweep_one(shapes_mod.SETS[name](1.0), dtypes[dt], args.reps, bw, bool(fused))
                names = ["sq_stats", "clip_stats", "momentum_res", "param_step"]
                if header is None:
                    header = f"| shapes | dtype | stages | BN2B | slab | fin tile | clip | " + " | ".join(names) + \
                        " | programs | fin | ws MiB |"
                    print(header, flush=True)
                print(f"| {name} | {dt} | {s} | {b} | {slab} | {fin[0]}x{fin[1]} | {fused} | " +
                      " | ".join(res.get(k, "-") for k in names) +
                      f" | {plan.n_blocks} | {plan.n_fin} | {4 * plan.ws_floats / 2 ** 20:.1f} |", flush=True)
                del plan
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
