"""`python -m bench [step|converge|memory|phases|host|study|all] [options]`; `all` (the default) is the README's main job."""
from __future__ import annotations

import argparse
import sys
import time

from . import converge, host, memory, phases, step, study, utils

SUBCOMMANDS = {"step": step, "converge": converge, "memory": memory, "phases": phases, "host": host,
               "study": study}


def _all(args: argparse.Namespace) -> None:
    """step (default scale) + a short convergence run + the memory picture, one after the other."""
    t0 = time.perf_counter()
    results = {}
    for name in ("step", "memory", "converge"):
        mod = SUBCOMMANDS[name]
        sub = argparse.ArgumentParser()
        mod.add_args(sub)
        sub_args = sub.parse_args(["--device", args.device, "--out", args.out] + (["--no-plot"] if args.no_plot else []))
        if name == "converge" and args.quick_steps:
            sub_args.steps = args.quick_steps
        print(f"\n========== bench {name} ==========", flush=True)
        results[name] = mod.run(sub_args)
    print(f"\n# bench all: done in {time.perf_counter() - t0:.0f} s; JSON and PNGs in {args.out}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of came_kernels.CAME against torch.optim.AdamW, torch.optim.Adafactor and "
                    "came-pytorch on the device you have. Without a subcommand: `all`.",
        epilog="Each subcommand has its own --help. Outputs go to bench/out/ by default.")
    subs = p.add_subparsers(dest="cmd")
    for name, mod in SUBCOMMANDS.items():
        sp = subs.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                             description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(sp)
    a = subs.add_parser("all", help="step + memory + a short convergence run (the default)",
                        description=_all.__doc__)
    for sp in (p, a):
        sp.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
        sp.add_argument("--out", default=utils.DEFAULT_OUT, help="output directory (default: bench/out)")
        sp.add_argument("--no-plot", action="store_true", help="skip the PNGs")
        sp.add_argument("--quick-steps", type=int, default=None,
                        help="training steps of the convergence part (default: that of `converge`)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in SUBCOMMANDS:
            return SUBCOMMANDS[args.cmd].run(args)
        return _all(args)
    except ValueError as e:  # a bad option value (e.g. --sets foo): one line, not a traceback
        raise SystemExit(f"python -m bench {args.cmd or 'all'}: {e}") from None


if __name__ == "__main__":
    main()
    sys.exit(0)
