"""Shared plumbing for the bench scripts: the optimizers under test, timing, memory, tables, JSON, plots.

Measurement methods (stated in every JSON under "methods"):
- ms/step: median over timed steps after warm-up. CUDA: one pair of CUDA events around each step, one sync
  at the end. CPU: time.perf_counter around each step.
- state bytes/param: the sum of ``nbytes`` of every tensor in ``optimizer.state`` (the real allocations,
  scalars such as ``step`` included) divided by the number of parameter elements.
- peak transient memory of one step: CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the
  memory allocated before it (params, grads and state already exist then), i.e. the temporaries. CPU: torch
  has no CPU allocator statistics and tracemalloc does not see torch's allocations, so we use the process's
  resident-set high-water mark: Linux VmHWM is reset through /proc/self/clear_refs before the step and read
  after it, minus VmRSS before it. glibc's mmap threshold is pinned to 64 KiB (mallopt) so freed temporaries
  go back to the OS instead of hiding in malloc's cache. Small (< 64 KiB) temporaries are below its noise.
- GB/s (CUDA): one-pass bytes per step (param read + write, grad read, state read + write) / time, against
  the device-to-device copy bandwidth measured in the same process (bytes read + written).
"""
from __future__ import annotations

import ctypes
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "out")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"


def git_commit() -> str:
    """HEAD's short hash, with '+dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    import came_kernels
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "device": device_name(device),
        "torch": torch.__version__,
        "came_kernels": came_kernels.__version__,
        "python": platform.python_version(),
        "backends": {k: (v or "available") for k, v in came_kernels.available_backends(device).items()},
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        pass
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give freed tensors back. On CPU `del` already freed them (refcounting); a full gc.collect costs ~0.3 s
    once torch and matplotlib are loaded, so it only runs where cached GPU blocks must be released."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# The optimizers under test
# ----------------------------------------------------------------------------------------------------------

@dataclass
class OptimSpec:
    """One row of a benchmark: a label and how to build the optimizer on a list of params."""
    name: str
    family: str  # "came", "adamw", "adafactor", "came-pytorch", "adamw8bit"
    make: Callable[..., torch.optim.Optimizer]


def optimizer_specs(device: torch.device, lr: float = 1e-4, weight_decay: float = 0.01,
                    came_lr: Optional[float] = None,
                    select: Optional[Sequence[str]] = None) -> Tuple[List[OptimSpec], Dict[str, str]]:
    """The optimizers that can run on `device`, fastest baseline first, and {name: why not} for the rest.

    came[<backend>] for every came_kernels backend available on the device (Triton on CPU only runs through
    its interpreter, a correctness tool, so it is listed as skipped), adamw[fused] and adamw[foreach],
    adafactor (torch.optim.Adafactor), came-pytorch (if installed) and adamw8bit[bnb] (bitsandbytes, CUDA);
    came-bf16m[<backend>] and came-int8m[<backend>] (momentum_dtype) only when `select` names them.
    `select`: names or fnmatch patterns ("came*") to keep; unknown names raise.
    """
    import came_kernels
    came_lr = lr if came_lr is None else came_lr
    specs: List[OptimSpec] = []
    skipped: Dict[str, str] = {}

    def add(name, family, make, why_not=None):
        if why_not is None:
            specs.append(OptimSpec(name, family, make))
        else:
            skipped[name] = why_not

    add("adamw[fused]", "adamw",
        lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay, fused=True))
    add("adamw[foreach]", "adamw",
        lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay, foreach=True))
    add("adafactor", "adafactor",
        lambda ps, lr=lr: torch.optim.Adafactor(ps, lr=lr, weight_decay=weight_decay))

    reasons = came_kernels.available_backends(device)

    def why_not(backend):
        if reasons.get(backend) is None and backend == "triton" and device.type == "cpu":
            return "Triton on CPU tensors runs only through TRITON_INTERPRET=1, a correctness tool, not a benchmark"
        return reasons.get(backend)

    for backend in ("cuda", "triton", "torch"):
        add(f"came[{backend}]", "came",
            lambda ps, lr=came_lr, b=backend: came_kernels.CAME(ps, lr=lr, weight_decay=weight_decay, backend=b),
            why_not(backend))

    # Opt-in low-precision momentum (momentum_dtype="bf16" / "int8"): rows only when `select` names them.
    if select:
        for md in ("bf16", "int8"):
            for backend in ("cuda", "triton", "torch"):
                name = f"came-{md}m[{backend}]"
                if any(_matches(name, pat) for pat in select):
                    add(name, "came",
                        lambda ps, lr=came_lr, b=backend, m=md: came_kernels.CAME(
                            ps, lr=lr, weight_decay=weight_decay, backend=b, momentum_dtype=m), why_not(backend))

    try:
        import came_pytorch
        add("came-pytorch", "came-pytorch",
            lambda ps, lr=came_lr: came_pytorch.CAME(ps, lr=lr, weight_decay=weight_decay))
    except ImportError as e:
        add("came-pytorch", "came-pytorch", None, f"not installed ({e}); pip install came-pytorch==0.1.3")

    if device.type != "cuda":
        add("adamw8bit[bnb]", "adamw8bit", None, "bitsandbytes 8-bit optimizers need CUDA tensors")
    else:
        try:
            import bitsandbytes as bnb
            add("adamw8bit[bnb]", "adamw8bit",
                lambda ps, lr=lr: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=weight_decay))
        except Exception as e:
            add("adamw8bit[bnb]", "adamw8bit", None, f"bitsandbytes not importable ({type(e).__name__})")

    if select:
        known = [s.name for s in specs] + list(skipped)
        for pat in select:
            if not any(_matches(n, pat) for n in known):
                raise SystemExit(f"--optim {pat!r} matches none of {known}")
        keep = lambda n: any(_matches(n, pat) for pat in select)  # noqa: E731
        specs = [s for s in specs if keep(s.name)]
        skipped = {n: why for n, why in skipped.items() if keep(n)}
    return specs, skipped


def _matches(name: str, pattern: str) -> bool:
    """Exact name, or a shell pattern where '*' and '?' are wildcards and brackets are literal ('came[*]')."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))


def make_params(shapes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> List[torch.Tensor]:
    """Leaf tensors of the given shapes (N(0, 0.02)) with N(0, 1e-3) grads attached."""
    # Generated in fp32 on the device itself, one tensor at a time (a 1.1B-param set drawn on the host would
    # take tens of seconds); the values differ between device types, which timing does not care about.
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype=dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen, device=device) * 1e-3).to(dtype=dtype)
        params.append(p)
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its state (the real allocations)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def state_dtypes(opt: torch.optim.Optimizer) -> Dict[str, str]:
    """{state key: dtype} of the non-scalar state tensors (e.g. to show fp32 momentum for bf16 params)."""
    out: Dict[str, str] = {}
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                out.setdefault(k, str(v.dtype).replace("torch.", ""))
    return out


# ----------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------

def time_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int,
               max_seconds: float = float("inf")) -> List[float]:
    """Run `step` warmup times, then up to `iters` timed times (stopping early after max_seconds, at least
    3 timed steps); return the per-step times in ms."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times: List[float] = []
    if device.type == "cuda":
        events = []
        t0 = time.perf_counter()
        for i in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            events.append((a, b))
            if i >= 2 and i % 5 == 4:  # bound the run without a sync per step
                torch.cuda.synchronize(device)
                if time.perf_counter() - t0 > max_seconds:
                    break
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in events]
    else:
        t_start = time.perf_counter()
        for i in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            if i >= 2 and time.perf_counter() - t_start > max_seconds:
                break
    return times


_MALLOPT_DONE = False


def time_round_robin(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int,
                     max_seconds: float = float("inf"), block: int = 1) -> Dict[str, Dict[str, List[float]]]:
    """Per-step times in ms of several step functions, interleaved: each round runs `block` steps of each in
    turn. Returns {name: {"warm": [...], "cold": [...]}}.

    Run one after another, a burst of load from another process lands on whichever optimizer happens to
    be timed then, and its number is wrong while the others look fine. Interleaved, every optimizer sees
    the same conditions. On a GPU an optimizer's first step after another's starts on an idle device, so
    its time includes the host work before its first kernel ("cold"); the following steps of the block
    overlap their host work with the previous step's kernels, as in training, where the step is queued
    behind the backward pass ("warm": the number reported). On a CPU there is no queue and block = 1.
    Stops after `iters` rounds, or after max_seconds once 3 rounds are done. CUDA: one pair of events around
    each step, a sync every 5 rounds to bound the run.
    """
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    synchronize(device)
    events: Dict[str, Dict[str, list]] = {name: {"warm": [], "cold": []} for name in steps}
    cuda = device.type == "cuda"
    block = max(1, block) if cuda else 1
    t_start = time.perf_counter()
    for i in range(iters):
        for name, fn in steps.items():
            for j in range(block):
                kind = "cold" if (block > 1 and j == 0) else "warm"
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    events[name][kind].append((a, b))
                else:
                    t0 = time.perf_counter()
                    fn()
                    events[name][kind].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and (not cuda or i % 5 == 4):
            synchronize(device)
            if time.perf_counter() - t_start > max_seconds:
                break
    synchronize(device)
    if cuda:
        return {name: {k: [a.elapsed_time(b) for a, b in ev] for k, ev in kinds.items()}
                for name, kinds in events.items()}
    return events


def load_average() -> Optional[float]:
    """1-minute load average per visible core (Linux/macOS), None where the OS has none."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


def _pin_malloc() -> None:
    """Make glibc return freed blocks >= 64 KiB to the OS (so RSS falls when temporaries are freed)."""
    global _MALLOPT_DONE
    if _MALLOPT_DONE:
        return
    _MALLOPT_DONE = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    except OSError:
        pass


_pin_malloc()  # at import, before the benchmarks allocate anything


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def cpu_peak_method_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_transient_bytes(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Extra memory one call of `step` needs beyond what is allocated before it (see module docstring);
    None when the platform offers no way to measure it."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    _pin_malloc()
    if not cpu_peak_method_available():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return cached free blocks, so the step must fault in new pages
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss0 = _proc_status_kib("VmRSS")
    step()
    hwm = _proc_status_kib("VmHWM")
    return max(0, (hwm - rss0) * 1024)


PEAK_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one step minus memory_allocated before it",
    "cpu": "process RSS high-water mark during one step (Linux VmHWM reset via /proc/self/clear_refs, glibc "
           "mmap threshold pinned at 64 KiB) minus RSS before it; torch has no CPU allocator stats",
}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20, iters: int = 20) -> float:
    """Device copy bandwidth in GB/s (bytes read + bytes written), measured with dst.copy_(src)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = time_steps(lambda: dst.copy_(src), device, warmup=3, iters=iters, max_seconds=5)
    del src, dst
    free_memory(device)
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------
# Output: tables, JSON, plots
# ----------------------------------------------------------------------------------------------------------

def fmt(v, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown_table(rows: List[dict], columns: List[Tuple[str, str, str]]) -> str:
    """rows: dicts; columns: (key, header, format spec). A GitHub-markdown table with aligned columns."""
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    numeric = [bool(spec) for _, _, spec in columns]  # text columns left-aligned, numbers right-aligned
    lines = []
    for j, row in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                                        for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 1) + (":" if numeric[i] else "-") for i, w in enumerate(widths))
                         + "|")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (plots are skipped, saying so) if not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install -e '.[bench]')", file=sys.stderr)
        return None


def progress(iterable=None, **kw):
    """tqdm when installed (to stderr), else the iterable unchanged."""
    try:
        from tqdm import tqdm
        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)
    except ImportError:
        return _NoTqdm(iterable)


class _NoTqdm:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def set_description(self, s):
        pass

    def close(self):
        pass

    def write(self, s):
        print(s, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass
