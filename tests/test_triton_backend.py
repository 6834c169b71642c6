"""backend="triton" on its own: each phase against a float64 computation, the multi-tensor tables, 64-bit
offsets, 16-byte loads in the compiled code, rounding, caching and refusals.

tests/test_fused_backends.py runs the whole step against the torch backend, came-pytorch and the oracle for
every fused backend; this file proves what is particular to the Triton kernels. Without a GPU it runs them
through Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported; so does the line below, for running this file alone). Shapes stay small: the interpreter costs
about 5-10 ms per program.
"""
import math
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from came_kernels.backends import torch_backend, triton_backend  # noqa: E402
from came_testing import backend_step, new_state, state_lists  # noqa: E402
from oracle import OracleCAME, assert_close_rel, rel_err  # noqa: E402

if triton_backend.unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None:
    pytest.skip(f"backend='triton' unavailable: {triton_backend.unavailable_reason(torch.device('cpu'))}",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from came_kernels import triton_kernels as tk  # noqa: E402
from came_kernels.triton_kernels.came_math import _round_to  # noqa: E402
from came_kernels.triton_kernels import multi_tensor as mt  # noqa: E402
from came_kernels.triton_kernels.clip_stats import _clip_stats_kernel  # noqa: E402
from came_kernels.triton_kernels.momentum_res import _momentum_res_kernel  # noqa: E402
from came_kernels.triton_kernels.param_step import _param_step_kernel  # noqa: E402
from came_kernels.triton_kernels.sq_stats import _sq_stats_kernel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
         weight_decay=0.1, maximize=False)
NAN = float("nan")


_state, _lists = new_state, state_lists


def _step(mod, ps, gs, sts, cache=None, **kw):
    backend_step(mod, ps, gs, sts, cache, hyper=H, **kw)


# ------------------------------------------------------------------ float64 reference, one phase at a time
def _ref_phases(p, g, st, *, lr, beta1, beta2, beta3, eps1, eps2, clip_threshold, weight_decay, maximize):
    """The spec's phases in float64 from one state; returns what each phase leaves behind."""
    d = {k: v.double().cpu() for k, v in st.items()}
    p, g = p.double().cpu(), g.double().cpu()
    g = -g if maximize else g
    out = {}
    if p.ndim >= 2:
        sq = g * g
        out["r"] = beta2 * d["r"] + (1 - beta2) * (sq.mean(-1) + eps1)
        out["c"] = beta2 * d["c"] + (1 - beta2) * (sq.mean(-2) + eps1)
        out["mean_r"] = out["r"].mean(-1)
        u = g * (out["r"] / out["mean_r"][..., None]).rsqrt()[..., None] * out["c"].rsqrt()[..., None, :]
    else:
        out["v"] = beta2 * d["v"] + (1 - beta2) * (g * g + eps1)
        u = g * out["v"].rsqrt()
    out["div"] = max(1.0, math.sqrt(float((u * u).mean())) / clip_threshold)
    u_hat = u / out["div"]
    out["m"] = beta1 * d["m"] + (1 - beta1) * u_hat
    if p.ndim >= 2:
        res = (u_hat - out["m"]) ** 2
        out["R"] = beta3 * d["R"] + (1 - beta3) * (res.mean(-1) + eps2)
        out["C"] = beta3 * d["C"] + (1 - beta3) * (res.mean(-2) + eps2)
        out["mean_R"] = out["R"].mean(-1)
        update = out["m"] * (out["R"] / out["mean_R"][..., None]).rsqrt()[..., None] * out["C"].rsqrt()[..., None, :]
    else:
        update = out["m"]
    out["p"] = p - lr * weight_decay * p - lr * update
    return out


# Every shape class, stripes and chunks: ragged (37x53, 129x5: 3 stripes of 64 rows), 1xN, Nx1, 1x1, 0-d,
# 3-D and 4-D batches, a flat tensor of two chunks, and widths that allow 16-byte loads (N % 8 == 0) or not.
PHASE_SHAPES = [(), (7,), (1, 33), (33, 1), (1, 1), (37, 53), (129, 5), (130, 8), (3, 5, 7), (2, 3, 4, 8),
                (20000,)]


@pytest.mark.parametrize("fused", [True, False], ids=["clip-in-phase1", "clip-in-phase2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_phase_matches_float64_with_poisoned_workspace_and_stats(dtype, fused, monkeypatch):
    gen = torch.Generator().manual_seed(10)
    # + rows for the in-register widths 256 and 1024, and rows wider than the widest (cut to 1024 here, so
    # that the interpreter stays quick): in a fused plan their clip sum still comes from phase 2; 40 x 200:
    # both halves of phase 3's slabs (the second ragged) over two slabs (the second ragged)
    monkeypatch.setattr(mt, "NPAD_SIZES", mt.NPAD_SIZES[:3])
    shapes = PHASE_SHAPES + [(5, 200), (9, 300), (2, 1100), (40, 200)]
    ps = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
    # Gradient scales apart by 100x: some tensors get clipped (divisor > 1), others not.
    gs = [(torch.randn(s, generator=gen) * (30.0 if i % 2 else 0.3)).to(DEV, dtype) for i, s in enumerate(shapes)]
    sts = [_state(p, gen) for p in ps]
    refs = [_ref_phases(p, g, st, **H) for p, g, st in zip(ps, gs, sts)]
    plan = tk.build_plan(ps, gs, *_lists(sts), fused=fused)
    assert set(plan.vec) == {0, 1}, "both the 16-byte and the scalar kernel bodies must run here"
    if fused:  # every in-register width class of these shapes (the widest in a launch of its own), and phase 2
        # for the wide one only
        assert plan.fused and plan.wide and plan.npads == 0b111 and plan.n_clip_blocks == 1
        assert plan.n_blocks_big == 1 and plan.n_blocks1 + 1 == plan.n_blocks
    else:
        assert not plan.fused and plan.npads == 0 and plan.n_clip_blocks == plan.n_tile_blocks
    ws = torch.full((plan.ws_floats,), NAN, device=DEV)
    stats = torch.full((plan.stats_floats,), NAN, device=DEV)
    wsd = torch.full((plan.w_doubles,), NAN, dtype=torch.float64, device=DEV)
    meta = plan.meta.cpu()

    def stat(t, col, k=0):
        return stats[int(meta[t, col]) + k].item()

    tk.sq_stats(plan, ws, stats, beta2=H["beta2"], eps1=H["eps1"], wsd=wsd)
    for t, (p, st, ref) in enumerate(zip(ps, sts, refs)):
        for k in ("r", "c", "v"):
            if k in st:
                assert_close_rel(st[k], ref[k], 2e-6, f"phase 1 {k} of {tuple(p.shape)}")
        if p.ndim >= 2 and not meta[t, int(mt.C_PACK)]:
            got = torch.tensor([stat(t, int(mt.C_STAT), b) for b in range(ref["mean_r"].numel())])
            assert_close_rel(got, ref["mean_r"].flatten(), 2e-6, f"phase 1 mean_M(r) of {tuple(p.shape)}")
        elif p.ndim >= 2:  # packed (3-D and 4-D here): no means kept, the clip divisor is its only slot
            assert meta[t, int(mt.C_DIV)] == meta[t, int(mt.C_STAT)]
    assert plan.packed == fused  # phase 2 has no packed body

    if not fused:  # each phase must write every workspace slot it reads back (fused: phase 1 writes the
        ws.fill_(NAN)  # block sums that clip_stats' finalize reads; ws and wsd were poisoned before it ran)
    tk.clip_stats(plan, ws, stats, clip_threshold=H["clip_threshold"], wsd=wsd)
    divs = [stat(t, int(mt.C_DIV)) for t in range(len(ps))]
    assert any(x > 1 for x in divs) and any(x == 1 for x in divs)
    for p, got, ref in zip(ps, divs, refs):
        assert got == pytest.approx(ref["div"], rel=1e-5), f"phase 2 clip divisor of {tuple(p.shape)}"

    ws.fill_(NAN)
    tk.momentum_res(plan, ws, stats, beta1=H["beta1"], beta3=H["beta3"], eps2=H["eps2"], maximize=False)
    for t, (p, st, ref) in enumerate(zip(ps, sts, refs)):
        for k in ("m", "R", "C"):
            if k in st:
                assert_close_rel(st[k], ref[k], 1e-5, f"phase 3 {k} of {tuple(p.shape)}")
        if p.ndim >= 2 and not meta[t, int(mt.C_PACK)]:
            B = ref["mean_R"].numel()
            got = torch.tensor([stat(t, int(mt.C_STAT), B + b) for b in range(B)])  # after mean_M(r)[B]
            assert_close_rel(got, ref["mean_R"].flatten(), 1e-5, f"phase 3 mean_M(R) of {tuple(p.shape)}")

    p0 = [p.double().cpu() for p in ps]
    tk.param_step(plan, stats, torch.tensor([H["lr"]], device=DEV), weight_decay=H["weight_decay"])
    for p, before, ref in zip(ps, p0, refs):
        assert p.dtype == dtype
        # Rounded once to the param dtype: within one ulp of the float64 result (relative to max|p|).
        assert_close_rel(p, ref["p"], torch.finfo(dtype).eps, f"phase 4 p of {tuple(p.shape)}")
        if dtype == torch.float32:  # the step itself (lr*update ~ 1e-2) to 1e-4 of its size
            assert_close_rel(p.double().cpu() - before, ref["p"] - before, 1e-4, f"phase 4 step of {tuple(p.shape)}")


# ------------------------------------------------------------------ tables and workspace
def _covered(plan, shapes, phase1=False):
    """Element counts per tensor as the block table (phase1: phase 1's) claims them: every element must appear
    exactly once."""
    meta = plan.meta.cpu()
    blocks = torch.cat([plan.blocks1, plan.blocks_big]).cpu() if phase1 else plan.blocks.cpu()
    hits = [torch.zeros(math.prod(s), dtype=torch.int32) for s in shapes]
    for t, local in blocks.tolist():
        M, N, numel, tiles, pack = (int(meta[t, int(c)]) for c in (mt.C_NROWS, mt.C_NCOLS, mt.C_NUMEL,
                                                                     mt.C_TILES1 if phase1 else mt.C_TILES, mt.C_PACK))
        if pack:  # whole matrices: pack_matrices(pack) of them per block
            k = mt.pack_matrices(pack)
            hits[t][local * k * M * N:min((local + 1) * k, numel // (M * N)) * M * N] += 1
        elif M > 0:
            rows = tiles * mt.ROWS  # a stripe: `tiles` row tiles of ROWS rows
            per = -(-M // rows)
            b = local // per
            row0 = b * M + (local - b * per) * rows
            row_end = min(row0 + rows, (b + 1) * M)
            hits[t][row0 * N:row_end * N] += 1
        else:
            hits[t][local * mt.FLAT_CHUNK:(local + 1) * mt.FLAT_CHUNK] += 1
    return hits


@pytest.mark.parametrize("pack", [True, False])
def test_block_table_covers_every_element_once_and_workspace_is_numel_over_rows(pack):
    # pack: 3-D tensors of small matrices in packed blocks (several whole matrices each), else stripes.
    shapes = PHASE_SHAPES + [(200, 3), (5, 64, 2), (40000,), (1, 1, 1), (5000, 1, 1), (300, 3, 3)]
    ps = [torch.zeros(s) for s in shapes]
    sts = [_state(p) for p in ps]
    plan = tk.build_plan(ps, ps, *_lists(sts), pack=pack)
    packed = [bool(pack and mt.pack_size(p)) for p in ps]
    assert plan.packed == pack and sum(mt.pack_size(p) > 0 for p in ps) >= 3
    for s, h in zip(shapes, _covered(plan, shapes)):
        assert torch.equal(h, torch.ones_like(h)), f"{s}: elements covered {h.unique().tolist()} times"
    def cdiv(a, b):
        return -(-a // b)

    # (B, M, N) of the striped factored tensors (packed ones write no column partials and have no finalize)
    factored = [(math.prod(s[:-2]), s[-2], s[-1]) for s, pk in zip(shapes, packed) if len(s) >= 2 and not pk]
    # Column partials: one float per stripe and column, each tensor's padded to 4 floats (16 bytes).
    colpart = sum(cdiv(B * cdiv(M, mt.ROWS) * N, 4) * 4 for B, M, N in factored)
    # Then the clip partials P at the same offsets, and the block sums (phase 1's for flat and packed tensors)
    # after them; phase 1's W = P / c of the stripe tensors in fp64, one per column.
    assert plan.fused and plan.ws_floats == 2 * colpart + plan.n_tile_blocks
    assert plan.w_doubles == sum(B * N for B, M, N in factored)
    unfused = tk.build_plan(ps, ps, *_lists(sts), pack=pack, fused=False)
    every = [(math.prod(s[:-2]), s[-2], s[-1]) for s in shapes if len(s) >= 2]  # unfused: nothing packed
    assert not unfused.packed and unfused.w_doubles == 1
    assert unfused.ws_floats == max(sum(cdiv(B * cdiv(M, mt.ROWS) * N, 4) * 4 for B, M, N in every), unfused.n_blocks)
    # Finalize programs: cdiv(B*N, FIN_COLS) column programs + one per matrix, per factored tensor.
    fin = sum(cdiv(B * N, mt.FIN_COLS) + B for B, M, N in factored)
    assert plan.n_fin == fin


def _llama_shapes(d, ff, vocab, kv, layers):
    shapes = [(vocab, d)] + [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)] * layers
    return shapes + [(d,), (vocab, d)]


def _meta_plan(shapes):
    """A plan built on meta tensors: shapes and no storage (host work only, nothing allocated)."""
    ps = [torch.empty(s, device="meta") for s in shapes]
    return ps, tk.build_plan(ps, ps, *_lists([_state(p) for p in ps]))


def _stripes(plan, ps, tiles=None):
    """Blocks of a plan: stripes of _tensor_tiles(M, tiles or plan.tiles) row tiles, flat chunks."""
    tiles = plan.tiles if tiles is None else tiles
    return sum(math.prod(p.shape[:-2]) * -(-p.shape[-2] // (mt.ROWS * mt._tensor_tiles(p.shape[-2], tiles)))
               if p.ndim >= 2 else -(-p.numel() // mt.FLAT_CHUNK) for p in ps)


@pytest.mark.parametrize("model, numel, tiles, tiles1", [("tinyllama", 1_100_048_384, 2, 3),
                                                          ("llama7b", 6_738_415_616, 8, 16)])
def test_workspace_stays_under_64_mib_at_any_model_size(model, numel, tiles, tiles1):
    # TinyLlama-1.1B (bench/shapes.py) and LLaMA-7B shapes, host-side only. One stripe of ROWS rows per block
    # would need numel/64 floats of column partials in phase 3 (66 MiB, 421 MB), twice that in phase 1 (Q
    # and P); stripes of several row tiles keep each phase's partials (phase 1: with the block sums and the
    # fp64 W) under WS_CAP_FLOATS, and each count chosen is the smallest that does.
    shapes = (_llama_shapes(2048, 5632, 32000, 256, 22) if model == "tinyllama"
              else _llama_shapes(4096, 11008, 32000, 4096, 32))
    ps, plan = _meta_plan(shapes)
    assert sum(p.numel() for p in ps) == numel
    assert (plan.tiles, plan.tiles1) == (tiles, tiles1)
    assert 4 * plan.ws_floats + 8 * plan.w_doubles <= 64 * 2 ** 20 == 4 * mt.WS_CAP_FLOATS
    mats = [(1, s[0], s[1]) for s in shapes if len(s) == 2]

    def colpart(t):
        return sum(mt._colpart_floats(B, M, N, t) for B, M, N in mats)
    assert colpart(tiles - 1) + 2 * plan.w_doubles > mt.WS_CAP_FLOATS  # the smallest counts
    assert 2 * colpart(tiles1 - 1) + plan.n_tile_blocks + 2 * plan.w_doubles > mt.WS_CAP_FLOATS
    assert plan.n_blocks == _stripes(plan, ps)
    assert plan.n_blocks1 + plan.n_blocks_big == _stripes(plan, ps, plan.tiles1)
    # Phases 2 and 4 keep blocks of one row tile: their table and workspace share follow numel/ROWS.
    assert plan.n_tile_blocks == sum(-(-p.shape[0] // mt.ROWS) if p.ndim == 2 else -(-p.numel() // mt.FLAT_CHUNK)
                                     for p in ps) <= plan.ws_floats
    assert 4 * plan.stats_floats < 64 * 1024


def test_gpt2_shapes_keep_one_row_tile_per_stripe_and_fill_the_finalize_grid():
    from bench.shapes import gpt2_124m
    ps, plan = _meta_plan(gpt2_124m())
    assert plan.tiles == 1 and plan.n_blocks == _stripes(plan, ps)
    assert 4 * plan.ws_floats < 16 * 2 ** 20  # 2 * numel/64 floats (Q and P): 14.8 MiB
    # Column finalize: cdiv(N, FIN_COLS) programs per matrix, + 1 mean program: wte (768 columns) gets 24 + 1
    # (FIN_COLS = 256 gave 3 + 1); 2690 programs in all, up from 380, for 132 SMs.
    assert mt.FIN_COLS == 32
    assert plan.n_fin == sum(-(-p.shape[-1] // mt.FIN_COLS) + 1 for p in ps if p.ndim == 2) == 2690


def test_blocks_and_finalize_programs_are_launched_largest_first():
    from bench.shapes import gpt2_124m
    ps = [torch.empty(s) for s in gpt2_124m(8.0)]  # 2M params on the CPU: the tables can be read back
    plan = tk.build_plan(ps, ps, *_lists([_state(p) for p in ps]))
    meta = plan.meta.cpu()

    def work(t, local):
        M, N, numel = (int(meta[t, int(c)]) for c in (mt.C_NROWS, mt.C_NCOLS, mt.C_NUMEL))
        if M == 0:
            return min(mt.FLAT_CHUNK, numel - local * mt.FLAT_CHUNK)
        per = -(-M // mt.ROWS)
        return min(mt.ROWS, M - (local % per) * mt.ROWS) * N

    works = [work(t, k) for t, k in plan.blocks.tolist()]
    assert works == sorted(works, reverse=True) and works[0] > works[-1]
    # Every (tensor, block) pair is there once: sorting moved blocks, lost none.
    assert sorted(map(tuple, plan.blocks.tolist())) == sorted(
        (t, k) for t, p in enumerate(ps) for k in range(_stripes(plan, [p])))
    fin = plan.fin_blocks.cpu().tolist()
    assert fin[0] == [0, -(-ps[0].shape[1] // mt.FIN_COLS)]  # the largest first: wte's mean over its 6282 rows
    assert sorted(map(tuple, fin)) == sorted(
        (t, k) for t, p in enumerate(ps) if p.ndim == 2 for k in range(-(-p.shape[1] // mt.FIN_COLS) + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_in_register_bodies_match_the_torch_backend(monkeypatch, dtype):
    # Rows for the in-register widths 2048, 4096 and 8192 (its own launch), few rows each so that the
    # interpreter stays quick; width 2048 has a ragged last tile (5 rows: tiles of 2 fp32 or 4 16-bit rows);
    # one step with clipping against the torch backend, poisoned scratch.
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    shapes = [(5, 1100), (2, 2100), (2, 4100), (9,)]
    gen = torch.Generator().manual_seed(22)
    ps = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
    spec = [p.clone() for p in ps]
    sts, st2 = [_state(p) for p in ps], [_state(p) for p in spec]
    plan = tk.build_plan(ps, ps, *_lists(sts))
    assert plan.npads == 0b111000 and plan.n_blocks_big == 1 and plan.n_clip_blocks == 0
    gs = [(torch.randn(s, generator=gen) * 30.0).to(DEV, dtype) for s in shapes]
    _step(triton_backend, ps, gs, sts)
    _step(torch_backend, spec, gs, st2)
    for a, b, sa, sb in zip(ps, spec, sts, st2):
        # bf16: an update a hair apart can round the param to the neighbouring value (2^-8 relative)
        assert_close_rel(a, b, 1e-6 if dtype == torch.float32 else 2.0 ** -7, f"param {tuple(a.shape)}")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 1e-5, f"{k} of {tuple(a.shape)}")


@pytest.mark.parametrize("fused", [True, False], ids=["clip-in-phase1", "clip-in-phase2"])
def test_stripes_of_several_row_tiles_match_float64(monkeypatch, fused):
    """The TILED kernels (groups whose partials would pass WS_CAP_FLOATS; here the cap is made tiny):
    stripes of several row tiles, ragged last tiles, column partials accumulated across row tiles (fused:
    phase 1's in-register body over the taller stripes, its Q and P and block sums within the cap)."""
    # fused: phase 1 (Q, P, block sums and W) takes as many row tiles as its rows allow (5, 3, 3, 2), phase 3
    # (R/C partials only) 2; otherwise both take 3 (2 for the 70-row matrix). Ragged last tiles everywhere.
    monkeypatch.setattr(mt, "WS_CAP_FLOATS", 180 if fused else 64)
    monkeypatch.setattr(mt, "CLIP_IN_PHASE1", fused)
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    shapes = [(300, 12), (129, 5), (2, 150, 8), (70, 9), (7,)]
    gen = torch.Generator().manual_seed(21)
    ps = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
    sts = [_state(p) for p in ps]
    plan = tk.build_plan(ps, ps, *_lists(sts))
    assert plan.fused == fused
    if fused:
        assert plan.tiles == 2 and plan.meta[:, int(mt.C_TILES)].tolist() == [2, 2, 2, 2, 1]
        assert plan.tiles1 == 5 and plan.meta[:, int(mt.C_TILES1)].tolist() == [5, 3, 3, 2, 1]
        assert plan.n_blocks == 3 + 2 + 4 + 1 + 1 and plan.n_blocks1 == 1 + 1 + 2 + 1 + 1
    else:
        assert 4 * plan.ws_floats <= 4 * mt.WS_CAP_FLOATS
        assert plan.tiles == plan.tiles1 == 3 and plan.meta[:, int(mt.C_TILES)].tolist() == [3, 3, 3, 2, 1]
        assert plan.n_blocks == plan.n_blocks1 == 2 + 1 + 2 + 1 + 1
    assert plan.n_tile_blocks == 5 + 3 + 6 + 2 + 1
    for phase1 in (False, True):
        for s, h in zip(shapes, _covered(plan, shapes, phase1)):
            assert torch.equal(h, torch.ones_like(h)), f"{s}: elements covered {h.unique().tolist()} times"
    oracle = OracleCAME([p.cpu() for p in ps], lr=H["lr"], weight_decay=H["weight_decay"])
    spec, st2 = [p.clone() for p in ps], [_state(p) for p in ps]
    for _ in range(2):
        gs = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
        _step(triton_backend, ps, gs, sts)
        _step(torch_backend, spec, gs, st2)
        oracle.step([g.cpu() for g in gs])
    for a, b, st, st_ref in zip(ps, spec, sts, st2):
        assert_close_rel(a, b, 1e-6, f"param {tuple(a.shape)}")
        for k in st:
            assert_close_rel(st[k], st_ref[k], 1e-5, f"{k} of {tuple(a.shape)}")
    for a, ref in zip(ps, oracle.p):
        assert rel_err(a, ref) < 1e-5, tuple(a.shape)


def test_conv_weights_get_few_blocks_and_small_tables():
    # ResNet-50 (host-side only): its 1x1, 3x3 and 7x7 conv weights are packed, several whole matrices per block.
    # Cut into stripes (pack=False, as before packing) they made 13.4M programs per phase and 620 MiB of tables.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import shapes as bench_shapes
    ps = [torch.empty(s, device="meta") for s in bench_shapes.resnet50()]
    plan = tk.build_plan(ps, ps, *_lists([_state(p) for p in ps]))
    tables = sum(x.numel() * x.element_size() for x in (plan.meta, plan.blocks, plan.tile_blocks, plan.fin_blocks))
    assert plan.packed and plan.n_blocks <= 10_000 and plan.n_tile_blocks <= 10_000, plan.n_blocks
    assert plan.n_fin <= 100 and tables < 2 ** 20, (plan.n_fin, tables)
    assert plan.ws_floats <= 128 * 1024  # the fc layer's column partials Q and P, one float per block
    # stats: one float (the clip divisor) per packed tensor; two means per matrix made them 102 MiB here
    assert 4 * plan.stats_floats < 64 * 1024, plan.stats_floats
    stripes = tk.build_plan(ps, ps, *_lists([_state(p) for p in ps]), pack=False)
    assert not stripes.packed and stripes.n_blocks > 1000 * plan.n_blocks  # the test can tell the two apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_small_matrices_match_the_torch_backend(dtype, monkeypatch):
    # Packed blocks (multi_tensor.PACK_ELEMS): several per tensor (B above the matrices per block of its tile
    # size: 4096 for 1x1, 256 for 3x3, 64 for 5x5 and 7x7), 2x2 in the 4x4 tile, Nx1 and 1xN matrices, next to a
    # 3-D tensor too tall to pack (M = 9) and a 1-D one; a spike (the clip acts), poisoned scratch.
    shapes = [(4100, 1, 1), (300, 3, 3), (65, 7, 5), (3, 2, 2), (20, 1, 6), (5, 6, 1), (5, 9, 3), (7,)]
    assert [mt.pack_size(torch.empty(s, device="meta")) for s in shapes] == [1, 4, 8, 4, 8, 8, 0, 0]
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    _matches_torch_backend(shapes, dtype, seed=5, scales=[1.0, 1e3, 1.0])


def _matches_torch_backend(shapes, dtype, seed, scales, cache=None):
    """Steps of the Triton and torch backends side by side from the same params and state, on the same grads
    (scaled by `scales`, one step each); then params (to 1e-6, 16-bit: 1e-2) and every state to 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
    spec = [p.clone() for p in ps]
    sts, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    for scale in scales:
        gs = [(torch.randn(s, generator=gen) * scale).to(DEV, dtype) for s in shapes]
        _step(triton_backend, ps, gs, sts, cache=cache)
        _step(torch_backend, spec, gs, st2)
    for a, b, st, st_ref in zip(ps, spec, sts, st2):
        assert_close_rel(a.float(), b.float(), 1e-6 if dtype == torch.float32 else 1e-2, f"param {tuple(a.shape)}")
        for key in st:
            assert_close_rel(st[key], st_ref[key], 1e-5, f"{key} of {tuple(a.shape)}")


@pytest.mark.parametrize("fin", [(16, 64), (128, 32)], ids=["16x64", "128x32"])
def test_other_finalize_tiles_give_the_same_step(fin, monkeypatch):
    # bench.triton_sweep tries other finalize tiles: FIN_STRIPES is read at each launch, FIN_COLS when a plan
    # is built (its column programs are cut by it: Plan.fin_cols). Stripes past one tile (70 stripes of a
    # 4480-row matrix), a batch of matrices whose columns a program spans, columns not a multiple of either.
    monkeypatch.setattr(mt, "FIN_STRIPES", fin[0])
    monkeypatch.setattr(mt, "FIN_COLS", fin[1])
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    cache = {}
    _matches_torch_backend([(4480, 3), (3, 70, 50), (9, 130)], torch.float32, seed=12, scales=[1.0, 1.0],
                           cache=cache)
    assert cache["plan"].fin_cols == fin[1]


# ------------------------------------------------------------------ 64-bit offsets
def test_int64_offsets_reach_the_last_stripe_and_chunk_of_tensors_over_2_31_elements():
    """Tables describing a [2^26+5, 40] matrix (2.7e9 elements) and a flat tensor of 2^31+100 elements,
    of which only the last stripe (5 rows) and the last chunk (100 elements) exist: their addresses are
    shifted back by the offsets the kernels must add. 32-bit index math would wrap and address memory far
    away, which crashes a process rather than failing an assert: so the check runs in a child process."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import test_triton_backend as t; t._int64_case(vec=1); t._int64_case(vec=0); print('int64 ok')")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "int64 ok" in out.stdout, (
        f"child exited {out.returncode} (negative: killed by that signal; -11: a bad address): {out.stderr[-3000:]}")


def _int64_case(vec):
    """The body of the test above, for the 16-byte (vec=1) or the scalar (vec=0) kernel bodies."""
    gen = torch.Generator().manual_seed(11)
    M, N, rows = 2 ** 26 + 5, 40, 5
    last = -(-M // mt.ROWS) - 1
    row0 = last * mt.ROWS
    assert row0 == M - rows and M * N > 2 ** 31
    nf = 2 ** 31 + 100
    lf = nf // mt.FLAT_CHUNK
    tail = nf - lf * mt.FLAT_CHUNK
    # Real storage: the stripe and the chunk (a whole chunk, NaN past the tensor's end: must stay untouched).
    p, g, m = (torch.randn(rows, N, generator=gen).to(DEV) for _ in range(3))
    r, R = ((torch.rand(rows, generator=gen) + 0.5).to(DEV) for _ in range(2))
    c, C = ((torch.rand(N, generator=gen) + 0.5).to(DEV) for _ in range(2))
    pf, gf, mf, vf = (torch.full((mt.FLAT_CHUNK,), NAN) for _ in range(4))
    for x, pos in ((pf, False), (gf, False), (mf, False), (vf, True)):
        x[:tail] = torch.rand(tail, generator=gen) + 0.5 if pos else torch.randn(tail, generator=gen)
    pf, gf, mf, vf = (x.to(DEV) for x in (pf, gf, mf, vf))
    ref = {k: x.double().cpu() for k, x in dict(p=p, m=m, r=r, R=R, pf=pf[:tail], mf=mf[:tail], vf=vf[:tail]).items()}
    el = 4  # fp32
    meta = torch.tensor([
        [p.data_ptr() - row0 * N * el, g.data_ptr() - row0 * N * el, m.data_ptr() - row0 * N * el,
         r.data_ptr() - row0 * el, c.data_ptr(), R.data_ptr() - row0 * el, C.data_ptr(),
         M * N, M, N, -last * N, -last, 0, 2, vec, 1] + [0] * (int(mt.NCOL) - 16),  # partials: ws[0:N], sum: ws[0]
        [pf.data_ptr() - lf * mt.FLAT_CHUNK * el, gf.data_ptr() - lf * mt.FLAT_CHUNK * el,
         mf.data_ptr() - lf * mt.FLAT_CHUNK * el, vf.data_ptr() - lf * mt.FLAT_CHUNK * el, 0, 0, 0,
         nf, 0, 0, 0, 1 - lf, 0, 3, vec, 1] + [0] * (int(mt.NCOL) - 16)],  # block sum at ws[1]
        dtype=torch.int64, device=DEV)
    assert meta.shape[1] == int(mt.NCOL)
    meta[:, int(mt.C_TILES1)] = 1
    meta[0, int(mt.C_WS_Q1)] = -last * N  # phase 1's partials at ws[0:N] too
    blocks = torch.tensor([[0, last], [1, lf]], dtype=torch.int64, device=DEV)
    ws = torch.full((N,), NAN, device=DEV)
    r0, vf0 = r.clone(), vf.clone()
    mean_r, mean_R, div, div_f = 0.9, 1.1, 1.7, 1.3  # what the finalize kernels would have left in stats
    stats = torch.tensor([mean_r, mean_R, div, div_f], device=DEV)
    lay = dict(DTYPE=tl.float32, ROWS=mt.ROWS, BLOCK_N=mt.BLOCK_N, FLAT_CHUNK=mt.FLAT_CHUNK,
               FLAT_BLOCK=mt.FLAT_BLOCK, NUM_STAGES=1, TILED=False)
    b1, b2, b3, e1, e2, lr, wd = 0.9, 0.999, 0.9999, 1e-30, 1e-16, 1e-2, 0.1

    _sq_stats_kernel[(2,)](meta, blocks, ws, stats, ws, b2, 1 - b2, e1, AMP=False, PACKED=False, **lay)
    gd, gfd = g.double().cpu(), gf[:tail].double().cpu()
    ref["r"] = b2 * ref["r"] + (1 - b2) * ((gd * gd).mean(1) + e1)
    ref["vf"] = b2 * ref["vf"] + (1 - b2) * (gfd * gfd + e1)
    assert_close_rel(r, ref["r"], 1e-6, "r of the last stripe")
    assert_close_rel(ws, (gd * gd).sum(0), 1e-6, "column partials of the last stripe")
    assert_close_rel(vf[:tail], ref["vf"], 1e-6, "v of the last chunk")
    assert torch.isnan(vf[tail:]).all(), "v written past the end of the tensor"

    # Again with the clip's statistic in phase 1 (the in-register body, NPAD 64): Q at ws[0:N], P at ws[N:2N],
    # the chunk's sum of u^2 at ws[2N].
    r.copy_(r0)
    vf.copy_(vf0)
    meta[0, int(mt.C_NPAD)] = 64
    meta[0, int(mt.C_WS_P)] = N - last * N
    meta[1, int(mt.C_WS_BLK)] = 2 * N - lf
    ws2 = torch.full((2 * N + 1,), NAN, device=DEV)
    _sq_stats_kernel[(2,)](meta, blocks, ws2, stats, ws2, b2, 1 - b2, e1, AMP=False, PACKED=False, FUSED=True, NPADS=1,
                           WIDE=False, **lay)
    t_sq = gd * gd / ref["r"][:, None]
    uf = gfd * ref["vf"].rsqrt()
    assert_close_rel(r, ref["r"], 1e-6, "r of the last stripe (in-register body)")
    assert_close_rel(ws2[:N], (gd * gd).sum(0), 1e-6, "column partials of the last stripe (in-register body)")
    assert_close_rel(ws2[N:2 * N], t_sq.sum(0), 1e-5, "clip partials of the last stripe")
    assert ws2[2 * N].item() == pytest.approx(float((uf * uf).sum()), rel=1e-5)
    assert_close_rel(vf[:tail], ref["vf"], 1e-6, "v of the last chunk (fused)")
    assert torch.isnan(vf[tail:]).all(), "v written past the end of the tensor"
    meta[1, int(mt.C_WS_BLK)] = 1 - lf

    ws.fill_(NAN)
    untiled = {k: v for k, v in lay.items() if k != "TILED"}  # phases 2 and 4 take single row tiles
    _clip_stats_kernel[(2,)](meta, blocks, ws, stats, ws, AMP=False, **untiled)
    u = gd * (ref["r"] / mean_r).rsqrt()[:, None] * c.double().cpu().rsqrt()[None, :]
    assert ws[0].item() == pytest.approx(float((u * u).sum()), rel=1e-5)
    assert ws[1].item() == pytest.approx(float((uf * uf).sum()), rel=1e-5)

    ws.fill_(NAN)
    _momentum_res_kernel[(2,)](meta, blocks, ws, stats, ws, ws, ws, ws, b1, 1 - b1, b3, 1 - b3, e2, MAXIMIZE=False,
                               AMP=False, LOWBIT=False, PACKED=False, SLAB_N=mt.SLAB_N, **lay)
    ref["m"] = b1 * ref["m"] + (1 - b1) * u / div
    ref["mf"] = b1 * ref["mf"] + (1 - b1) * uf / div_f
    res = (u / div - ref["m"]) ** 2
    ref["R"] = b3 * ref["R"] + (1 - b3) * (res.mean(1) + e2)
    assert_close_rel(m, ref["m"], 1e-6, "m of the last stripe")
    assert_close_rel(R, ref["R"], 1e-6, "R of the last stripe")
    assert_close_rel(ws, res.sum(0), 1e-5, "residual column partials of the last stripe")
    assert_close_rel(mf[:tail], ref["mf"], 1e-6, "m of the last chunk")
    assert torch.isnan(mf[tail:]).all()

    lr_t = torch.tensor([lr], device=DEV)
    _param_step_kernel[(2,)](meta, blocks, stats, lr_t, lr_t, lr_t, lr_t, lr_t, lr_t, wd, b1, 1 - b1, AMP=False,
                             BIAS=False, LOWBIT=False, ROUNDING=0, MAXIMIZE=False, PACKED=False, **untiled)
    update = ref["m"] * (ref["R"] / mean_R).rsqrt()[:, None] * C.double().cpu().rsqrt()[None, :]
    assert_close_rel(p, ref["p"] - lr * wd * ref["p"] - lr * update, 1e-6, "p of the last stripe")
    assert_close_rel(pf[:tail], ref["pf"] - lr * wd * ref["pf"] - lr * ref["mf"], 1e-6, "p of the last chunk")
    assert torch.isnan(pf[tail:]).all()


# ------------------------------------------------------------------ 16-byte loads
def test_vec_flag_follows_alignment_and_row_width():
    def flag(p, g=None):
        st = _state(p)
        return tk.build_plan([p], [p if g is None else g], *_lists([st])).vec[0]

    assert flag(torch.zeros(4, 8)) == 1 and flag(torch.zeros(4, 6)) == 0          # fp32: N % 4
    assert flag(torch.zeros(4, 16, dtype=torch.bfloat16)) == 1
    assert flag(torch.zeros(4, 12, dtype=torch.bfloat16)) == 0                     # bf16: N % 8
    assert flag(torch.zeros(16)) == 1 and flag(torch.zeros(7)) == 0 and flag(torch.zeros(())) == 0
    shifted = torch.zeros(17)[1:]                                                  # contiguous, 4 B off
    assert shifted.is_contiguous() and flag(shifted) == 0
    assert flag(torch.zeros(16), g=torch.zeros(17)[1:]) == 0                       # a misaligned grad


def test_grads_that_lose_alignment_take_the_scalar_body_and_still_match():
    ps = [torch.randn(6, 8, device=DEV), torch.randn(16, device=DEV)]
    spec = [p.clone() for p in ps]
    st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    cache = {}
    for step in range(3):
        # step 1: grads are views 4 bytes into their storage, as a misaligned allocation would be
        gs = [torch.randn(p.numel() + 1, device=DEV)[1:].view(p.shape) if step == 1 else torch.randn_like(p)
              for p in ps]
        _step(triton_backend, ps, gs, st, cache=cache)
        _step(torch_backend, spec, gs, st2)
        assert cache["plan"].vec == ((0, 0) if step == 1 else (1, 1))
        assert cache["plan"].meta[:, int(mt.C_VEC)].tolist() == list(cache["plan"].vec)
    for a, b in zip(ps, spec):
        assert_close_rel(a, b, 1e-6, f"param {tuple(a.shape)}")


def test_grad_addresses_as_bytes_fill_the_table_as_a_tuple_does():
    # The C++ checks hand the grads' addresses over as int64 bytes (CAME._unchanged); the table must come
    # out as from the tuple the Python getters give, misaligned grads included.
    import array
    ps = [torch.randn(6, 8, device=DEV), torch.randn(16, device=DEV)]
    lists = _lists([_state(p) for p in ps])
    for misaligned in (False, True):
        gs = [torch.randn(p.numel() + 1, device=DEV)[1:].view(p.shape) if misaligned else torch.randn_like(p)
              for p in ps]
        ptrs = tuple(g.data_ptr() for g in gs)
        a, b = (tk.build_plan(ps, [torch.zeros_like(p) for p in ps], *lists) for _ in range(2))
        a.update_grads(gs, ptrs)
        b.update_grads(gs, array.array("q", ptrs).tobytes())
        assert torch.equal(a.meta, b.meta) and a.vec == b.vec == ((0, 0) if misaligned else (1, 1))
        assert b.meta[:, int(mt.C_G)].tolist() == list(ptrs)
        with pytest.raises(ValueError, match="3 grad addresses for 2 tensors"):
            b.update_grads(gs, array.array("q", ptrs + (0,)).tobytes())


_PTX_SCRIPT = textwrap.dedent('''
    import importlib, re, sys
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    mt = importlib.import_module("came_kernels.triton_kernels.multi_tensor")
    LAY = dict(ROWS=mt.ROWS, SLAB_N=mt.SLAB_N, FLAT_CHUNK=mt.FLAT_CHUNK, FLAT_BLOCK=mt.FLAT_BLOCK)
    PTRS = {"meta": "*i64", "blocks": "*i64", "ws": "*fp32", "stats": "*fp32", "lr_ptr": "*fp32", "amp": "*fp32",
            "bias_scales": "*fp32", "rng": "*i64", "qmax": "*i32", "qold": "*fp32"}
    for mod, name in [("sq_stats", "_sq_stats_kernel"), ("clip_stats", "_clip_stats_kernel"),
                      ("momentum_res", "_momentum_res_kernel"), ("param_step", "_param_step_kernel")]:
        fn = getattr(importlib.import_module("came_kernels.triton_kernels." + mod), name)
        for dt in ("fp32", "bf16"):
            ce = {k: v for k, v in LAY.items() if k in fn.arg_names}
            ce["DTYPE"] = tl.float32 if dt == "fp32" else tl.bfloat16
            ce["BLOCK_N"] = mt.read_block_n(ce["DTYPE"]) if mod in ("sq_stats", "clip_stats") else mt.BLOCK_N
            ce["NUM_STAGES"] = mt.STAGES[mod]
            if "REG_STAGES" in fn.arg_names:
                ce["REG_STAGES"] = mt.STAGES["sq_rows"]
            if "TILED" in fn.arg_names:
                ce["TILED"] = False
            if "MAXIMIZE" in fn.arg_names:
                ce["MAXIMIZE"] = False
            ce["AMP"] = False
            for flag in ("BIAS", "LOWBIT", "MAXIMIZE", "PACKED"):
                if flag in fn.arg_names:
                    ce[flag] = False
            if "ROUNDING" in fn.arg_names:
                ce["ROUNDING"] = 0
            variants = [(name, {})]
            if "NPADS" in fn.arg_names:  # phase 1 of a fused plan with every row width but the widest (a launch
                ce.update(FUSED=True, NPADS=2 ** (len(mt.NPAD_SIZES) - 1) - 1, WIDE=True)  # of its own) ...
                variants.append((name + "[8192]", dict(NPADS=2 ** (len(mt.NPAD_SIZES) - 1), WIDE=False)))  # ... alone
            for label, extra in variants:
                sig = {n: "constexpr" if n in ce else PTRS.get(n, "fp32") for n in fn.arg_names}
                k = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=dict(ce, **extra)),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": mt.NUM_WARPS})
                ptx = k.asm["ptx"]
                print(label, dt, len(re.findall(r"ld\\.global\\.v4", ptx)), len(re.findall(r"st\\.global\\.v[24]", ptx)))
''')


def test_compiled_phase_kernels_use_16_byte_loads():
    """sm_90 PTX, compiled here without a GPU (Triton ships ptxas): every phase kernel has ld.global.v4 for
    fp32 and bf16, and the kernels that write full-size tensors (m, p) have vector stores."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    counts = {(n, dt): (int(a), int(b)) for n, dt, a, b in (line.split() for line in out.stdout.splitlines())}
    assert len(counts) == 10, out.stdout  # 4 kernels and phase 1's 8192-wide launch, fp32 and bf16
    for (name, dt), (vec_loads, vec_stores) in counts.items():
        assert vec_loads > 0, f"{name} {dt}: no 16-byte loads in the PTX"
        if name in ("_momentum_res_kernel", "_param_step_kernel"):
            assert vec_stores > 0, f"{name} {dt}: no vector stores in the PTX"


_LAYOUT_SCRIPT = textwrap.dedent('''
    import importlib, json, math, re
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    mt = importlib.import_module("came_kernels.triton_kernels.multi_tensor")
    PTRS = {"meta": "*i64", "blocks": "*i64", "fin_blocks": "*i64", "ws": "*fp32", "stats": "*fp32", "amp": "*fp32",
            "lr_ptr": "*fp32", "bias_scales": "*fp32", "rng": "*i64", "qmax": "*i32", "qold": "*fp32",
            "dmeta": "*i64", "sums": "*fp32", "wsd": "*fp64"}
    LAY = dict(ROWS=mt.ROWS, SLAB_N=mt.SLAB_N, FLAT_CHUNK=mt.FLAT_CHUNK, FLAT_BLOCK=mt.FLAT_BLOCK,
               FIN_STRIPES=mt.FIN_STRIPES, FIN_COLS=mt.FIN_COLS, FIN_MEAN=mt.FIN_MEAN, NUM_STAGES=1, AMP=False,
               REG_STAGES=mt.STAGES["sq_rows"])
    def build(mod, name, **ce):
        fn = getattr(importlib.import_module("came_kernels.triton_kernels." + mod), name)
        ce = dict({k: v for k, v in LAY.items() if k in fn.arg_names}, **ce)
        sig = {n: "constexpr" if n in ce else PTRS.get(n, "fp32") for n in fn.arg_names}
        k = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 8})
        ttgir = k.asm["ttgir"]
        def elems(pattern):  # the element count of each tensor type "AxBx..." the pattern captures
            return [math.prod(map(int, t.rstrip("x").split("x"))) for t in re.findall(pattern, ttgir)]
        converts = elems(r"convert_layout %\\S+ : tensor<((?:\\d+x){2,3})f32")  # of 2-D and 3-D tiles
        loads = elems(r"tt\\.load [^:]*: tensor<((?:\\d+x)+)!tt\\.ptr<(?:f32|bf16)>")
        return dict(shared=k.metadata.shared, st_shared=k.asm["ptx"].count("st.shared"),
                    tile_converts=sum(n >= 1024 for n in converts), largest_load=max(loads),
                    lanes_along_cols="threadsPerWarp = [1, 32]" in ttgir,
                    slab_layout="threadsPerWarp = [1, 1, 32], warpsPerCTA = [8, 1, 1]" in ttgir)
    out = {}
    for dt, DT in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        out["sq1024_" + dt] = build("sq_stats", "_sq_stats_kernel", DTYPE=DT, BLOCK_N=mt.read_block_n(DT),
                                    TILED=False, PACKED=False, FUSED=True, NPADS=4, WIDE=False)
        out["mr_" + dt] = build("momentum_res", "_momentum_res_kernel", DTYPE=DT, BLOCK_N=mt.BLOCK_N, TILED=False,
                                MAXIMIZE=False, LOWBIT=False, PACKED=False)
        out["ps_" + dt] = build("param_step", "_param_step_kernel", DTYPE=DT, BLOCK_N=mt.BLOCK_N, MAXIMIZE=False,
                                BIAS=False, LOWBIT=False, ROUNDING=0, PACKED=False)
    out["sq_fin"] = build("sq_stats", "_sq_finalize_kernel", MODE=0, CLIP=True)
    out["res_fin"] = build("momentum_res", "_res_finalize_kernel", MODE=0)
    print(json.dumps(out))
''')


def test_compiled_tiles_keep_their_intended_layouts():
    """sm_90, compiled here: the layouts that once sent every tile through shared memory or loaded one line
    per lane stay gone. Phase 1's bf16 rows of 1024 use no more shared memory than fp32's (8-byte loads: their
    column sums stay in-thread); momentum_res converts a bf16 tile between layouts no more often than an fp32
    one (g loaded in the momentum's layout), lays its slabs out with the warps along the rows and a warp's
    lanes along the columns, and converts no full tile; momentum_res and param_step load tiles of 16 values a
    thread; the finalize kernels have a layout with a warp's lanes along the columns (the partials of a
    single matrix, one 128-byte line per stripe)."""
    pytest.importorskip("triton")
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _LAYOUT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["sq1024_bf16"]["shared"] <= r["sq1024_fp32"]["shared"], r
    assert r["sq1024_bf16"]["st_shared"] <= 2 * r["sq1024_fp32"]["st_shared"], r  # was 85 against 19
    assert r["mr_bf16"]["tile_converts"] <= r["mr_fp32"]["tile_converts"], r
    assert r["mr_bf16"]["shared"] <= r["mr_fp32"]["shared"], r
    # momentum_res's slabs: warps along the rows, a warp's lanes along the columns, no full tile converted
    assert r["mr_fp32"]["slab_layout"] and r["mr_bf16"]["slab_layout"], r
    assert r["mr_fp32"]["tile_converts"] == 0, r
    # 16 values of each operand per thread (256 threads) in flight in momentum_res and param_step (were 8)
    assert all(r[k + dt]["largest_load"] >= 16 * 256 for k in ("mr_", "ps_") for dt in ("fp32", "bf16")), r
    assert r["sq_fin"]["lanes_along_cols"] and r["res_fin"]["lanes_along_cols"], r


# ------------------------------------------------------------------ rounding
@triton.jit
def _round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _round_to(tl.load(x_ptr + offs, mask=offs < n), DTYPE), mask=offs < n)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, on 65520 -> fp16 inf
def test_bf16_and_fp16_stores_round_to_nearest_even_like_torch():
    # Ties at both parities, just off ties, overflow to inf, subnormals, signed zeros, inf, NaN, randoms.
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000001,
                         0x00018000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001], dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32),
                   torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65520.0, 6e-8, -3e-5]),
                   torch.randn(200, generator=torch.Generator().manual_seed(12)) * 100]).to(DEV)
    for dtype, tdt in ((torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)):
        out = torch.empty(x.shape, dtype=dtype, device=DEV)
        _round_kernel[(1,)](x, out, x.numel(), DTYPE=tdt, BLOCK=256)
        want = x.to(dtype)
        same = (out.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(out) & torch.isnan(want))
        assert same.all(), f"{dtype}: {x[~same].tolist()} -> {out[~same].tolist()}, torch {want[~same].tolist()}"


# ------------------------------------------------------------------ whole steps
def test_fp32_stays_within_1e_5_of_torch_backend_after_100_steps():
    shapes = [(37, 53), (1, 1), (5,), (2, 3, 4)]
    gen = torch.Generator().manual_seed(13)
    ps = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
    spec = [p.clone() for p in ps]
    st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    cache = {}
    for t in range(100):
        scale = 1e4 if t % 17 == 3 else (0.0 if t % 19 == 7 else 1.0)  # clipping spikes, zero gradients
        gs = [(torch.randn(s, generator=gen) * scale).to(DEV) for s in shapes]
        _step(triton_backend, ps, gs, st, cache=cache, weight_decay=0.01)
        _step(torch_backend, spec, gs, st2, weight_decay=0.01)
        if t == 0:
            for a, b in zip(ps, spec):
                assert_close_rel(a, b, 1e-6, f"param {tuple(a.shape)} after one step")
    for a, b, sa, sb in zip(ps, spec, st, st2):
        assert_close_rel(a, b, 1e-5, f"param {tuple(a.shape)} after 100 steps")
        for k in sa:
            assert_close_rel(sa[k], sb[k], 1e-4, f"state {k} of {tuple(a.shape)} after 100 steps")


def test_fp16_error_vs_float64_oracle_at_most_twice_torch_backends():
    shapes = [(37, 53), (1, 33), (33, 1), (3, 5, 7), (9,), ()]
    gen = torch.Generator().manual_seed(14)
    init = [torch.randn(s, generator=gen).to(DEV, torch.float16) for s in shapes]
    oracle = OracleCAME([x.cpu() for x in init], lr=1e-2, weight_decay=0.1, maximize=True)
    ours, spec = [x.clone() for x in init], [x.clone() for x in init]
    st, st2 = [_state(x) for x in init], [_state(x) for x in init]
    cache = {}
    for _ in range(5):
        gs = [torch.randn(s, generator=gen).to(DEV, torch.float16) for s in shapes]
        _step(triton_backend, ours, gs, st, cache=cache, maximize=True)
        _step(torch_backend, spec, gs, st2, maximize=True)
        oracle.step([g.cpu() for g in gs])
    ulp = torch.finfo(torch.float16).eps
    for a, b, ref in zip(ours, spec, oracle.p):
        assert a.dtype == torch.float16
        assert rel_err(a, ref) <= 2 * rel_err(b, ref) + 2 * ulp, f"fp16 param {tuple(a.shape)}"


def test_a_tensor_steps_bitwise_the_same_alone_or_in_a_group():
    # Tensors share launches, never sums: a tensor's result cannot depend on its neighbours.
    shapes = [(37, 53), (70, 9), (9,), ()]
    gen = torch.Generator().manual_seed(15)
    init = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(DEV) for s in shapes] for _ in range(2)]
    group = [x.clone() for x in init]
    gst = [_state(x) for x in init]
    for gs in grads:
        _step(triton_backend, group, gs, gst)
    for i, x in enumerate(init):
        alone, ast = [x.clone()], [_state(x)]
        for gs in grads:
            _step(triton_backend, alone, [gs[i]], ast)
        assert torch.equal(alone[0], group[i]), shapes[i]


def test_cache_keeps_the_tables_and_reuploads_only_the_grad_addresses():
    ps = [torch.randn(6, 8, device=DEV), torch.randn(5, device=DEV)]
    st = [_state(p) for p in ps]
    gs = [torch.randn_like(p) for p in ps]
    cache = {}
    _step(triton_backend, ps, gs, st, cache=cache)
    plan, lr_buf = cache["plan"], cache["lr"][0]  # (buffer, the float it holds): _contiguous.lr_tensor
    meta0 = plan.meta.clone()
    _step(triton_backend, ps, gs, st, cache=cache, lr=2e-2)  # same grads, new lr
    assert cache["plan"] is plan and torch.equal(plan.meta, meta0)
    assert cache["lr"][0] is lr_buf and lr_buf.item() == pytest.approx(2e-2)  # refilled in place
    gs = [torch.randn_like(p) for p in ps]  # as after zero_grad(set_to_none=True)
    _step(triton_backend, ps, gs, st, cache=cache)
    assert cache["plan"] is plan
    cg = int(mt.C_G)
    assert plan.meta[:, cg].tolist() == [g.data_ptr() for g in gs]
    others = [c for c in range(int(mt.NCOL)) if c != cg]
    assert torch.equal(plan.meta[:, others], meta0[:, others])
    qs = [torch.randn(3, 4, device=DEV)]  # a different parameter set: new tables
    _step(triton_backend, qs, [torch.randn_like(qs[0])], [_state(qs[0])], cache=cache)
    assert cache["plan"] is not plan and cache["plan"].n_tensors == 1


def test_wrong_grad_dtype_is_refused_before_anything_changes():
    ps = [torch.randn(4, 8, device=DEV)]
    before = ps[0].clone()
    st = [_state(ps[0])]
    with pytest.raises(ValueError, match=r"grads\[0\].*bfloat16"):
        _step(triton_backend, ps, [torch.randn(4, 8, device=DEV, dtype=torch.bfloat16)], st)
    assert torch.equal(ps[0], before) and not st[0]["m"].any() and not st[0]["r"].any()


def test_empty_tensors_and_empty_lists_are_no_ops():
    _step(triton_backend, [], [], [])
    ps = [torch.empty(0, 5, device=DEV), torch.empty(0, device=DEV), torch.randn(3, device=DEV)]
    spec = [p.clone() for p in ps]
    gs = [torch.randn_like(p) for p in ps]
    st, st2 = [_state(p) for p in ps], [_state(p) for p in ps]
    _step(triton_backend, ps, gs, st)
    _step(torch_backend, spec, gs, st2)
    assert_close_rel(ps[2], spec[2], 1e-6, "the non-empty tensor")


def test_unavailable_reason_says_why_and_never_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "cuda" in triton_backend.unavailable_reason(torch.device("cuda")).lower()
    assert isinstance(triton_backend.unavailable_reason(torch.device("meta")), str)


# ------------------------------------------------------------------ device
def test_launches_run_on_the_params_device_not_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device, not on the device of the pointers it is handed: with
    params on cuda:1 while cuda:0 is current, the kernels would read cuda:1 addresses on cuda:0. came_step
    makes the params' device current around every launch (torch.cuda.device). Checked without a GPU: a mock
    of torch.cuda.device keeps a mock current device, and each phase records what was current when it ran."""
    current = ["cuda:0"]

    class FakeDeviceGuard:  # stands in for torch.cuda.device: a context manager that switches `current`
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            self.prev, current[0] = current[0], str(self.device)

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceGuard)
    guard = triton_backend._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, FakeDeviceGuard) and guard.device == torch.device("cuda", 1)
    with guard:
        assert current[0] == "cuda:1"
    assert current[0] == "cuda:0"

    # came_step: every phase launches inside the guard of the params' device (here the CPU stands in for
    # cuda:1, as the interpreter runs on CPU tensors: the guard is forced to switch to it).
    monkeypatch.setattr(triton_backend, "_device_guard", lambda device: FakeDeviceGuard(device))
    seen = {}
    for name in ("sq_stats", "clip_stats", "momentum_res", "param_step"):
        def record(*a, _name=name, _fn=getattr(tk, name), **k):
            seen[_name] = current[0]
            return _fn(*a, **k)
        monkeypatch.setattr(tk, name, record)
    ps = [torch.randn(6, 8, device=DEV), torch.randn(5, device=DEV)]
    _step(triton_backend, ps, [torch.randn_like(p) for p in ps], [_state(p) for p in ps])
    assert seen == dict.fromkeys(("sq_stats", "clip_stats", "momentum_res", "param_step"), str(ps[0].device))
    assert current[0] == "cuda:0"  # restored after the step
