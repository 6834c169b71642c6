"""Where does a fused CAME step spend its time? (`python -m bench phases`, CUDA only)

For each shape set and dtype, a few steps of every selected optimizer run under torch.profiler; the GPU
kernel times are grouped by CAME phase (sq_stats, clip_stats, momentum_res, param_step and their finalize
kernels; any other kernel, e.g. a step-counter add, is "other") and set against the bytes each phase must
move, giving achieved GB/s per phase next to the device copy bandwidth measured in the same process.
Optimizers that are not CAME (adamw[fused]) are shown as one "all kernels" row, for comparison.

Bytes per element counted (n elements; ge, pe, me: grad, param, momentum element sizes; flat tensors
(ndim < 2) also move their full-size v, 4 B):
    sq_stats      g read                          + flat: v read + write
    clip_stats    g read                          + flat: v read   (only for matrices with rows wider than
                                                    NPAD_MAX = 8192: phase 1 sums the clip's statistic of
                                                    every other tensor, see triton_kernels.multi_tensor)
    momentum_res  g read, m read + write          + flat: v read
    param_step    m read, p read + write
    adamw[fused]  g read, p, m, v read + write
Row and column statistics are O(rows + cols) and left out. Output: a table and <out>/phases.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from . import shapes as shapes_mod
from . import utils

NPAD_MAX = 8192  # = triton_kernels.multi_tensor.NPAD_MAX (importing it would need Triton)

# (kernel-name substring, phase); the first match wins. Both backends' kernel names contain these.
PHASES = [("sq_finalize", "sq_stats (finalize)"), ("sq_stats", "sq_stats"),
          ("clip_finalize", "clip_stats (finalize)"), ("clip_stats", "clip_stats"),
          ("res_finalize", "momentum_res (finalize)"), ("momentum_res", "momentum_res"),
          ("param_step", "param_step")]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", default="gpt2,tinyllama", help="shape sets (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="divide every width by this (default: 1)")
    p.add_argument("--dtype", default="fp32,bf16", help="param dtypes (default: %(default)s)")
    p.add_argument("--optim", default="came[cuda],came[triton],adamw[fused]",
                   help="optimizers (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps, after 3 warm-up steps (default: 5)")
    p.add_argument("--out", default=utils.DEFAULT_OUT, help="output directory (default: bench/out)")
    p.add_argument("--compare", default=None, metavar="JSON",
                   help="an earlier phases.json (e.g. bench/reference/*.json): its times beside these, when it "
                        "comes from the same device")
    p.add_argument("--show", default=None, metavar="JSON",
                   help="print the table of a saved phases.json (with --compare: against the reference) and exit")


def phase_of(kernel: str) -> str:
    for key, phase in PHASES:
        if key in kernel:
            return phase
    return "other"


def phase_bytes(params: List[torch.Tensor], opt: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes each CAME phase must move for one step over `params` (see the module docstring)."""
    out: Dict[str, int] = defaultdict(int)
    for p in params:
        n, ge, pe = p.numel(), p.grad.element_size(), p.element_size()
        st = opt.state.get(p, {})
        # the momentum's element: fp32, or the opt-in bf16 (exp_avg) or int8 codes (exp_avg_q)
        me = st["exp_avg"].element_size() if "exp_avg" in st else 1 if "exp_avg_q" in st else 4
        flat = 0 if p.dim() >= 2 else 4
        out["sq_stats"] += n * (ge + 2 * flat)
        if p.dim() >= 2 and p.shape[-1] > NPAD_MAX:
            out["clip_stats"] += n * (ge + flat)
        out["momentum_res"] += n * (ge + 2 * me + flat)
        out["param_step"] += n * (me + 2 * pe)
    return dict(out)


def adamw_bytes(params: List[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    total = 0
    for p in params:
        st = opt.state[p]
        total += p.numel() * (p.grad.element_size() + 2 * p.element_size()
                              + 2 * st["exp_avg"].element_size() + 2 * st["exp_avg_sq"].element_size())
    return total


def _kernel_times_us(opt: torch.optim.Optimizer, steps: int) -> Dict[str, List[float]]:
    """{kernel name: [total device us over the profiled steps, launches]} for `steps` steps of opt."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    out: Dict[str, List[float]] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None)
        if t is None:
            t = getattr(evt, "cuda_time_total", 0.0)
        if t and t > 0 and getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            out[evt.key] = [t, evt.count]
    return out


def run(args: argparse.Namespace) -> dict:
    if getattr(args, "show", None):
        payload = _load(args.show)
        print(table(payload, _load(getattr(args, "compare", None))))
        return payload
    device = utils.resolve_device("cuda")
    if device.type != "cuda":
        raise SystemExit("bench phases needs a CUDA device (it reads GPU kernel times)")
    specs, skipped = utils.optimizer_specs(device, select=[s.strip() for s in args.optim.split(",")])
    env = utils.environment(device)
    copy_gbs = utils.copy_bandwidth_gbs(device)
    print(f"# phase profile on {env['device']} (commit {env['commit']}); copy bandwidth {copy_gbs:.0f} GB/s")
    for name, why in skipped.items():
        print(f"#   skipped {name}: {why}")
    rows: List[dict] = []
    for set_name in args.sets.split(","):
        shapes = shapes_mod.shape_set(set_name, args.scale)
        for dname in args.dtype.split(","):
            params = utils.make_params(shapes, device, utils.DTYPES[dname])
            for spec in specs:
                base = {"set": set_name, "dtype": dname, "optimizer": spec.name}
                opt = None
                try:
                    opt = spec.make(params)
                    kernels = _kernel_times_us(opt, args.steps)
                    grouped: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
                    for k, (t, c) in kernels.items():
                        ph = phase_of(k) if spec.family == "came" else "all kernels"
                        grouped[ph][0] += t / args.steps
                        grouped[ph][1] += c / args.steps
                    nbytes = phase_bytes(params, opt) if spec.family == "came" else \
                        {"all kernels": adamw_bytes(params, opt)} if spec.family == "adamw" else {}
                    total_us = sum(t for t, _ in grouped.values())
                    for ph in sorted(grouped, key=lambda p: [x[1] for x in PHASES].index(p)
                                     if p in [x[1] for x in PHASES] else 99):
                        us, launches = grouped[ph]
                        r = dict(base, phase=ph, us=us, launches=launches, bytes=nbytes.get(ph))
                        if r["bytes"]:
                            r["gbs"] = r["bytes"] / (us * 1e-6) / 1e9
                            r["pct_copy"] = 100 * r["gbs"] / copy_gbs
                        rows.append(r)
                    tb = sum(nbytes.values())
                    rows.append(dict(base, phase="TOTAL (kernels)", us=total_us,
                                     launches=sum(c for _, c in grouped.values()), bytes=tb,
                                     gbs=tb / (total_us * 1e-6) / 1e9 if tb else None,
                                     pct_copy=100 * tb / (total_us * 1e-6) / 1e9 / copy_gbs if tb else None))
                except Exception as e:
                    rows.append(dict(base, phase="FAILED", error=f"{type(e).__name__}: {e}"))
                    print(f"{set_name} {dname} {spec.name}: FAILED {type(e).__name__}: {e}")
                del opt
                utils.free_memory(device)
            del params
            utils.free_memory(device)
    payload = {"benchmark": "phases", "env": env, "copy_bandwidth_gbs": copy_gbs, "steps": args.steps,
               "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    utils.write_json(os.path.join(args.out, "phases.json"), payload)
    print(table(payload, _load(args.compare)))
    return payload


def _load(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


def _key(r: dict) -> tuple:
    return r["set"], r["dtype"], r["optimizer"], r["phase"]


def table(payload: dict, ref: Optional[dict] = None) -> str:
    """The phase table; with `ref` (an earlier phases.json from the same kind of device) two more columns, the
    reference's us/step for the same shapes, dtype, optimizer and phase, and the change against it."""
    cols = [("set", "shapes", ""), ("dtype", "dtype", ""), ("optimizer", "optimizer", ""), ("phase", "phase", ""),
            ("launches", "launches/step", ".0f"), ("us", "us/step", ".1f"), ("bytes", "MB/step", ""),
            ("gbs", "GB/s", ".0f"), ("pct_copy", "% copy BW", ".0f")]
    rows = [dict(r, bytes=None if not r.get("bytes") else f"{r['bytes'] / 1e6:.0f}") for r in payload["rows"]]
    note = ""
    if ref is not None:
        if ref["env"].get("device") != payload["env"].get("device"):
            note = (f"\n- not compared with commit {ref['env'].get('commit')}: measured on "
                    f"{ref['env'].get('device')}, this on {payload['env'].get('device')}")
        else:
            old = {_key(r): r.get("us") for r in ref["rows"]}
            for r in rows:
                was = old.get(_key(r))
                if was and r.get("us") is not None:
                    r["ref_us"] = was
                    r["change"] = f"{100 * (r['us'] - was) / was:+.0f}%"
            cols += [("ref_us", f"us at {ref['env'].get('commit')}", ".1f"), ("change", "change", "")]
    return utils.markdown_table(rows, cols) + (
        f"\n- copy bandwidth {payload['copy_bandwidth_gbs']:.0f} GB/s (read + write); kernel times from "
        f"torch.profiler, mean of {payload['steps']} steps; commit {payload['env']['commit']}") + note


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench phases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main() and 0)
