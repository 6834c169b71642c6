"""Does CAME train as well as AdamW? (`python -m bench converge`)

A small GPT (pre-LayerNorm blocks, causal attention, GELU MLP, tied embeddings) learns byte-level language
modelling of the Python standard library's own source files (sysconfig.get_paths()["stdlib"] of the running
interpreter: a real corpus that is on every machine, no download). Files are split into train and validation
by a hash of their path (every ~10th file is validation), so validation text is unseen code.

Every optimizer starts from the same initial weights and sees the same batches in the same order (fixed
seeds), for the same number of steps, under the same schedule (linear warm-up, cosine decay to 10%):
torch.optim.AdamW, torch.optim.Adafactor (at torch's default lr 1e-2) and came_kernels.CAME with the paper's betas (0.9, 0.999, 0.9999)
and a learning rate of --came-lr-ratio times AdamW's (the CAME paper and repo use 0.5-0.9x).

Output: validation loss at the size's evaluation interval (tqdm progress), <out>/converge.json, <out>/converge.png.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
import zlib
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import utils

SIZES = {
    # name: model and run sizes. tiny: the tests; small: CPU default (~1 min); medium: CUDA default.
    "tiny": dict(d=32, layers=1, heads=2, ctx=32, batch=4, steps=20, eval_every=10, eval_batches=2, lr=3e-3),
    "small": dict(d=128, layers=2, heads=4, ctx=128, batch=16, steps=300, eval_every=25, eval_batches=8, lr=2e-3),
    "medium": dict(d=384, layers=6, heads=6, ctx=256, batch=32, steps=2000, eval_every=100, eval_batches=20,
                   lr=1e-3),
}


# ----------------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------------

def stdlib_corpus(max_mb: float = 16.0) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes, info) from the stdlib's .py files, split by file (hash of the path).

    Files are read in sorted order; each split stops growing at its share of max_mb (90% / 10%)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise SystemExit(f"no .py files under the stdlib path {root}: cannot build the corpus")
    limit = {"train": max_mb * 0.9 * 2**20, "val": max_mb * 0.1 * 2**20}
    parts: Dict[str, List[bytes]] = {"train": [], "val": []}
    size = {"train": 0, "val": 0}
    nfiles = {"train": 0, "val": 0}
    for path in files:
        rel = os.path.relpath(path, root)
        split = "val" if zlib.crc32(rel.encode()) % 10 == 0 else "train"
        if size[split] >= limit[split]:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        parts[split].append(data + b"\n")
        size[split] += len(data) + 1
        nfiles[split] += 1
    to_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    info = {"root": root, "train_files": nfiles["train"], "val_files": nfiles["val"],
            "train_bytes": size["train"], "val_bytes": size["val"]}
    return to_tensor(parts["train"]), to_tensor(parts["val"]), info


def batch(data: torch.Tensor, ctx: int, bsz: int, gen: torch.Generator, device) -> Tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - ctx - 1, (bsz,), generator=gen)
    x = torch.stack([data[i:i + ctx + 1] for i in ix.tolist()]).long()
    x = x.to(device)
    return x[:, :-1], x[:, 1:]


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Byte-level GPT: 256-token vocabulary, learned positions, tied input/output embedding."""

    def __init__(self, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight"))
                                               else 1.0))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln(x) @ self.tok.weight.t()
        return F.cross_entropy(logits.float().view(-1, 256), targets.reshape(-1))


class ByteCNN(nn.Module):
    """A causal convolutional byte model (for conv weights: `bench study --model cnn`): per block, a
    dilated width-5 Conv1d to 2d channels, GELU and a 1x1 Conv1d back to d, residual; tied embedding."""

    def __init__(self, d: int, layers: int, heads: int = 0, ctx: int = 0, width: int = 5):
        super().__init__()
        self.width = width
        self.tok = nn.Embedding(256, d)
        self.norms = nn.ModuleList(nn.GroupNorm(1, d) for _ in range(layers))
        self.convs = nn.ModuleList(nn.Conv1d(d, 2 * d, width, dilation=2 ** i) for i in range(layers))
        self.mixes = nn.ModuleList(nn.Conv1d(2 * d, d, 1) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx).transpose(1, 2)  # [batch, d, time]
        for i, (norm, conv, mix) in enumerate(zip(self.norms, self.convs, self.mixes)):
            h = F.pad(norm(x), ((self.width - 1) * 2 ** i, 0))  # left padding only: causal
            x = x + mix(F.gelu(conv(h)))
        logits = self.ln(x.transpose(1, 2)) @ self.tok.weight.t()
        return F.cross_entropy(logits.float().view(-1, 256), targets.reshape(-1))


MODELS = {"gpt": TinyGPT, "cnn": ByteCNN}


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------

def optimizers(lr: float, came_ratio: float, adafactor_lr: float, wd: float, came_backend: str) -> Dict[str, tuple]:
    """{label: (factory, lr)} of the optimizers compared at equal steps."""
    import came_kernels
    came_lr = lr * came_ratio
    return {
        "AdamW": (lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.999), weight_decay=wd), lr),
        "Adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=adafactor_lr, weight_decay=wd), adafactor_lr),
        f"CAME[{came_backend}]": (lambda ps: came_kernels.CAME(ps, lr=came_lr, betas=(0.9, 0.999, 0.9999),
                                                                weight_decay=wd, backend=came_backend), came_lr),
    }


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: dict, device, seed: int, amp) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)  # the same validation batches at every evaluation
    losses = []
    for _ in range(cfg["eval_batches"]):
        x, y = batch(val, cfg["ctx"], cfg["batch"], gen, device)
        with amp():
            losses.append(model(x, y).item())
    model.train()
    return sum(losses) / len(losses)


def train_one(label: str, make_opt, train: torch.Tensor, val: torch.Tensor, cfg: dict, device, seed: int,
              model: str = "gpt", param_dtype=None) -> dict:
    """One training run. `param_dtype` (e.g. torch.bfloat16): the whole model in that dtype, its params and
    grads included (no fp32 master weights); default: fp32."""
    torch.manual_seed(seed)
    model = MODELS[model](cfg["d"], cfg["layers"], cfg["heads"], cfg["ctx"]).to(device)
    if param_dtype is not None:  # initialized in fp32 as every other run, then rounded once
        model = model.to(param_dtype)
    opt = make_opt(list(model.parameters()))
    steps, warm = cfg["steps"], max(1, cfg["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    use_amp = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else (lambda: torch.autocast("cpu", enabled=False))
    gen = torch.Generator().manual_seed(seed)  # the same training batches for every optimizer
    out = {"train_step": [], "train_loss": [], "val_step": [], "val_loss": []}
    opt_time = 0.0
    t0 = time.perf_counter()
    bar = utils.progress(range(1, steps + 1), desc=f"{label:>14s}", unit="step", leave=True)
    for s in bar:
        x, y = batch(train, cfg["ctx"], cfg["batch"], gen, device)
        with amp():
            loss = model(x, y)
        loss.backward()
        utils.synchronize(device)
        t_opt = time.perf_counter()
        opt.step()
        utils.synchronize(device)
        opt_time += time.perf_counter() - t_opt
        opt.zero_grad(set_to_none=True)
        sched.step()
        out["train_step"].append(s)
        out["train_loss"].append(loss.item())
        if s % cfg["eval_every"] == 0 or s == steps:
            out["val_step"].append(s)
            out["val_loss"].append(evaluate(model, val, cfg, device, seed, amp))
            bar.set_postfix_str(f"train {loss.item():.3f} val {out['val_loss'][-1]:.3f}")
    bar.close()
    out.update(wall_s=time.perf_counter() - t0, optimizer_s=opt_time, final_val_loss=out["val_loss"][-1],
               best_val_loss=min(out["val_loss"]), params=sum(p.numel() for p in model.parameters()),
               state_bytes=utils.state_bytes(opt))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="model/run size (default: medium on CUDA, small on CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: that of --size)")
    p.add_argument("--lr", type=float, default=None, help="AdamW and Adafactor peak lr (default: that of --size)")
    p.add_argument("--came-lr-ratio", type=float, default=0.5, help="CAME lr / AdamW lr (default: %(default)s)")
    p.add_argument("--adafactor-lr", type=float, default=1e-2,
                   help="torch.optim.Adafactor peak lr (default: torch's own default, %(default)s; it has no "
                        "momentum and trained far slower at AdamW's lr in a check)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="for every optimizer (default: %(default)s)")
    p.add_argument("--came-backend", default="auto", help="came_kernels backend (default: auto)")
    p.add_argument("--corpus-mb", type=float, default=16.0, help="corpus size cap in MB (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model init and the batch order; every optimizer gets the same (default: 0)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    p.add_argument("--out", default=utils.DEFAULT_OUT, help="output directory (default: bench/out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run(args: argparse.Namespace) -> dict:
    device = utils.resolve_device(args.device)
    size = args.size or ("medium" if device.type == "cuda" else "small")
    cfg = dict(SIZES[size])
    if args.steps:
        cfg["steps"] = args.steps
        cfg["eval_every"] = max(1, min(cfg["eval_every"], args.steps // 4 or 1))
    lr = args.lr or cfg.pop("lr")
    cfg.pop("lr", None)
    torch.manual_seed(args.seed)
    train, val, corpus = stdlib_corpus(args.corpus_mb)
    env = utils.environment(device)
    print(f"# converge: byte-level GPT d={cfg['d']} layers={cfg['layers']} ctx={cfg['ctx']} batch={cfg['batch']}, "
          f"{cfg['steps']} steps, on {env['device']}")
    print(f"#   corpus: {corpus['train_files']} train files ({corpus['train_bytes'] / 2**20:.1f} MB), "
          f"{corpus['val_files']} validation files ({corpus['val_bytes'] / 2**20:.1f} MB) from {corpus['root']}")
    runs = {}
    for label, (make, opt_lr) in optimizers(lr, args.came_lr_ratio, args.adafactor_lr, args.weight_decay,
                                                          args.came_backend).items():
        runs[label] = train_one(label, make, train, val, cfg, device, args.seed)
        runs[label]["lr"] = opt_lr
    payload = {"benchmark": "converge", "env": env, "size": size, "config": cfg, "lr": lr,
               "came_lr_ratio": args.came_lr_ratio, "adafactor_lr": args.adafactor_lr,
               "weight_decay": args.weight_decay, "seed": args.seed,
               "corpus": corpus, "schedule": "linear warm-up over 10% of steps, cosine decay to 10% of peak",
               "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    path = utils.write_json(os.path.join(args.out, "converge.json"), payload)
    if not args.no_plot:
        png = plot(payload, os.path.join(args.out, "converge.png"))
        if png:
            print(f"# wrote {png}")
    print(f"# wrote {path}")
    print(table(payload))
    return payload


def table(payload: dict) -> str:
    rows = [{"optimizer": k, "lr": r["lr"], "final": r["final_val_loss"], "best": r["best_val_loss"],
             "state_kib": r["state_bytes"] / 1024, "opt_s": r["optimizer_s"], "wall": r["wall_s"]}
            for k, r in payload["runs"].items()]
    cfg = payload["config"]
    return "\n".join([
        utils.markdown_table(rows, [("optimizer", "optimizer", ""), ("lr", "peak lr", ".2g"),
                                    ("final", "final val loss", ".4f"), ("best", "best val loss", ".4f"),
                                    ("state_kib", "state KiB", ".0f"), ("opt_s", "optimizer s", ".1f"),
                                    ("wall", "wall s", ".1f")]),
        f"- byte-level GPT, {next(iter(payload['runs'].values()))['params'] / 1e6:.2f}M params, d={cfg['d']}, "
        f"{cfg['layers']} layers, ctx {cfg['ctx']}, batch {cfg['batch']}, {cfg['steps']} steps, seed {payload['seed']}; "
        f"val loss in nats/byte over {cfg['eval_batches']} fixed batches; {payload['schedule']}; "
        f"device: {payload['env']['device']}"])


def plot(payload: dict, path: str):
    plt = utils.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (label, r), color in zip(payload["runs"].items(), ["tab:blue", "tab:green", "tab:red", "tab:orange"]):
        k = max(1, len(r["train_loss"]) // 50)  # moving average of the training loss
        sm = [sum(r["train_loss"][max(0, i - k + 1):i + 1]) / len(r["train_loss"][max(0, i - k + 1):i + 1])
              for i in range(len(r["train_loss"]))]
        ax.plot(r["train_step"], sm, color=color, alpha=0.3, lw=1)
        ax.plot(r["val_step"], r["val_loss"], color=color, marker="o", ms=3, lw=1.5,
                label=f"{label} (lr {r['lr']:.2g}): val {r['final_val_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte); faint: train, moving avg")
    lo = min(min(r["val_loss"]) for r in payload["runs"].values())
    ax.set_ylim(lo - 0.1, max(lo + 1.5, 2.0))
    cfg = payload["config"]
    ax.set_title(f"Byte-level GPT (d={cfg['d']}, {cfg['layers']} layers) on the Python stdlib, "
                 f"{cfg['steps']} steps\n{payload['env']['device'][:60]}, commit {payload['env']['commit']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench converge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main() and 0)
