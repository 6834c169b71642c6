"""Convergence study: CAME with and without bias correction against AdamW and Adafactor (`python -m bench study`).

The task and model of `python -m bench converge` (byte-level GPT on the Python stdlib, same schedule). Each
optimizer is swept over its own lr grid at the short horizon with seed 0; its best lr (lowest best
validation loss) is then run at every horizon and seed. Comparing each at its best lr from one sweep keeps
the comparison about the optimizers, not about one lr guess.

A grid whose best lr is at one of its ends is extended by factors of 2 (up to three times).

`--refine 0.7,1.4` then picks the lr on every seed: each optimizer's sweep winner and its multiples by the
factors are run at the sweep horizon with every seed of `--seeds`, and the lr with the lowest mean best
validation loss is the one of the final runs (the fine grid is extended by the factors, up to twice, while
its best is at an end). One seed's winner can sit next to an lr that trains badly on another seed.

Optimizers: AdamW, Adafactor (torch.optim's), CAME exact (came-pytorch 0.1.3, no bias correction), CAME with
`bias_correction=True`, and two ablations: the momentum term only ([exp_avg]) and the two statistics only
([stats]: exp_avg_sq and exp_avg_res); not run by default, `bias_correction=True` and [stats] with
beta3 = 0.999 ([b3=0.999], [stats,b3=0.999]), whose confidence statistic averages over about a thousand steps
instead of ten thousand. `--optims` picks.

Every run is cached in <out>/study_runs.json under (optimizer, lr, steps, seed): an interrupted study
resumes, and a finished one is re-tabulated without training. Output: <out>/study.json, the tables (sweep,
then mean and spread of the final runs), <out>/study.png (validation loss against steps).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from . import converge, utils

# label: (constructor keywords, lr grid). AdamW's grid brackets the benchmark's 2e-3; CAME's spans its
# usual 0.1-1x of AdamW's lr (came-pytorch recommends 0.5-0.9x at scale; small runs liked less).
OPTIMIZERS = {
    "AdamW": (dict(), (1e-3, 2e-3, 4e-3)),
    "Adafactor": (dict(), (3e-3, 1e-2, 3e-2)),
    "CAME": (dict(bias_correction=False), (2.5e-4, 5e-4, 1e-3)),
    "CAME+bc": (dict(bias_correction=True), (5e-4, 1e-3, 2e-3)),
    "CAME+bc[exp_avg]": (dict(bias_correction=("exp_avg",)), (5e-4, 1e-3, 2e-3)),
    "CAME+bc[stats]": (dict(bias_correction=("exp_avg_sq", "exp_avg_res")), (2.5e-4, 5e-4, 1e-3)),
    "CAME+bc[b3=0.999]": (dict(bias_correction=True, betas=(0.9, 0.999, 0.999)), (1e-3, 2e-3, 4e-3)),
    "CAME+bc[stats,b3=0.999]": (dict(bias_correction=("exp_avg_sq", "exp_avg_res"), betas=(0.9, 0.999, 0.999)),
                                (1e-3, 2e-3, 4e-3)),
    # For conv nets (--model cnn): conv weights factored as [out, in*width] matrices.
    "CAME[factor_conv]": (dict(factor_conv=True), (2.5e-4, 5e-4, 1e-3)),
    # Opt-in low-precision state, each run at the lr that won CAME's sweep (a label instead of a grid): equal lr
    # and steps, so that the loss shows what the storage costs. bf16 momentum and int8 momentum (the byte
    # model's tensors of >= 4096 elements get it); bf16 params (the whole model in bf16, no fp32 master
    # weights) stored with round-to-nearest as came-pytorch does, stochastic rounding or Kahan compensation.
    "CAME[bf16 m]": (dict(momentum_dtype="bf16"), "CAME"),
    "CAME[int8 m]": (dict(momentum_dtype="int8"), "CAME"),
    "CAME[bf16 p nearest]": (dict(param_dtype=torch.bfloat16, param_rounding="nearest"), "CAME"),
    "CAME[bf16 p SR]": (dict(param_dtype=torch.bfloat16, param_rounding="stochastic"), "CAME"),
    "CAME[bf16 p kahan]": (dict(param_dtype=torch.bfloat16, param_rounding="kahan"), "CAME"),
}
COLORS = {"AdamW": "tab:blue", "Adafactor": "tab:green", "CAME": "tab:red", "CAME+bc": "tab:purple",
          "CAME+bc[exp_avg]": "tab:orange", "CAME+bc[stats]": "tab:brown", "CAME[factor_conv]": "tab:olive",
          "CAME[bf16 m]": "salmon", "CAME[int8 m]": "lightcoral", "CAME[bf16 p nearest]": "black",
          "CAME[bf16 p SR]": "tab:cyan", "CAME[bf16 p kahan]": "magenta", "CAME+bc[b3=0.999]": "tab:pink",
          "CAME+bc[stats,b3=0.999]": "tab:gray"}
# The labels run by default (the others: --optims).
DEFAULT_OPTIMS = ("AdamW", "Adafactor", "CAME", "CAME+bc", "CAME+bc[exp_avg]", "CAME+bc[stats]")


def make_optimizer(label: str, lr: float, wd: float, backend: str):
    import came_kernels
    kw, _ = OPTIMIZERS[label]
    kw = {k: v for k, v in kw.items() if k != "param_dtype"}  # the model's dtype (see run), not the optimizer's
    if label == "AdamW":
        return lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    if label == "Adafactor":
        return lambda ps: torch.optim.Adafactor(ps, lr=lr, weight_decay=wd)
    kw = dict(kw)
    betas = kw.pop("betas", (0.9, 0.999, 0.9999))
    return lambda ps: came_kernels.CAME(ps, lr=lr, betas=betas, weight_decay=wd, backend=backend, **kw)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(converge.SIZES), default="small",
                   help="model size of `bench converge` (default: %(default)s)")
    p.add_argument("--model", choices=sorted(converge.MODELS), default="gpt",
                   help="gpt: the byte-level GPT of `bench converge`; cnn: a causal conv net of the same width "
                        "and depth, for conv weights (default: %(default)s)")
    p.add_argument("--optims", default=",".join(DEFAULT_OPTIMS),
                   help=f"optimizers, among {', '.join(OPTIMIZERS)} (default: %(default)s)")
    p.add_argument("--horizons", default="300,1500", help="training steps of the final runs (default: %(default)s)")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="steps of the lr sweep (default: the shortest horizon)")
    p.add_argument("--seeds", default="0,1", help="seeds of the final runs (default: %(default)s)")
    p.add_argument("--refine", default=None,
                   help="lr factors of a fine grid around each sweep winner, run with every seed; the best mean "
                        "over seeds is the final lr (e.g. 0.7,1.4; default: none, the seed-0 sweep decides)")
    p.add_argument("--final-optims", default=None,
                   help="optimizers of the final runs at the longer horizons (default: all of --optims)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="for every optimizer (default: %(default)s)")
    p.add_argument("--came-backend", default="auto", help="came_kernels backend (default: auto)")
    p.add_argument("--corpus-mb", type=float, default=16.0, help="corpus size cap in MB (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    p.add_argument("--out", default=utils.DEFAULT_OUT, help="output directory (default: bench/out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def _ints(text: str, what: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated integers, got {text!r}") from None


def _names(text: str, what: str) -> list:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        raise ValueError(f"--{what}: unknown optimizer(s) {bad or text!r}; choose among {', '.join(OPTIMIZERS)}")
    return names


class RunCache:
    """Finished runs in a JSON file, keyed by (optimizer, lr, steps, seed) and the run's configuration."""

    def __init__(self, path: str, config: dict):
        self.path, self.config = path, config
        self.runs = {}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("config") == config:
                self.runs = saved["runs"]

    @staticmethod
    def key(label, lr, steps, seed) -> str:
        return f"{label}|{lr:g}|{steps}|{seed}"

    def get(self, label, lr, steps, seed):
        return self.runs.get(self.key(label, lr, steps, seed))

    def put(self, label, lr, steps, seed, run) -> None:
        self.runs[self.key(label, lr, steps, seed)] = run
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"config": self.config, "runs": self.runs}, f)
        os.replace(tmp, self.path)


def _floats(text: str, what: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated numbers, got {text!r}") from None


def refine_lr(loss_at, center: float, factors, max_extensions: int = 2) -> dict:
    """{lr: loss} over center and center * each factor (lrs rounded to 3 significant digits), extended by
    the largest (smallest) factor while the best lr is the largest (smallest), at most `max_extensions` times."""
    rnd = lambda x: float(f"{x:.3g}")  # noqa: E731
    up, down = max(factors + [1.0]), min(factors + [1.0])
    losses = {}
    for lr in sorted({rnd(center * f) for f in [1.0] + list(factors)}):
        losses[lr] = loss_at(lr)
    for _ in range(max_extensions):
        best = min(losses, key=losses.get)
        lrs = sorted(losses)
        if best == lrs[-1] and up > 1:
            new = rnd(best * up)
        elif best == lrs[0] and down < 1:
            new = rnd(best * down)
        else:
            break
        losses[new] = loss_at(new)
    return dict(sorted(losses.items()))


def sweep_lr(loss_at, grid, max_extensions: int = 3) -> dict:
    """{lr: loss} over `grid`, extended by factors of 2 while the best lr is at an end of it (at most
    `max_extensions` times): a winner at the edge of a grid says only that the grid was too narrow."""
    losses = {lr: loss_at(lr) for lr in sorted(grid)}
    for _ in range(max_extensions):
        best = min(losses, key=losses.get)
        lrs = sorted(losses)
        if best == lrs[-1]:
            new = best * 2
        elif best == lrs[0]:
            new = best / 2
        else:
            break
        losses[new] = loss_at(new)
    return dict(sorted(losses.items()))


def run(args: argparse.Namespace) -> dict:
    device = utils.resolve_device(args.device)
    horizons = _ints(args.horizons, "horizons")
    seeds = _ints(args.seeds, "seeds")
    factors = _floats(args.refine, "refine") if args.refine else []
    if any(f <= 0 for f in factors):
        raise ValueError(f"--refine takes positive factors, got {args.refine!r}")
    optims = _names(args.optims, "optims")
    final_optims = _names(args.final_optims, "final-optims") if args.final_optims else optims
    sweep_steps = args.sweep_steps or min(horizons)
    base = dict(converge.SIZES[args.size])
    base.pop("lr")
    env = utils.environment(device)
    config = dict(size=args.size, weight_decay=args.weight_decay, corpus_mb=args.corpus_mb,
                  backend=args.came_backend, device=env["device"])
    if args.model != "gpt":
        config["model"] = args.model
    os.makedirs(args.out, exist_ok=True)
    cache = RunCache(os.path.join(args.out, "study_runs.json"), config)
    train, val, _ = converge.stdlib_corpus(args.corpus_mb)

    def one(label, lr, steps, seed):
        got = cache.get(label, lr, steps, seed)
        if got is None:
            cfg = dict(base, steps=steps, eval_every=max(1, min(base["eval_every"], steps // 12)))
            got = converge.train_one(f"{label} {lr:g}", make_optimizer(label, lr, args.weight_decay, args.came_backend),
                                     train, val, cfg, device, seed, model=args.model,
                                     param_dtype=OPTIMIZERS[label][0].get("param_dtype"))
            got = {k: got[k] for k in ("val_step", "val_loss", "final_val_loss", "best_val_loss", "wall_s",
                                       "optimizer_s", "state_bytes", "params")}
            cache.put(label, lr, steps, seed, got)
        return got

    t0 = time.perf_counter()
    print(f"# study: {args.size} GPT, sweep {sweep_steps} steps seed 0; final runs {horizons} x seeds {seeds}; "
          f"on {env['device']}")
    # Labels whose "grid" names another label run at that label's best lr (no sweep of their own).
    follow = {label: OPTIMIZERS[label][1] for label in optims if isinstance(OPTIMIZERS[label][1], str)}
    missing = sorted({lead for lead in follow.values() if lead not in optims})
    if missing:
        raise ValueError(f"--optims: {', '.join(follow)} run at the best lr of {', '.join(missing)}; add it")
    sweep = {label: sweep_lr(lambda lr: one(label, lr, sweep_steps, 0)["best_val_loss"], OPTIMIZERS[label][1])
             for label in optims if label not in follow}
    best_lr = {label: min(losses, key=losses.get) for label, losses in sweep.items()}
    refine = {}
    if factors:  # the final lr from every seed's runs on a fine grid around the sweep winner
        for label in optims:
            if label in follow:
                continue
            refine[label] = refine_lr(lambda lr: statistics.fmean(one(label, lr, sweep_steps, s)["best_val_loss"]
                                                                  for s in seeds), best_lr[label], factors)
            best_lr[label] = min(refine[label], key=refine[label].get)
    for label, lead in follow.items():
        best_lr[label] = best_lr[lead]
        sweep[label] = {best_lr[lead]: one(label, best_lr[lead], sweep_steps, 0)["best_val_loss"]}
    final = {}
    for steps in horizons:
        for label in (optims if steps == sweep_steps else final_optims):
            final.setdefault(steps, {})[label] = [one(label, best_lr[label], steps, s) for s in seeds]
    payload = {"benchmark": "study", "env": env, "config": dict(config, model_config=base, sweep_steps=sweep_steps,
                                                                 horizons=horizons, seeds=seeds, refine=factors),
               "sweep": {k: {f"{lr:g}": v for lr, v in d.items()} for k, d in sweep.items()},
               "refine": {k: {f"{lr:g}": v for lr, v in d.items()} for k, d in refine.items()},
               "best_lr": best_lr, "final": {str(k): v for k, v in final.items()},
               "wall_s": time.perf_counter() - t0}
    path = utils.write_json(os.path.join(args.out, "study.json"), payload)
    print(f"# wrote {path}")
    if not args.no_plot:
        png = plot(payload, os.path.join(args.out, "study.png"))
        if png:
            print(f"# wrote {png}")
    print(table(payload))
    return payload


def table(payload: dict) -> str:
    lines = [f"lr sweep ({payload['config']['sweep_steps']} steps, seed 0), best validation loss per peak lr:", ""]
    for label, losses in payload["sweep"].items():
        won = min(losses, key=losses.get)  # the sweep's winner (the final lr too, unless --refine moved it)
        cells = ", ".join(f"{lr}: {v:.4f}" + (" *" if lr == won else "") for lr, v in losses.items())
        lines.append(f"- {label}: {cells}")
    lines.append("")
    if payload.get("refine"):
        seeds = payload["config"]["seeds"]
        lines += [f"fine grid ({payload['config']['sweep_steps']} steps), best validation loss per peak lr, mean "
                  f"over seeds {seeds}:", ""]
        for label, losses in payload["refine"].items():
            cells = ", ".join(f"{lr}: {v:.4f}" + (" *" if float(lr) == payload["best_lr"][label] else "")
                              for lr, v in losses.items())
            lines.append(f"- {label}: {cells}")
        lines.append("")
    rows = []
    for steps, per in payload["final"].items():
        adamw = per.get("AdamW")
        for label, runs in per.items():
            best = [r["best_val_loss"] for r in runs]
            mean = statistics.fmean(best)
            rows.append({"steps": int(steps), "optimizer": label, "lr": payload["best_lr"][label], "mean": mean,
                         "lo": min(best), "hi": max(best),
                         "vs": mean - statistics.fmean(r["best_val_loss"] for r in adamw) if adamw else float("nan"),
                         "state": runs[0]["state_bytes"] / runs[0]["params"]})
    lines.append(utils.markdown_table(rows, [
        ("steps", "steps", "d"), ("optimizer", "optimizer", ""), ("lr", "best lr", ".3g"),
        ("mean", "best val loss, mean", ".4f"), ("lo", "min", ".4f"), ("hi", "max", ".4f"),
        ("vs", "vs AdamW", "+.4f"), ("state", "state B/param", ".2f")]))
    seeds = payload["config"]["seeds"]
    lines.append(f"- mean, min and max over seeds {seeds}; val loss in nats/byte; each optimizer at the lr that won "
                 f"its {'fine grid' if payload.get('refine') else 'sweep'}; device: {payload['env']['device']}")
    return "\n".join(lines)


def plot(payload: dict, path: str):
    plt = utils.pyplot()
    if plt is None:
        return None
    horizons = list(payload["final"])
    fig, axes = plt.subplots(1, len(horizons), figsize=(6.5 * len(horizons), 4.2), squeeze=False)
    for ax, steps in zip(axes[0], horizons):
        los = []
        for label, runs in payload["final"][steps].items():
            for i, r in enumerate(runs):
                ax.plot(r["val_step"], r["val_loss"], color=COLORS.get(label), lw=1.4, alpha=0.9 if i == 0 else 0.45,
                        ls="-" if i == 0 else "--",
                        label=f"{label} (lr {payload['best_lr'][label]:.2g})" if i == 0 else None)
                los.append(min(r["val_loss"]))
        lo = min(los)
        ax.set_ylim(lo - 0.05, lo + 1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{steps} steps (solid: seed {payload['config']['seeds'][0]}, dashed: other seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    model = {"gpt": "GPT", "cnn": "conv net"}[payload["config"].get("model", "gpt")]
    fig.suptitle(f"Byte-level {model} ({payload['config']['size']}) on the Python stdlib; {payload['env']['device'][:50]}, "
                 f"commit {payload['env']['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main() and 0)
