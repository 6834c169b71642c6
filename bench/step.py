"""How fast is one optimizer step, and how much memory does it need? (`python -m bench step`)

For each shape set (bench/shapes.py) and dtype: params with fixed random grads are built once, every
optimizer is created on them, and they are warmed up and timed interleaved, one step of each in turn
(utils.time_round_robin), so that a burst of load from elsewhere hits all of them alike. Reported per row:
the median, min and max ms/step and the number of timed steps, the median relative to
torch.optim.AdamW(fused=True) on the same params, optimizer-state bytes/param from the real state tensors,
the peak transient memory of one step, and effective bandwidth (one-pass bytes / time) against the device's
copy bandwidth measured in the same process. A run on a busy machine (CPU load, or a max step over twice
the median) says so under the table. See bench/utils.py for every method.

Output: a table on stdout, <out>/step.json and <out>/step.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import List, Optional

import torch

from . import shapes as shapes_mod
from . import utils

COLUMNS = [
    ("set", "shapes", ""),
    ("dtype", "dtype", ""),
    ("optimizer", "optimizer", ""),
    ("ms", "ms/step", ".2f"),
    ("ms_min", "min", ".2f"),
    ("ms_max", "max", ".2f"),
    ("timed_steps", "steps", "d"),
    ("ms_cold", "cold ms", ".2f"),
    ("x_adamw", "x AdamW(fused)", ".2f"),
    ("state_bytes_per_param", "state B/param", ".2f"),
    ("peak_transient_mib", "peak transient MiB", ".1f"),
    ("gbs", "GB/s", ".0f"),
    ("pct_copy", "% of copy BW", ".0f"),
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", default="gpt2,tinyllama,resnet50",
                   help="comma-separated shape sets from bench/shapes.py (default: %(default)s)")
    p.add_argument("--scale", type=float, default=None,
                   help="divide every width by this (default: 1 on CUDA, 8 on CPU)")
    p.add_argument("--dtype", default="fp32", help="comma-separated param dtypes: fp32, bf16, fp16 (default: fp32)")
    p.add_argument("--optim", default=None,
                   help="comma-separated optimizer names or patterns, e.g. 'came*,adamw[fused]' (default: all)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 CUDA, 2 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps at most (default: 50 CUDA, 20 CPU)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop timing an optimizer after this long, min 3 steps (default: 3 CUDA, 2 CPU)")
    p.add_argument("--out", default=utils.DEFAULT_OUT, help="output directory (default: bench/out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--show", metavar="STEP_JSON", default=None,
                   help="print the table of a saved step.json and exit (bench/gpu_check.sh ends with it)")


def run(args: argparse.Namespace) -> dict:
    if args.show:
        with open(args.show) as f:
            payload = json.load(f)
        print(table(payload))
        return payload
    device = utils.resolve_device(args.device)
    cuda = device.type == "cuda"
    scale = args.scale if args.scale is not None else (1.0 if cuda else 8.0)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    iters = args.iters if args.iters is not None else (50 if cuda else 20)
    max_s = args.max_seconds if args.max_seconds is not None else (3.0 if cuda else 2.0)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        shapes_mod.shape_set(s, scale)  # an unknown set or a bad scale fails here, before any work
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in utils.DTYPES:
            raise SystemExit(f"--dtype {d!r}: expected one of {sorted(utils.DTYPES)}")
    select = [s.strip() for s in args.optim.split(",")] if args.optim else None
    specs, skipped = utils.optimizer_specs(device, select=select)

    env = utils.environment(device)
    print(f"# step benchmark on {env['device']} (torch {env['torch']}, commit {env['commit']})")
    for name, why in skipped.items():
        print(f"#   skipped {name}: {why}")
    copy_gbs = utils.copy_bandwidth_gbs(device) if cuda else None
    if copy_gbs:
        print(f"#   copy bandwidth (read + write): {copy_gbs:.1f} GB/s")

    rows: List[dict] = []
    load_before = utils.load_average()
    bar = utils.progress(total=len(sets) * len(dtypes), desc="step", unit="set")
    for set_name in sets:
        shapes = shapes_mod.shape_set(set_name, scale)
        n = shapes_mod.numel(shapes)
        for dname in dtypes:
            dtype = utils.DTYPES[dname]
            bar.set_description(f"{set_name} {dname}")
            params = utils.make_params(shapes, device, dtype)
            pbytes = n * params[0].element_size()
            group: List[dict] = []
            opts = {}
            for spec in specs:
                row = {"set": set_name, "set_desc": shapes_mod.describe(set_name, scale), "scale": scale,
                       "dtype": dname, "optimizer": spec.name, "family": spec.family, "numel": n,
                       "tensors": len(shapes)}
                try:
                    opts[spec.name] = spec.make(params)
                except Exception as e:  # one broken optimizer must not hide the others' numbers
                    row["error"] = f"{type(e).__name__}: {e}"
                    bar.write(f"{set_name} {dname} {spec.name}: FAILED {row['error']}")
                group.append(row)
            # All optimizers step the same params in turn (interleaved: see utils.time_round_robin). A
            # failure during timing is pinned on its optimizer by retiming the others without it.
            times: dict = {}
            live = dict(opts)
            while live and not times:
                try:
                    times = utils.time_round_robin({k: o.step for k, o in live.items()}, device, warmup, iters,
                                                   max_s, block=4)
                except Exception:
                    bad = _first_failing(live)
                    row = next(r for r in group if r["optimizer"] == bad[0])
                    row["error"] = bad[1]
                    bar.write(f"{set_name} {dname} {bad[0]}: FAILED {bad[1]}")
                    del live[bad[0]]
            for row in group:
                if row["optimizer"] not in times:
                    continue
                opt, t, cold = live[row["optimizer"]], times[row["optimizer"]]["warm"], times[row["optimizer"]]["cold"]
                peak = utils.peak_transient_bytes(opt.step, device)
                sb = utils.state_bytes(opt)
                ms = statistics.median(t)
                one_pass = 2 * pbytes + pbytes + 2 * sb  # param r/w, grad r, state r/w
                row.update(ms=ms, ms_min=min(t), ms_max=max(t), timed_steps=len(t),
                           ms_cold=statistics.median(cold) if cold else None,
                           state_bytes=sb, state_bytes_per_param=sb / n, state_dtypes=utils.state_dtypes(opt),
                           peak_transient_bytes=peak,
                           peak_transient_mib=None if peak is None else peak / 2**20,
                           peak_transient_bytes_per_param=None if peak is None else peak / n,
                           one_pass_bytes=one_pass)
                if copy_gbs:  # CUDA only: CPU caches make a bytes/time figure meaningless at these sizes
                    row["gbs"] = one_pass / (ms * 1e-3) / 1e9
                    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
            del opts, live
            utils.free_memory(device)
            base = next((r for r in group if r["optimizer"] == "adamw[fused]" and "ms" in r), None) \
                or next((r for r in group if r["family"] == "adamw" and "ms" in r), None)
            for r in group:
                if base is not None and "ms" in r:
                    r["x_adamw"] = r["ms"] / base["ms"]
                    r["baseline"] = base["optimizer"]
            rows += group
            del params
            utils.free_memory(device)
            bar.update(1)
    bar.close()
    load_after = utils.load_average()
    busy = _busy_reasons(rows, device, load_before, load_after)
    for why in busy:
        print(f"# WARNING: {why}")

    payload = {"benchmark": "step", "env": env, "device_type": device.type, "scale": scale, "busy": busy,
               "load_per_core": [load_before, load_after],
               "copy_bandwidth_gbs": copy_gbs, "warmup": warmup, "iters": iters, "max_seconds": max_s,
               "methods": {"time": "median (and min, max) of per-step " + ("CUDA events" if cuda else
                                                                        "time.perf_counter")
                           + ", optimizers interleaved round-robin" + (
                               " in blocks of 4 steps; the first of each block (an idle GPU: host time "
                               "before the first kernel shows) is the 'cold ms' column, the others the "
                               "median" if cuda else ""),
                           "peak_transient": utils.PEAK_METHOD[device.type],
                           "state": "sum of nbytes of optimizer.state tensors / param elements",
                           "gbs": "one-pass bytes (param r+w, grad r, state r+w) / median step time"},
               "skipped": skipped, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = utils.write_json(os.path.join(args.out, "step.json"), payload)
    if not args.no_plot:
        png = plot(payload, os.path.join(args.out, "step.png"))
        if png:
            print(f"# wrote {png}")
    print(f"# wrote {path}")
    print(table(payload))
    return payload


def _first_failing(opts: dict) -> tuple:
    """(name, error) of the first optimizer whose step raises, each tried alone."""
    for name, opt in opts.items():
        try:
            opt.step()
        except Exception as e:
            return name, f"{type(e).__name__}: {e}"
    return next(iter(opts)), "failed only when interleaved with the others"


def _busy_reasons(rows: List[dict], device, load_before, load_after) -> List[str]:
    """Why the numbers of this run may be noise rather than fact: a loaded CPU, or a wide spread."""
    out = []
    loads = [x for x in (load_before, load_after) if x is not None]
    if device.type == "cpu" and loads and max(loads) > 0.5:
        out.append(f"the machine was busy (load average {max(loads):.2f} per core): CPU timings are noisy; "
                   "compare rows of one run, and rerun on a quiet machine")
    wide = [f"{r['set']} {r['dtype']} {r['optimizer']}" for r in rows
            if "ms" in r and r["timed_steps"] >= 3 and r["ms_max"] > 2 * r["ms"]]
    if wide:
        out.append(f"max step time over twice the median for {len(wide)} rows ({', '.join(wide[:4])}"
                   f"{', ...' if len(wide) > 4 else ''}): something else ran during the measurement")
    return out


def table(payload: dict) -> str:
    """The markdown table of a step payload, with the set descriptions and the methods under it."""
    rows = payload["rows"]
    cols = COLUMNS if payload["copy_bandwidth_gbs"] else [c for c in COLUMNS
                                                          if c[0] not in ("gbs", "pct_copy", "ms_cold")]
    lines = [utils.markdown_table(rows, cols)]
    for desc in dict.fromkeys(r["set_desc"] for r in rows):
        lines.append(f"- {desc}")
    for r in rows:
        if "error" in r:
            lines.append(f"- {r['set']} {r['dtype']} {r['optimizer']} failed: {r['error']}")
    bw, env = payload["copy_bandwidth_gbs"], payload["env"]
    lines.append(f"- {env['date']}, commit {env['commit']}, torch {env['torch']}"
                 + (f", triton {env['triton']}" if env.get("triton") else "") + f": `{env['command']}`")
    lines.append(f"- device: {env['device']}"
                 + (f"; copy bandwidth {bw:.0f} GB/s (GB/s column: one-pass bytes / time)" if bw else ""))
    lines.append(f"- peak transient memory: {payload['methods']['peak_transient']}")
    lines.append(f"- ms/step: {payload['methods']['time']}")
    for why in payload.get("busy", []):
        lines.append(f"- **WARNING**: {why}")
    return "\n".join(lines)


def plot(payload: dict, path: str) -> Optional[str]:
    """Horizontal bars of ms/step, one panel per (shape set, dtype), annotated with x AdamW(fused)."""
    plt = utils.pyplot()
    if plt is None:
        return None
    rows = [r for r in payload["rows"] if "ms" in r]
    panels = list(dict.fromkeys((r["set"], r["dtype"]) for r in rows))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.0 + 0.45 * max(
        sum(1 for r in rows if (r["set"], r["dtype"]) == p) for p in panels) * len(panels)), squeeze=False)
    colors = {"came": "tab:red", "adamw": "tab:blue", "adafactor": "tab:green", "came-pytorch": "tab:orange",
              "adamw8bit": "tab:purple"}
    for ax, (s, d) in zip(axes[:, 0], panels):
        rs = [r for r in rows if (r["set"], r["dtype"]) == (s, d)]
        y = range(len(rs))
        # Bars at the median, whiskers from the fastest to the slowest timed step.
        ax.barh(list(y), [r["ms"] for r in rs], color=[colors.get(r["family"], "gray") for r in rs],
                xerr=[[r["ms"] - r.get("ms_min", r["ms"]) for r in rs], [r.get("ms_max", r["ms"]) - r["ms"] for r in rs]],
                error_kw=dict(ecolor="black", capsize=2, lw=0.8))
        ax.set_yticks(list(y), [r["optimizer"] for r in rs])
        ax.invert_yaxis()
        for i, r in enumerate(rs):
            lab = f" {r['ms']:.2f} ms" + (f"  ({r['x_adamw']:.2f}x)" if r.get("x_adamw") else "")
            ax.text(r["ms"], i, lab, va="center", fontsize=8)
        ax.set_xlim(0, max(r.get("ms_max", r["ms"]) for r in rs) * 1.45)
        ax.set_title(f"{rs[0]['set_desc']}, {d}", fontsize=9)
        ax.set_xlabel("ms per optimizer step, median with min-max whiskers (lower is better)", fontsize=8)
    fig.suptitle(f"Optimizer step time on {payload['env']['device'][:60]} (commit {payload['env']['commit']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main() and 0)
