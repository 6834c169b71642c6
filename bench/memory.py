"""How much optimizer state does each optimizer keep? (`python -m bench memory`)

Measured, not computed: for every distinct parameter shape of a shape set (full size by default), one
parameter of that shape gets a gradient and one optimizer step, and the bytes of the state tensors the
optimizer allocated are summed (bench.utils.state_bytes), times the number of parameters of that shape.
Done one shape at a time, so TinyLlama-1.1B needs only about its largest tensor's memory.

Rows: torch.optim.AdamW, torch.optim.Adafactor, came_kernels.CAME (fp32 momentum, the default), CAME with
factor_conv=True (conv weights factored as [out, in*kh*kw] matrices), CAME with momentum_dtype="bf16" and
"int8" (the opt-in low-precision momentum), CAME with an int8 momentum and bf16 params with
param_rounding="kahan" (its bf16 compensation buffer counts as state; measured with bf16 params whatever
--dtype says), came-pytorch (if installed) and bitsandbytes AdamW8bit (CUDA, if installed).

Output: a table, <out>/memory.json and <out>/memory.png.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Dict, List

import torch

from . import shapes as shapes_mod
from . import utils

KAHAN = "CAME, int8 m, kahan (bf16 params)"


def _factories(device: torch.device) -> Dict[str, callable]:
    import came_kernels
    f = {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
        "Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-4),
        "CAME": lambda ps: came_kernels.CAME(ps, lr=1e-4),
        # Conv weights factored as [out, in*kh*kw] (opt-in); the same as CAME for models without convs.
        "CAME, factor_conv": lambda ps: came_kernels.CAME(ps, lr=1e-4, factor_conv=True),
        "CAME, bf16 momentum": lambda ps: came_kernels.CAME(ps, lr=1e-4, momentum_dtype="bf16"),
        "CAME, int8 momentum": lambda ps: came_kernels.CAME(ps, lr=1e-4, momentum_dtype="int8"),
        KAHAN: lambda ps: came_kernels.CAME(ps, lr=1e-4, momentum_dtype="int8", param_rounding="kahan"),
    }
    try:
        import came_pytorch
        f["came-pytorch"] = lambda ps: came_pytorch.CAME(ps, lr=1e-4)
    except ImportError:
        pass
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb
            f["AdamW8bit[bnb]"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
        except Exception:
            pass
    return f


def measure_set(set_name: str, scale: float, device: torch.device, dtype: torch.dtype) -> List[dict]:
    shapes = shapes_mod.shape_set(set_name, scale)
    n = shapes_mod.numel(shapes)
    counts = collections.Counter(shapes)
    factories = _factories(device)
    total: Dict[str, int] = {name: 0 for name in factories}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape, count in counts.items():
        grad = torch.randn(shape, generator=gen) * 1e-3
        for name, make in factories.items():
            pdt = torch.bfloat16 if name == KAHAN else dtype  # the compensation exists for bf16 params only
            p = torch.zeros(shape, dtype=pdt, device=device, requires_grad=True)
            p.grad = grad.to(device=device, dtype=pdt)
            opt = make([p])
            opt.step()
            total[name] += count * utils.state_bytes(opt)
            del opt, p
        utils.free_memory(device)
    pg = 2 * n * torch.empty((), dtype=dtype).element_size()  # params + grads
    rows = []
    for name, b in total.items():
        rows.append({"set": set_name, "set_desc": shapes_mod.describe(set_name, scale), "optimizer": name,
                     "numel": n, "state_bytes": b, "state_gib": b / 2**30, "bytes_per_param": b / n,
                     "vs_adamw_pct": 100 * b / total["AdamW"], "with_params_grads_gib": (b + pg) / 2**30,
                     })
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", default="gpt2,tinyllama,resnet50", help="shape sets (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="divide widths by this (default: 1, full size)")
    p.add_argument("--dtype", default="fp32", choices=sorted(utils.DTYPES), help="param dtype (default: fp32)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    p.add_argument("--out", default=utils.DEFAULT_OUT, help="output directory (default: bench/out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run(args: argparse.Namespace) -> dict:
    device = utils.resolve_device(args.device)
    dtype = utils.DTYPES[args.dtype]
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    env = utils.environment(device)
    print(f"# optimizer-state memory from real allocations, {args.dtype} params, on {device.type}")
    rows: List[dict] = []
    for set_name in utils.progress(sets, desc="memory", unit="set"):
        rows += measure_set(set_name, args.scale, device, dtype)
    payload = {"benchmark": "memory", "env": env, "dtype": args.dtype, "scale": args.scale,
               "method": "per distinct shape: one param, one step, sum of nbytes of its state tensors, times "
                         "the count of that shape",
               "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = utils.write_json(os.path.join(args.out, "memory.json"), payload)
    if not args.no_plot:
        png = plot(payload, os.path.join(args.out, "memory.png"))
        if png:
            print(f"# wrote {png}")
    print(f"# wrote {path}")
    print(table(payload))
    return payload


def table(payload: dict) -> str:
    cols = [("set", "shapes", ""), ("optimizer", "optimizer", ""), ("state_gib", "state GiB", ".3f"),
            ("bytes_per_param", "state B/param", ".2f"), ("vs_adamw_pct", "% of AdamW", ".0f"),
            ("with_params_grads_gib", f"+ params + grads GiB ({payload['dtype']})", ".2f")]
    lines = [utils.markdown_table(payload["rows"], cols)]
    lines += [f"- {d}" for d in dict.fromkeys(r["set_desc"] for r in payload["rows"])]
    lines.append(f"- {KAHAN}: measured with bf16 params (the Kahan buffer is 2 B/param of bf16 state)")
    return "\n".join(lines)


def plot(payload: dict, path: str):
    plt = utils.pyplot()
    if plt is None:
        return None
    rows = payload["rows"]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    colors = {"AdamW": "tab:blue", "Adafactor": "tab:green", "CAME": "tab:red", "came-pytorch": "tab:orange",
              "CAME, bf16 momentum": "salmon", "CAME, int8 momentum": "lightcoral", KAHAN: "rosybrown",
              "AdamW8bit[bnb]": "tab:purple"}
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(opts)
    for j, o in enumerate(opts):
        vals = [next((r["bytes_per_param"] for r in rows if r["set"] == s and r["optimizer"] == o), 0) for s in sets]
        xs = [i + (j - (len(opts) - 1) / 2) * w for i in range(len(sets))]
        bars = ax.bar(xs, vals, w, label=o, color=colors.get(o, "gray"))
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    # Set descriptions are long: break them at the colon so neighbouring labels do not overlap.
    ax.set_xticks(range(len(sets)), [next(r["set_desc"] for r in rows if r["set"] == s).replace(": ", ":\n", 1)
                                     for s in sets], fontsize=7)
    ax.set_ylabel("optimizer state, bytes per parameter")
    ax.set_title(f"Optimizer state from real allocations ({payload['dtype']} params)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main() and 0)
