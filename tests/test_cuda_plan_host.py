"""The CUDA extension's launch layout (csrc/plan.h), proven on the CPU.

plan.h decides, on the host, how one launch per phase kernel covers a whole (device, dtype) group: the slot
order (largest blocks first), each tensor's workspace slices and the block prefix sums; the kernels find
their tensor with plan.h's owner_of. Both are compiled here with g++ (tests/cuda_host/plan_host.cpp) and
checked against a plain Python model of the decomposition, without a GPU. What runs only on a GPU (the
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
ROWS, FLAT_CHUNK, WARPS, BLOCK_MEAN_ROWS = 64, 16384, 8, 2048


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++ not on PATH, CXX unset): cannot build the host plan test")
    out = tmp_path_factory.mktemp("plan_host") / "plan_host.so"
    subprocess.run([CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}/csrc",
                    f"{ROOT}/tests/cuda_host/plan_host.cpp", "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


def _shape(dims):
    """(numel, B, M, N) as the kernels see a tensor of these dims."""
    numel = math.prod(dims)
    if len(dims) >= 2:
        M, N = dims[-2], dims[-1]
        return numel, numel // (M * N), M, N
    return numel, 0, 0, 0


def _model(s):
    """The decomposition in plain Python: main blocks, column finalize blocks, mean blocks, partial floats."""
    numel, B, M, N = s
    if M == 0:
        return -(-numel // FLAT_CHUNK), 0, 0, 0
    stripes = B * -(-M // ROWS)
    fv = 4 if N % 4 == 0 else 1
    means = B if M >= BLOCK_MEAN_ROWS else -(-B // WARPS)
    return stripes, -(-(B * N) // (32 * fv)), means, -(-(stripes * N) // 4) * 4


def _layout(lib, dims_list):
    n = len(dims_list)
    shapes = (ctypes.c_int64 * (4 * n))(*[x for d in dims_list for x in _shape(d)])
    order = (ctypes.c_int32 * n)()
    ws_col, ws_blk = (ctypes.c_int64 * n)(), (ctypes.c_int64 * n)()
    main, fin = (ctypes.c_int64 * (n + 1))(), (ctypes.c_int64 * (n + 1))()
    lib.came_layout.restype = ctypes.c_int64
    ws = lib.came_layout(shapes, n, order, ws_col, ws_blk, main, fin)
    return list(order), list(ws_col), list(ws_blk), list(main), list(fin), ws


# GPT-2-like and odd shapes: 1-D, 0-d, 1xN, Nx1, ragged, batched 3-D/4-D, tall (block-per-matrix means).
SHAPES = [(768,), (), (50257, 768), (1024, 768), (768, 2304), (2304,), (1, 33), (33, 1), (37, 53), (3, 70, 131),
          (4, 3, 3, 3), (2, 1, 5, 1), (40000,), (4099, 8), (129, 257), (768, 3072), (3072, 768), (7,)]


def test_counts_match_the_python_model(lib):
    lib.came_counts.restype = None
    for dims in SHAPES:
        s = _shape(dims)
        out = (ctypes.c_int64 * 6)()
        lib.came_counts((ctypes.c_int64 * 4)(*s), out)
        main, fin_col, fin_mean, colpart = _model(s)
        assert list(out)[:4] == [main, fin_col, fin_mean, colpart], dims
        assert out[4] == (4 if s[3] % 4 == 0 else 1) and out[5] == int(s[2] >= BLOCK_MEAN_ROWS), dims


def test_slots_are_largest_blocks_first_and_stable(lib):
    order, *_ = _layout(lib, SHAPES)
    assert sorted(order) == list(range(len(SHAPES)))

    def block_elems(dims):
        numel, B, M, N = _shape(dims)
        return min(M, ROWS) * N if M else min(numel, FLAT_CHUNK)

    keys = [block_elems(SHAPES[i]) for i in order]
    assert keys == sorted(keys, reverse=True)
    for a, b in zip(order, order[1:]):  # ties keep the group's order: the layout is fixed for fixed inputs
        if block_elems(SHAPES[a]) == block_elems(SHAPES[b]):
            assert a < b
    assert SHAPES[order[0]] in [(768, 3072)] and SHAPES[order[-1]] == ()  # widest stripes first, 0-d last


def test_prefix_sums_and_workspace_slices(lib):
    order, ws_col, ws_blk, main, fin, ws = _layout(lib, SHAPES)
    col_end = blk_end = 0
    assert main[0] == fin[0] == 0
    for k, i in enumerate(order):
        m, fc, fm, colpart = _model(_shape(SHAPES[i]))
        assert main[k + 1] - main[k] == m and fin[k + 1] - fin[k] == fc + fm
        # column partials: disjoint, in slot order, each 16-byte aligned; block partials: one per main block
        assert ws_col[k] == col_end and ws_col[k] % 4 == 0
        assert ws_blk[k] == blk_end
        col_end += colpart
        blk_end += m
    assert ws == max(col_end, blk_end, 1)


def _owners(lib, start, wide):
    n = len(start) - 1
    total = start[-1]
    out = (ctypes.c_int32 * total)()
    lib.came_owners.restype = None
    lib.came_owners((ctypes.c_int32 * (n + 1))(*start), n, total, wide, out)
    return list(out)


@pytest.mark.parametrize("wide", [0, 1], ids=["binary", "32-wide"])
def test_every_block_finds_its_tensor(lib, wide):
    # Both searches (the kernels run the 32-wide one) over both prefix sums: every block maps to the slot
    # whose range holds it; slots with no finalize blocks (flat tensors) are never chosen.
    _, _, _, main, fin, _ = _layout(lib, SHAPES)
    for start in (main, fin):
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
    lib.came_table_bytes.restype = ctypes.c_int64
    lib.came_desc_bytes.restype = ctypes.c_int64
    assert lib.came_desc_bytes() == 128
    assert lib.came_table_bytes(201) == 201 * 128 + 2 * 202 * 4
