"""The CUDA extension's launch layout (csrc/plan.h), proven on the CPU.

plan.h decides, on the host, how one launch per phase kernel covers a whole (device, dtype) group: the row
tiles per stripe (taller stripes when the workspace would pass 64 MiB), which tensors are packed (ndim >= 3,
matrices of at most 8x8: several whole matrices per block, no column partials, no finalize), the slot order
(largest blocks first), each tensor's workspace slices, the block prefix sums (phase 2's only for tensors
with N > 8192; phase 1's two launches: the register path's for factored tensors with N <= 8192 that are not
packed, the rest's for the others), the stripe geometry and the packed blocks' geometry; the kernels find
their tensor with plan.h's owner_of. All of it is compiled here with g++
(tests/cuda_host/plan_host.cpp) and checked against a plain Python model of the decomposition, without a GPU. What runs only on a GPU (the
uploaded table, the kernels) is tested by test_fused_backends.py / test_cuda_backend.py there.
"""
import ctypes
import math
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
ROWS, FLAT_CHUNK, WARPS, BLOCK_MEAN_ROWS, THREADS = 64, 16384, 8, 2048, 256
CLIP_COLS, WS_CAP_FLOATS = 8192, 16 * 1024 * 1024
PACK_ELEMS, PACK_MAX, PACK_SIZES = 4096, 8, (1, 4, 8)  # triton_kernels/multi_tensor.py's, mirrored in plan.h
I64 = ctypes.c_int64


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++ not on PATH, CXX unset): cannot build the host plan test")
    out = tmp_path_factory.mktemp("plan_host") / "plan_host.so"
    subprocess.run([CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}/csrc",
                    f"{ROOT}/tests/cuda_host/plan_host.cpp", "-o", str(out)], check=True)
    so = ctypes.CDLL(str(out))
    for f in ("came_layout", "came_default_ws", "came_row_tiles", "came_table_bytes", "came_desc_bytes",
              "came_clip_cols", "came_ws_cap_floats", "came_pack_size", "came_pack_of"):
        getattr(so, f).restype = I64
    so.came_pack_size.argtypes = [I64, I64, I64]
    so.came_pack_of.argtypes = [I64, I64]
    so.came_pack_blocks.argtypes = [I64, I64, I64, I64, I64, ctypes.c_void_p]
    so.came_pack_blocks.restype = None
    so.came_pack_consts.restype = None
    so.came_packed_indices.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4
    so.came_packed_indices.restype = None
    so.came_layout.argtypes = [ctypes.c_void_p, ctypes.c_int, I64, I64] + [ctypes.c_void_p] * 10
    so.came_row_tiles.argtypes = [I64, I64, I64, I64, ctypes.c_void_p, ctypes.c_void_p]
    so.came_counts.argtypes = [ctypes.c_void_p, I64, I64, ctypes.c_void_p]
    so.came_counts.restype = None
    so.came_reg_groups.argtypes = [I64, ctypes.c_int]
    return so


def _cdiv(a, b):
    return -(-a // b)


def _pack_size(dims):
    """PM of a tensor of these dims (triton_kernels.multi_tensor.pack_size): ndim >= 3, non-empty, M, N <= 8."""
    if len(dims) < 3 or math.prod(dims) == 0 or max(dims[-2:]) > PACK_MAX:
        return 0
    return next(pm for pm in PACK_SIZES if pm >= max(dims[-2:]))


def _shape(dims, pack=True):
    """(numel, B, M, N, pm) as the kernels see a tensor of these dims (pack: as ops.cpp packs by default)."""
    numel = math.prod(dims)
    if len(dims) >= 2:
        M, N = dims[-2], dims[-1]
        return numel, numel // (M * N), M, N, _pack_size(dims) if pack else 0
    return numel, 0, 0, 0, 0


def _tiles_of(s, tiles):
    return min(tiles, _cdiv(s[2], ROWS)) if s[2] and not s[4] else 1


def _model(s, tiles=1, clip_cols=CLIP_COLS):
    """The decomposition in plain Python, at the tensor's own row tiles per stripe: main blocks, column finalize
    blocks, mean blocks, floats of one column-partial array, column-partial arrays (Q and P when phase 1
    gathers the clip, Q when phase 2 does, none for flat and packed tensors), clip floats (fp64 W as 2 floats
    per column, or one per block, padded to even), phase-2 blocks."""
    numel, B, M, N, pm = s
    if M == 0 or pm:  # flat chunks, or packed blocks of PACK_ELEMS // pm^2 whole matrices: one clip float each
        blocks = _cdiv(numel, FLAT_CHUNK) if M == 0 else _cdiv(B, PACK_ELEMS // (pm * pm))
        return blocks, 0, 0, 0, 0, _cdiv(blocks, 2) * 2, 0
    stripes = B * _cdiv(M, ROWS * tiles)
    fv = 4 if N % 4 == 0 else 1
    means = B if M >= BLOCK_MEAN_ROWS else _cdiv(B, WARPS)
    covered = N <= clip_cols
    return (stripes, _cdiv(B * N, 32 * fv), means, _cdiv(stripes * N, 4) * 4, 2 if covered else 1,
            2 * B * N if covered else _cdiv(stripes, 2) * 2, 0 if covered else stripes)


def _layout(lib, dims_list, clip_cols=CLIP_COLS, cap=WS_CAP_FLOATS, pack=True):
    n = len(dims_list)
    shapes = (I64 * (5 * n))(*[x for d in dims_list for x in _shape(d, pack)])
    order = (ctypes.c_int32 * n)()
    tiles_t, ws_col, ws_clip = (I64 * n)(), (I64 * n)(), (I64 * n)()
    main, fin, clip, reg, rest = [(I64 * (n + 1))() for _ in range(5)]
    info = (I64 * 4)()
    ws = lib.came_layout(shapes, n, clip_cols, cap, order, tiles_t, ws_col, ws_clip, main, fin, clip, reg, rest,
                         info)
    return dict(order=list(order), tiles_t=list(tiles_t), ws_col=list(ws_col), ws_clip=list(ws_clip),
                main=list(main), fin=list(fin), clip=list(clip), reg=list(reg), rest=list(rest), tiles=info[0],
                clip_cols=info[1], packed=bool(info[2]), packed_blocks=info[3], ws=ws, pack=pack)


# GPT-2-like and odd shapes: 1-D, 0-d, 1xN, Nx1, ragged, batched 3-D/4-D, tall (block-per-matrix means), and
# N past the register path's 8192 columns (phase 2).
SHAPES = [(768,), (), (50257, 768), (1024, 768), (768, 2304), (2304,), (1, 33), (33, 1), (37, 53), (3, 70, 131),
          (4, 3, 3, 3), (2, 1, 5, 1), (40000,), (4099, 8), (129, 257), (768, 3072), (3072, 768), (7,), (70, 8193),
          (2, 3, 11008), (1, 20000)]


def _gpt2_124m():
    d, layers = 768, 12
    per = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(50257, d), (1024, d)] + per * layers + [(d,), (d,)]


def _llama(vocab, d, inter, layers, kv):
    per = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter), (d,), (d,)]
    return [(vocab, d)] + per * layers + [(d,), (vocab, d)]


MODELS = {"gpt2-124m": (_gpt2_124m(), 124_439_808),
          "tinyllama-1.1b": (_llama(32000, 2048, 5632, 22, 256), 1_100_048_384),
          "llama-7b": (_llama(32000, 4096, 11008, 32, 4096), 6_738_415_616)}


# Small matrices (ndim >= 3, M, N <= 8: packed): 1x1, 3x3, 7x7 and 5x5 convs, 2x2 in the 4x4 tile, Nx1 and
# 1xN, 5-D; B below, at and above the matrices per block of its tile (4096 for 1x1, 256 for 4x4, 64 for 8x8).
PACKED = [(8, 3, 3, 3), (5, 7, 1, 1), (3, 2, 5, 5), (2, 3, 4, 8, 8), (4100, 1, 1), (4096, 1, 1), (300, 3, 3),
          (256, 4, 4), (65, 7, 5), (64, 8, 8), (3, 2, 2), (20, 1, 6), (5, 6, 1), (1, 1, 1), (64, 3, 7, 7),
          (2048, 512, 1, 1), (512, 512, 3, 3)]
NOT_PACKED = [(5, 9, 3), (3, 8, 9), (2, 3), (8, 8), (7,), (4, 3, 1, 100)]


def test_counts_match_the_python_model(lib):
    for dims in SHAPES + PACKED + NOT_PACKED:
        for pack in (True, False):
            s = _shape(dims, pack)
            for tiles in (1, 2, 5):
                t = _tiles_of(s, tiles)
                for clip_cols in (CLIP_COLS, 64, 0):
                    out = (I64 * 12)()
                    lib.came_counts((I64 * 5)(*s), t, clip_cols, out)
                    main, fin_col, fin_mean, colpart, arrays, clip_floats, clip_blocks = _model(s, t, clip_cols)
                    w = int(s[2] > 0 and not s[4] and s[3] <= clip_cols)  # phase 1's register path: W
                    if s[4]:  # a packed block: its whole matrices
                        elems = min(s[1], PACK_ELEMS // s[4] ** 2) * s[2] * s[3]
                    else:
                        elems = min(s[2], ROWS * t) * s[3] if s[2] else min(s[0], FLAT_CHUNK)
                    assert list(out) == [main, fin_col, fin_mean, colpart, 4 if s[3] % 4 == 0 else 1,
                                         int(s[2] >= BLOCK_MEAN_ROWS), arrays, clip_floats, clip_blocks,
                                         main if w else 0, elems, w], (dims, pack, t, clip_cols)


@pytest.mark.parametrize("pack", [True, False])
def test_slots_are_largest_blocks_first_and_stable(lib, pack):
    # Largest blocks first; packed tensors after all the others (their blocks end every numbering: their own
    # launches), largest first among them.
    dims_list = SHAPES + PACKED + NOT_PACKED
    L = _layout(lib, dims_list, pack=pack)
    order = L["order"]
    assert sorted(order) == list(range(len(dims_list))) and L["tiles"] == 1

    def key(dims):
        numel, B, M, N, pm = _shape(dims, pack)
        if pm:
            return 1, -min(B, PACK_ELEMS // pm ** 2) * M * N
        return 0, -(min(M, ROWS) * N if M else min(numel, FLAT_CHUNK))

    keys = [key(dims_list[i]) for i in order]
    assert keys == sorted(keys)
    for a, b in zip(order, order[1:]):  # ties keep the group's order: the layout is fixed for fixed inputs
        if key(dims_list[a]) == key(dims_list[b]):
            assert a < b
    assert dims_list[order[0]] == (70, 8193)  # widest stripes first
    if pack:
        assert dims_list[order[-1]] == (1, 1, 1)  # the smallest packed block last
        assert dims_list[order[sum(_shape(d)[4] == 0 for d in dims_list) - 1]] == ()  # then the 0-d tensor
    else:  # blocks of one element last (the 0-d tensor, 1x1 matrices as stripes), in the group's order
        assert [dims_list[i] for i in order[-6:]] == [(), (5, 7, 1, 1), (4100, 1, 1), (4096, 1, 1), (1, 1, 1),
                                                      (2048, 512, 1, 1)]


def _check_layout(lib, dims_list, L):
    """Prefix sums and workspace regions of a layout against the model: the column partials of every tensor
    disjoint, in slot order, 16-byte aligned; then the clip inputs (W 8-byte aligned), disjoint; phase-2 blocks
    exactly the main blocks of the factored tensors with N > clip_cols; phase 1's register-path blocks exactly
    those of the factored tensors with N <= clip_cols that are not packed, its other blocks the rest; packed
    tensors: no finalize blocks, no column partials, one clip float per block, TensorDesc::tiles = -PM."""
    col_end = 0
    assert L["main"][0] == L["fin"][0] == L["clip"][0] == L["reg"][0] == L["rest"][0] == 0
    models = []
    packed = False
    for k, i in enumerate(L["order"]):
        s = _shape(dims_list[i], L["pack"])
        t = _tiles_of(s, L["tiles"])
        assert L["tiles_t"][k] == (-s[4] if s[4] else t)
        packed = packed or s[4] > 0
        m = _model(s, t, L["clip_cols"])
        models.append(m)
        main, fc, fm, colpart, arrays, clip_floats, clip_blocks = m
        assert L["main"][k + 1] - L["main"][k] == main and L["fin"][k + 1] - L["fin"][k] == fc + fm
        assert L["clip"][k + 1] - L["clip"][k] == clip_blocks
        if s[4]:
            assert fc + fm == 0 and arrays * colpart == 0 and clip_blocks == 0 and clip_floats >= main
        reg = main if s[2] > 0 and not s[4] and s[3] <= L["clip_cols"] else 0
        assert L["reg"][k + 1] - L["reg"][k] == reg and L["rest"][k + 1] - L["rest"][k] == main - reg
        assert L["ws_col"][k] == col_end and col_end % 4 == 0
        col_end += arrays * colpart
    clip_end = col_end
    for k, i in enumerate(L["order"]):
        assert L["ws_clip"][k] == clip_end and clip_end % 2 == 0
        clip_end += models[k][5]
    assert L["ws"] == max(clip_end, 1)
    assert L["packed"] == packed
    # the packed slots come last: their blocks are the last packed_blocks of the phase-kernel numbering and of
    # phase 1's rest numbering (the other kernels' grids stop before them), none in the register path's
    first = next((k for k, i in enumerate(L["order"]) if _shape(dims_list[i], L["pack"])[4]), len(L["order"]))
    assert all(_shape(dims_list[i], L["pack"])[4] for i in L["order"][first:])
    assert L["packed_blocks"] == L["main"][-1] - L["main"][first] == L["rest"][-1] - L["rest"][first]
    assert L["reg"][first] == L["reg"][-1] and L["fin"][first] == L["fin"][-1] and L["clip"][first] == L["clip"][-1]
    return models


def test_prefix_sums_and_workspace_regions(lib):
    for dims_list in (SHAPES, SHAPES + PACKED + NOT_PACKED):
        for clip_cols in (CLIP_COLS, 64, 0):
            for pack in (True, False):
                _check_layout(lib, dims_list, _layout(lib, dims_list, clip_cols=clip_cols, pack=pack))


def test_clip_cols_is_never_above_the_register_bound(lib):
    assert lib.came_clip_cols() == CLIP_COLS and lib.came_ws_cap_floats() == WS_CAP_FLOATS
    L = _layout(lib, SHAPES, clip_cols=10 ** 6)
    assert L["clip_cols"] == CLIP_COLS
    # the tensors with N > 8192 take phase 2, the others none; phase 1's register path takes the factored
    # tensors with N <= 8192, its other launch the rest
    for k, i in enumerate(L["order"]):
        s = _shape(SHAPES[i])
        assert (L["clip"][k + 1] > L["clip"][k]) == (s[2] > 0 and s[3] > CLIP_COLS), SHAPES[i]
        assert (L["reg"][k + 1] > L["reg"][k]) == (s[2] > 0 and not s[4] and s[3] <= CLIP_COLS), SHAPES[i]
        assert (L["rest"][k + 1] > L["rest"][k]) == (s[2] == 0 or s[4] > 0 or s[3] > CLIP_COLS), SHAPES[i]


def _row_tiles(lib, s, tiles):
    numel, B, M, N = s[:4]
    blocks = B * _cdiv(M, ROWS * tiles)
    out = (I64 * (2 * B * _cdiv(M, ROWS) + 2 * blocks))()
    mats = (I64 * blocks)()
    k = lib.came_row_tiles(M, N, tiles, blocks, out, mats)
    return [(out[2 * j], out[2 * j + 1]) for j in range(k)], list(mats)


@pytest.mark.parametrize("tiles", [1, 2, 3, 7, 100])
def test_every_row_is_covered_once_by_its_stripes_row_tiles(lib, tiles):
    # The kernels' stripe_of and row_tile: every row of the [B*M, N] view in exactly one row tile of at most
    # ROWS rows, inside its stripe's matrix; a stripe has at most `tiles` row tiles; stripe s of a tensor is
    # stripe s % S of matrix s // S (where the column finalize looks for its partials).
    # (Packed tensors are cut so when packing is off: CAME_KERNELS_CUDA_PACK=0 and the low-precision op.)
    for dims in SHAPES + [(3, 200, 5), (1000, 3), (5, 129, 2)]:
        s = _shape(dims, pack=False)
        if s[2] == 0:
            continue
        numel, B, M, N, _ = s
        t = _tiles_of(s, tiles)
        S = _cdiv(M, ROWS * t)
        rts, mats = _row_tiles(lib, s, t)
        rows = [r for a, b in rts for r in range(a, b)]
        assert rows == list(range(B * M)), dims  # once each, in launch order
        assert all(0 < b - a <= ROWS for a, b in rts)
        assert mats == [local // S for local in range(B * S)]
        for a, b in rts:
            assert (a // M) == ((b - 1) // M)  # never across two matrices
        per_block = {}
        for a, b in rts:
            per_block.setdefault(a // M * S + (a % M) // (ROWS * t), []).append((a, b))
        assert sorted(per_block) == list(range(B * S)) and all(len(v) <= t for v in per_block.values())


def test_register_path_columns_cover_n_once(lib):
    # Thread x owns the groups x + q*256 (q < kG) of vec columns: kG is the smallest power of two whose groups
    # cover N, and never more than 32 columns per thread for N <= 8192.
    for vec in (4, 8):
        for N in list(range(1, 300)) + [1023, 1024, 1025, 2047, 2048, 2049, 4096, 5632, 8191, 8192]:
            kg = lib.came_reg_groups(N, vec)
            assert kg & (kg - 1) == 0 and kg * THREADS * vec >= N and (kg == 1 or kg // 2 * THREADS * vec < N)
            assert kg * vec <= 32
            cols = sorted(c for x in range(THREADS) for q in range(kg) for c in range((x + q * THREADS) * vec,
                                                                                      (x + q * THREADS + 1) * vec))
            assert cols == list(range(kg * THREADS * vec))


@pytest.mark.parametrize("model", list(MODELS))
def test_workspace_is_at_most_64_mib_for_real_models(lib, model):
    # Column partials at one row tile per stripe would take 2*numel/64 floats (TinyLlama 131 MiB, LLaMA-7B 842
    # MiB); taller stripes keep the workspace, W and the block sums included, within 64 MiB, and the layout
    # stays exact (regions, prefix sums) at the chosen tiles.
    dims_list, params = MODELS[model]
    assert sum(math.prod(d) for d in dims_list) == params
    L = _layout(lib, dims_list)
    assert 4 * L["ws"] <= 64 * 2 ** 20
    _check_layout(lib, dims_list, L)
    # the smallest count that fits: one row tile fewer passes the cap
    if L["tiles"] > 1:
        assert 4 * _layout(lib, dims_list, cap=10 ** 12)["ws"] > 64 * 2 ** 20
        n = len(dims_list)
        shapes = (I64 * (5 * n))(*[x for d in dims_list for x in _shape(d)])
        tiles = I64()
        assert lib.came_default_ws(shapes, n, ctypes.byref(tiles)) == L["ws"] and tiles.value == L["tiles"]
        smaller = sum(m[4] * m[3] + m[5] for m in (_model(_shape(d), _tiles_of(_shape(d), L["tiles"] - 1))
                                                   for d in dims_list))
        assert smaller > WS_CAP_FLOATS
    expect = {"gpt2-124m": 1, "tinyllama-1.1b": 3, "llama-7b": 13}[model]
    assert L["tiles"] == expect
    # every row of every tensor once, at the chosen tiles (each distinct shape once)
    for dims in set(d for d in dims_list if len(d) >= 2):
        s = _shape(dims)
        rts, _ = _row_tiles(lib, s, _tiles_of(s, L["tiles"]))
        assert sum(b - a for a, b in rts) == s[1] * s[2] and rts[0][0] == 0 and rts[-1][1] == s[1] * s[2]
        assert all(x[1] == y[0] for x, y in zip(rts, rts[1:]))


def test_a_lower_cap_makes_stripes_taller(lib):
    # The test hook the GPU tests use (CAME_KERNELS_CUDA_WS_CAP_FLOATS): a small group under a small cap.
    L1 = _layout(lib, SHAPES)
    L2 = _layout(lib, SHAPES, cap=L1["ws"] // 3)
    assert L2["tiles"] > 1 and L2["ws"] <= L1["ws"] // 3
    _check_layout(lib, SHAPES, L2)
    L3 = _layout(lib, SHAPES, cap=1)  # nothing fits: the largest useful count
    assert L3["tiles"] == max(_cdiv(_shape(d)[2], ROWS) for d in SHAPES if len(d) >= 2)
    _check_layout(lib, SHAPES, L3)


def _owners(lib, start, wide):
    n = len(start) - 1
    total = start[-1]
    out = (ctypes.c_int32 * total)()
    lib.came_owners.restype = None
    lib.came_owners((ctypes.c_int32 * (n + 1))(*start), n, total, wide, out)
    return list(out)


@pytest.mark.parametrize("wide", [0, 1], ids=["binary", "32-wide"])
def test_every_block_finds_its_tensor(lib, wide):
    # Both searches (the kernels run the 32-wide one) over every prefix sum: every block maps to the slot
    # whose range holds it; slots with no blocks in a launch (flat tensors in the finalize and the register
    # path, covered matrices in phase 2 and phase 1's other launch) are never chosen.
    L = _layout(lib, SHAPES)
    for start in (L["main"], L["fin"], L["clip"], L["reg"], L["rest"]):
        expect = [k for k in range(len(start) - 1) for _ in range(start[k + 1] - start[k])]
        assert _owners(lib, start, wide) == expect


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 100, 1023, 1024, 1025, 3000])
def test_32_wide_search_on_long_tables_with_empty_slots(lib, n):
    # Three rounds past 1024 slots; every third slot has no blocks (it shares its start with the next one).
    start = [0]
    for k in range(n):
        start.append(start[-1] + (0 if k % 3 == 1 else 1 + k % 4))
    expect = [k for k in range(n) for _ in range(start[k + 1] - start[k])]
    assert _owners(lib, start, 1) == expect == _owners(lib, start, 0)


def test_table_is_128_bytes_per_tensor_plus_prefix_sums(lib):
    assert lib.came_desc_bytes() == 128
    # main, fin, clip, and phase 1's two launches (register path, the rest)
    assert lib.came_table_bytes(201) == 201 * 128 + 5 * 202 * 4


# ---- packed tensors (plan.h's kPackElems; triton_kernels/multi_tensor.py's PACK_ELEMS)
def _pack_consts(lib):
    out = (I64 * 6)()
    lib.came_pack_consts(out)
    return list(out)


def test_pack_constants_mirror_the_triton_backend(lib):
    # The same packing in both backends: PACK_ELEMS, PACK_MAX and the matrices per block of each pack size.
    elems, most, rows, *per_block = _pack_consts(lib)
    assert (elems, most, per_block) == (PACK_ELEMS, PACK_MAX, [PACK_ELEMS // pm ** 2 for pm in PACK_SIZES])
    assert rows == PACK_ELEMS // 4  # a block of PM >= 4 has at most this many rows and columns (shared memory)
    try:
        from triton_kernels import multi_tensor as mt  # needs triton; the constants are what is compared
    except ImportError as e:
        pytest.skip(f"triton_kernels not importable here ({e}): compared with the Python model only")
    assert (mt.PACK_ELEMS, mt.PACK_MAX, tuple(mt.PACK_SIZES)) == (PACK_ELEMS, PACK_MAX, PACK_SIZES)


def test_pack_size_is_the_triton_rule(lib):
    # ndim >= 3 and both matrix dims <= 8: the smallest of 1, 4, 8 that covers them; else stripes (0). ops.cpp
    # calls plan.h's pack_size(p.dim(), M, N) for every non-empty factored tensor.
    dims_list = PACKED + NOT_PACKED + SHAPES + [(2, m, n) for m in range(1, 11) for n in range(1, 11)] + \
        [(3, 1, m, n) for m in (1, 2, 4, 5, 8, 9) for n in (1, 3, 8, 9)] + [(2, 2, 2, 2, 2, 2)]
    for dims in dims_list:
        M, N = (dims[-2], dims[-1]) if len(dims) >= 2 else (0, 0)
        assert lib.came_pack_size(len(dims), M, N) == _pack_size(dims), dims
    try:
        import torch
        from triton_kernels import multi_tensor as mt
    except ImportError:
        return
    for dims in dims_list:
        assert mt.pack_size(torch.empty(dims, device="meta")) == _pack_size(dims), dims


def test_tiles_field_carries_the_pack_size(lib):
    # TensorDesc has no spare room: a packed tensor's entry holds -PM where stripes hold their row tiles.
    for tiles in (1, 2, 13):
        assert lib.came_pack_of(tiles, 0) == 0
    for pm in PACK_SIZES:
        assert lib.came_pack_of(1, pm) == pm


def _pack_blocks(lib, s):
    numel, B, M, N, pm = s
    n = _cdiv(B, PACK_ELEMS // pm ** 2)
    out = (I64 * (4 * n))()
    lib.came_pack_blocks(B, M, N, pm, n, out)
    return [tuple(out[4 * i:4 * i + 4]) for i in range(n)]


def test_every_matrix_of_a_packed_tensor_is_in_one_block(lib):
    # pack_block_of, as the kernels cut a packed tensor: block s holds matrices [s*K, s*K + nk) (K matrices, the
    # last block fewer), i.e. the contiguous elements [k0*M*N, +nk*M*N): every matrix and every element once, in
    # order; at most PACK_ELEMS elements and (PM >= 4) PACK_ELEMS // 4 rows and columns per block, the kernels'
    # shared memory; every block starts 16-byte aligned for 2- and 4-byte dtypes (e0 a multiple of 64).
    rows_cap = _pack_consts(lib)[2]
    for dims in PACKED:
        s = _shape(dims)
        numel, B, M, N, pm = s
        K = PACK_ELEMS // pm ** 2
        blocks = _pack_blocks(lib, s)
        assert len(blocks) == _model(s)[0]
        k_next = e_next = 0
        for k0, nk, e0, n in blocks:
            assert (k0, e0) == (k_next, e_next) and 0 < nk <= K and n == nk * M * N <= PACK_ELEMS, dims
            assert e0 % 64 == 0 and k0 % K == 0
            if pm >= 4:
                assert nk * M <= rows_cap and nk * N <= rows_cap
            k_next, e_next = k0 + nk, e0 + n
        assert (k_next, e_next) == (B, numel), dims


@pytest.mark.parametrize("vec", [4, 8])
def test_packed_blocks_index_rows_columns_and_elements_alike(lib, vec):
    # The packed kernels' index math, for every matrix size they take (M, N <= 8) and block fill: row q's N
    # elements (row sums), column q's M elements (column sums), each element's column (the clip's u), and
    # PackedAt's walk over each vector of `vec` elements (phases 3 and 4): every element in exactly one row and one
    # column, the ones the [nk, M, N] layout puts it in.
    for M in range(1, 9):
        for N in range(1, 9):
            pm = _pack_size((2, M, N))
            K = PACK_ELEMS // pm ** 2
            for nk in sorted({1, 3, K}):
                n = nk * M * N
                rows, cols, row_cols = (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
                walk = (ctypes.c_int32 * (2 * n))()
                lib.came_packed_indices(M, N, nk, vec, rows, cols, row_cols, walk)
                assert list(rows) == list(range(n))
                expect_cols = [kk * M * N + i * N + j for kk in range(nk) for j in range(N) for i in range(M)]
                assert list(cols) == expect_cols and sorted(cols) == list(range(n)), (M, N, nk)
                for e in range(n):
                    q, j = divmod(e, N)
                    col = (q // M) * N + j
                    assert row_cols[e] == col and cols[col * M + q % M] == e, (M, N, nk, e)
                    assert (walk[2 * e], walk[2 * e + 1]) == (q, col), (M, N, nk, vec, e)


def test_conv_weights_get_few_blocks_and_a_small_table(lib):
    # ResNet-50 (bench/shapes.py): cut into stripes, its [Cout, Cin, kh, kw] conv weights made one block per
    # kh x kw matrix (13.4M per phase), 2.2M finalize blocks and a workspace of 243 MiB (the B*N column
    # statistics' partials and fp64 W pass the 64 MiB cap at any stripe height); packed, a block holds K whole
    # matrices (K = 4096 for 1x1, 256 for 3x3, 64 for 7x7): the same 7,999 blocks per phase as the Triton
    # backend's plan, no finalize but the fc layer's, no phase 2, a workspace of 0.3 MiB (the fc layer's
    # partials and W, one float per packed or flat block). The table is per tensor either way: 161 entries
    # of 128 bytes and the prefix sums, 23.8 KB.
    import sys
    sys.path.insert(0, ROOT)
    from bench import shapes as bench_shapes
    dims_list = bench_shapes.resnet50()
    assert sum(math.prod(d) for d in dims_list) == 25_557_032
    packed = _layout(lib, dims_list)
    _check_layout(lib, dims_list, packed)
    n = len(dims_list)
    per_phase = {k: packed[k][-1] for k in ("main", "reg", "rest", "fin", "clip")}
    assert packed["packed"] and per_phase["main"] <= 10_000 and per_phase["main"] == 7_999, per_phase
    assert per_phase["reg"] + per_phase["rest"] == per_phase["main"] and per_phase["clip"] == 0
    assert per_phase["reg"] == 16  # the fc layer [1000, 2048]: its 16 stripes
    assert per_phase["fin"] == 17  # its 16 column blocks (2048 columns / 128) and one mean block
    assert lib.came_table_bytes(n) < 2 ** 20 and lib.came_table_bytes(n) == 161 * 128 + 5 * 162 * 4
    assert packed["tiles"] == 1 and 4 * packed["ws"] < 2 ** 20 // 3
    stripes = _layout(lib, dims_list, pack=False)  # as before packing (and CAME_KERNELS_CUDA_PACK=0)
    _check_layout(lib, dims_list, stripes)
    assert not stripes["packed"] and stripes["main"][-1] > 1000 * per_phase["main"]
    # one block per conv matrix, the fc layer in one stripe (the cap asks for the tallest), a chunk per 1-D tensor
    assert stripes["main"][-1] == 13_385_920 + 1 + 107 and stripes["tiles"] == 16
    assert stripes["fin"][-1] > 2_000_000 and 4 * stripes["ws"] > 200 * 2 ** 20
