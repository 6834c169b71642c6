"""Compile every Triton kernel of came_kernels for real GPUs, on a machine without one.

Run as a script in a process where TRITON_INTERPRET is NOT set (tests/test_triton_compile.py does that).
The interpreter that CI runs the kernels through is lenient; the compiler is not (types of names bound in
both branches of a runtime `if`, constexpr rules, pointer casts, layouts). Triton ships its own ptxas, so
ASTSource -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin runs for sm_80 and sm_90 with no driver. Then the
bundled cuobjdump reports each kernel's registers, spills and shared memory: the compiler's resource
report, without a GPU. The PTX must hold no flush-to-zero (.ftz) instruction.

Usage: python tests/triton_aot_check.py [--archs 80,90] [--kernels _sq_stats_kernel,...] -> prints one line per
kernel variant, exits 1 on any compile error, register spill or .ftz instruction.
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: this compiles for GPUs"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile  # noqa: E402

mt = importlib.import_module("came_kernels.triton_kernels.multi_tensor")
LAYOUT = dict(ROWS=mt.ROWS, BLOCK_N=mt.BLOCK_N, SLAB_N=mt.SLAB_N, FLAT_CHUNK=mt.FLAT_CHUNK, FLAT_BLOCK=mt.FLAT_BLOCK,
              FIN_STRIPES=mt.FIN_STRIPES, FIN_COLS=mt.FIN_COLS, FIN_MEAN=mt.FIN_MEAN, BLOCK=256)
# Kernels launched with read_block_n(DTYPE) columns per tile (they only read g), not BLOCK_N.
READ_ONLY = {"_sq_stats_kernel", "_clip_stats_kernel"}
POINTERS = {"meta": "*i64", "blocks": "*i64", "fin_blocks": "*i64", "ws": "*fp32", "stats": "*fp32",
            "lr_ptr": "*fp32", "amp": "*fp32", "bias_scales": "*fp32", "rng": "*i64", "qmax": "*i32",
            "qold": "*fp32", "dmeta": "*i64", "sums": "*fp32", "wsd": "*fp64"}
# (module, kernel, num_warps, variants of the constexprs that are not layout constants)
KERNELS = [
    ("sq_stats", "_sq_stats_kernel", mt.NUM_WARPS, "dtype+tiled"),
    ("sq_stats", "_sq_finalize_kernel", mt.FIN_WARPS, None),
    ("clip_stats", "_clip_stats_kernel", mt.NUM_WARPS, "dtype"),
    ("clip_stats", "_clip_finalize_kernel", 4, None),
    ("momentum_res", "_momentum_res_kernel", mt.NUM_WARPS, "dtype+maximize+tiled"),
    ("momentum_res", "_res_finalize_kernel", mt.FIN_WARPS, None),
    ("param_step", "_param_step_kernel", mt.NUM_WARPS, "dtype"),
]
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def variants(kind):
    if kind is None:
        return [{}]
    out = [{"DTYPE": d} for d in DTYPES.values()]
    if "maximize" in kind:
        out = [dict(v, MAXIMIZE=m) for v in out for m in (False, True)]
    if "tiled" in kind:  # TILED: the plan has stripes of several row tiles (groups over ~1e9 params)
        out = [dict(v, TILED=m) for v in out for m in (False, True)]
    return out


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    got = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return got


def rsqrt_calls() -> list:
    """Every tl.rsqrt call in the kernels' sources, as file:line: it must be the one in came_math._rsqrt."""
    root = os.path.dirname(mt.__file__)
    return [f"{name}:{i}" for name in sorted(os.listdir(root)) if name.endswith(".py")
            for i, line in enumerate(open(os.path.join(root, name)), 1) if "tl.rsqrt(" in line]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--kernels", default="", help="only these kernels (comma-separated names)")
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    only = set(filter(None, args.kernels.split(",")))
    failures = 0
    calls = rsqrt_calls()
    if len(calls) != 1 or not calls[0].startswith("came_math.py:"):
        failures += 1
        print(f"FAIL tl.rsqrt is called outside came_math._rsqrt (it flushes subnormal inputs): {calls}")
    for mod_name, kname, num_warps, kind in KERNELS:
        if only and kname not in only:
            continue
        fn = getattr(importlib.import_module(f"came_kernels.triton_kernels.{mod_name}"), kname)
        amp = [dict(v, AMP=False) for v in variants(kind)]
        if "AMP" in fn.arg_names:  # the GradScaler path, for one dtype (it adds a load and a multiply)
            amp.append(dict(amp[0], AMP=True))
        extras = amp if "AMP" in fn.arg_names else variants(kind)
        if "BIAS" in fn.arg_names:  # the bias correction, for one dtype (one more load and multiply)
            extras = [dict(v, BIAS=False) for v in extras] + [dict(extras[0], BIAS=True)]
        if "MAXIMIZE" in fn.arg_names and not (kind and "maximize" in kind):
            extras = [dict(v, MAXIMIZE=False) for v in extras]
        if "LOWBIT" in fn.arg_names:  # the opt-in bf16 (1) and int8 (2) momentum bodies, fp32 and bf16 params
            base = [dict(v, LOWBIT=0) for v in extras]
            extras = base + [dict(base[i], LOWBIT=lb) for lb in (1, 2) for i, v in enumerate(base)
                             if v.get("DTYPE") in (tl.float32, tl.bfloat16) and not v.get("AMP")
                             and not v.get("BIAS") and not v.get("TILED") and not v.get("MAXIMIZE")]
        if "ROUNDING" in fn.arg_names:  # param_rounding of bf16 params: stochastic, kahan
            extras = [dict(v, ROUNDING=0) for v in extras] + [
                dict(v, ROUNDING=r) for v in extras if v.get("DTYPE") == tl.bfloat16 and v.get("LOWBIT")
                for r in (1, 2)]
        if "PACKED" in fn.arg_names:  # plans with packed small matrices (conv weights), per dtype
            extras = [dict(v, PACKED=False) for v in extras] + [
                dict(v, PACKED=True) for v in extras if not any(v.get(f) for f in ("AMP", "BIAS", "TILED", "MAXIMIZE",
                                                                                   "LOWBIT", "ROUNDING"))]
        if "NPADS" in fn.arg_names:  # phase 1 of fused plans: each in-register width alone (fp32, bf16, tiled
            # or not), then a launch with every other body (all widths but the widest, wide rows, packed)
            base = [dict(v, FUSED=False, NPADS=0, WIDE=True) for v in extras]
            one = [v for v in base if v["DTYPE"] in (tl.float32, tl.bfloat16) and not v.get("AMP")
                   and not v.get("PACKED")]
            extras = base + [dict(v, FUSED=True, NPADS=1 << i, WIDE=False) for i in range(len(mt.NPAD_SIZES))
                             for v in one] + [dict(base[0], FUSED=True, NPADS=2 ** (len(mt.NPAD_SIZES) - 1) - 1,
                                                   WIDE=True, PACKED=True)]  # (the widest launches alone)
        for flag in ("CLIP", "FUSED"):  # the finalize kernels of fused plans (W = P / c; the clip from W)
            if flag in fn.arg_names and "NPADS" not in fn.arg_names:
                extras = [dict(v, **{flag: False}) for v in extras] + [dict(extras[0], **{flag: True})]
        if "MODE" in fn.arg_names:  # finalize kernels: whole tensors, and the two halves for sharded ones
            extras = [dict(v, MODE=0) for v in extras] + [dict(extras[0], MODE=m) for m in (1, 2)]
        for extra in extras:
            constexprs = {n: v for n, v in LAYOUT.items() if n in fn.arg_names}
            constexprs.update(extra)
            if kname in READ_ONLY:
                constexprs["BLOCK_N"] = mt.read_block_n(extra["DTYPE"])
            if "NUM_STAGES" in fn.arg_names:  # the pipeline depth the launch passes
                constexprs["NUM_STAGES"] = mt.STAGES["finalize" if "finalize" in kname else mod_name]
            if "REG_STAGES" in fn.arg_names:  # (phase 1's in-register bodies)
                constexprs["REG_STAGES"] = mt.STAGES["sq_rows"]
            signature = {n: ("constexpr" if n in constexprs else POINTERS.get(n, "fp32")) for n in fn.arg_names}
            label = f"{kname}[{','.join(f'{k}={v}' for k, v in extra.items())}]"
            for arch in archs:
                try:
                    options = {"num_warps": num_warps}
                    if kname == "_momentum_res_kernel" and extra.get("LOWBIT") != 2:  # the launch's register cap
                        options["maxnreg"] = importlib.import_module(
                            "came_kernels.triton_kernels.momentum_res").MAXNREG
                    k = triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                       target=GPUTarget("cuda", arch, 32), options=options)
                    res = resources(k.asm["cubin"])
                except Exception as e:  # report every failure, then fail once
                    failures += 1
                    print(f"FAIL sm_{arch} {label}: {type(e).__name__}: {str(e)[:2000]}")
                    continue
                spill = res.get("LOCAL", 0) + res.get("STACK", 0)
                flag = "  SPILLS" if spill else ""
                failures += bool(spill)
                # Flush-to-zero instructions turn subnormal inputs into 0 (rsqrt.approx.ftz of a tiny statistic
                # is inf, then NaN), unlike torch and the CUDA extension. tl.rsqrt compiles to one; it is
                # allowed because its only call (checked by rsqrt_calls) scales subnormals into range first.
                ftz = sorted(set(re.findall(r"\b[a-z0-9]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*", k.asm["ptx"]))
                             - {"rsqrt.approx.ftz.f32"})
                if ftz:
                    failures += 1
                    flag += f"  FLUSHES SUBNORMALS: {', '.join(ftz)}"
                # Triton's shared memory is dynamic: the cubin's static figure does not show it.
                print(f"ok   sm_{arch} {label}: {res.get('REG')} regs, {k.metadata.shared} B shared, "
                      f"{spill} B local/stack{flag}")
    print(f"{'FAILED' if failures else 'all compiled'}: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
