// Host build of csrc/plan.h for tests/test_cuda_plan_host.py (g++, no CUDA, no torch): the layout of a group
// (row tiles, slot order, workspace offsets, block prefix sums), the stripe geometry and the block -> slot
// search the kernels run. Plain C ABI for ctypes.
#include <cstdint>
#include <vector>

#include "plan.h"

using namespace came;

namespace {
// shapes: n x 5 int64 (numel, B, M, N, pm), as Shape.
std::vector<Shape> shapes_of(const int64_t* shapes, int n) {
  std::vector<Shape> v;
  for (int i = 0; i < n; ++i) {
    const int64_t* s = shapes + 5 * i;
    v.push_back(Shape{s[0], s[1], s[2], s[3], s[4]});
  }
  return v;
}
}  // namespace

extern "C" {

// shapes: n x 5 int64 (numel, B, M, N, pm); clip_cols, cap_floats as make_layout takes them. Outputs
// (caller-sized): order[n], tiles_t[n] (as TensorDesc::tiles holds it: desc_tiles), ws_col[n], ws_clip[n],
// main_start[n+1], fin_start[n+1], clip_start[n+1], reg_start[n+1], rest_start[n+1], and info[4] = (group
// tiles, clip_cols, packed, packed_blocks); returns ws_floats.
int64_t came_layout(const int64_t* shapes, int n, int64_t clip_cols, int64_t cap_floats, int32_t* order,
                    int64_t* tiles_t, int64_t* ws_col, int64_t* ws_clip, int64_t* main_start, int64_t* fin_start,
                    int64_t* clip_start, int64_t* reg_start, int64_t* rest_start, int64_t* info) {
  const Layout L = make_layout(shapes_of(shapes, n), clip_cols, cap_floats);
  for (int k = 0; k < n; ++k) {
    order[k] = L.order[k];
    tiles_t[k] = desc_tiles(L.tiles_t[k], L.pm[k]);
    ws_col[k] = L.ws_col[k];
    ws_clip[k] = L.ws_clip[k];
  }
  for (int k = 0; k <= n; ++k) {
    main_start[k] = L.main_start[k];
    fin_start[k] = L.fin_start[k];
    clip_start[k] = L.clip_start[k];
    reg_start[k] = L.reg_start[k];
    rest_start[k] = L.rest_start[k];
  }
  info[0] = L.tiles;
  info[1] = L.clip_cols;
  info[2] = L.packed ? 1 : 0;
  info[3] = L.packed_blocks;
  return L.ws_floats;
}

// The default layout (kClipCols, kWsCapFloats): its group tiles and ws_floats.
int64_t came_default_ws(const int64_t* shapes, int n, int64_t* tiles) {
  const Layout L = make_layout(shapes_of(shapes, n));
  *tiles = L.tiles;
  return L.ws_floats;
}

// owner_of (wide = 0) or the kernels' 32-wide owner_of_32 (wide = 1, lanes run in a loop) for every block b
// in [0, total): out[b] = slot.
void came_owners(const int32_t* start, int n, int32_t total, int wide, int32_t* out) {
  auto ballot = [](auto pred) {
    uint32_t mask = 0;
    for (int lane = 0; lane < 32; ++lane) mask |= static_cast<uint32_t>(pred(lane) ? 1 : 0) << lane;
    return mask;
  };
  for (int32_t b = 0; b < total; ++b) out[b] = wide ? owner_of_32(start, n, b, ballot) : owner_of(start, n, b);
}

// Per-shape counts (s: numel, B, M, N, pm) at `tiles` row tiles per stripe (the tensor's own) and clip_cols, as
// the kernels compute them: main, finalize column blocks, finalize mean blocks, floats of one column-partial
// array, fin_vec, block_per_mean, column-partial arrays, clip floats, phase-2 blocks, register-path blocks,
// elements of the first block (the sort key), clip_from_w.
void came_counts(const int64_t* s, int64_t tiles, int64_t clip_cols, int64_t* out) {
  const Shape sh{s[0], s[1], s[2], s[3], s[4]};
  out[0] = main_blocks_of(sh, tiles);
  out[1] = fin_col_blocks_of(sh);
  out[2] = fin_mean_blocks_of(sh);
  out[3] = colpart_floats_of(sh, tiles);
  out[4] = fin_vec(sh.N);
  out[5] = block_per_mean(sh.M) ? 1 : 0;
  out[6] = colpart_arrays_of(sh, clip_cols);
  out[7] = clip_floats_of(sh, tiles, clip_cols);
  out[8] = clip_blocks_of(sh, tiles, clip_cols);
  out[9] = reg_blocks_of(sh, tiles, clip_cols);
  out[10] = block_elems_of(sh, tiles);
  out[11] = clip_from_w(sh, clip_cols) ? 1 : 0;
}

// The blocks of a packed tensor as the kernels cut it (pack_block_of): for block `local` < blocks,
// out[4*local ...] = (k0, nk, e0, n).
void came_pack_blocks(int64_t B, int64_t M, int64_t N, int64_t pm, int64_t blocks, int64_t* out) {
  for (int64_t local = 0; local < blocks; ++local) {
    const PackBlock p = pack_block_of(B, M, N, pm, local);
    out[4 * local] = p.k0;
    out[4 * local + 1] = p.nk;
    out[4 * local + 2] = p.e0;
    out[4 * local + 3] = p.n;
  }
}

// Inside a packed block of nk matrices [M, N], as the kernels index it: rows[q*N + j] = packed_row_elem
// (q < nk*M, j < N); cols[q*M + i] = packed_col_elem (q < nk*N, i < M); row_cols[q*N + j] = packed_col_of
// (the column of element (q, j)); walk[2e], walk[2e+1] = PackedAt's (q, col()) of element e < nk*M*N, walked
// from the start of its vector of `vec` elements, as the elementwise passes do.
void came_packed_indices(int M, int N, int nk, int vec, int32_t* rows, int32_t* cols, int32_t* row_cols,
                         int32_t* walk) {
  for (int q = 0; q < nk * M; ++q) {
    for (int j = 0; j < N; ++j) {
      rows[q * N + j] = packed_row_elem(N, q, j);
      row_cols[q * N + j] = packed_col_of(M, N, q, j);
    }
  }
  for (int q = 0; q < nk * N; ++q) {
    for (int i = 0; i < M; ++i) cols[q * M + i] = packed_col_elem(M, N, q, i);
  }
  const int n = nk * M * N;
  for (int i0 = 0; i0 < n; i0 += vec) {
    PackedAt at(M, N, i0);
    for (int e = 0; e < vec; ++e, at.next(M, N)) {
      if (i0 + e < n) {
        walk[2 * (i0 + e)] = at.q;
        walk[2 * (i0 + e) + 1] = at.col();
      }
    }
  }
}

// pack_size as make_group calls it, and a TensorDesc's tiles field read back by the kernels (pack_of).
int64_t came_pack_size(int64_t ndim, int64_t M, int64_t N) { return pack_size(ndim, M, N); }
int64_t came_pack_of(int64_t tiles, int64_t pm) {
  TensorDesc d{};
  d.tiles = desc_tiles(tiles, pm);
  return pack_of(d);
}
// (kPackElems, kPackMax, kPackRows, pack_matrices(1), pack_matrices(4), pack_matrices(8)).
void came_pack_consts(int64_t* out) {
  out[0] = kPackElems;
  out[1] = kPackMax;
  out[2] = kPackRows;
  out[3] = pack_matrices(1);
  out[4] = pack_matrices(4);
  out[5] = pack_matrices(8);
}

// The rows every block of a factored tensor covers, as the kernels walk them: for block `local` (< blocks),
// its stripe (stripe_of) and that stripe's row tiles (row_tile): out[2k], out[2k+1] = row0, row_end of the
// k-th row tile in launch order; stripe_b[local] = the stripe's matrix. Returns the row tiles written.
int64_t came_row_tiles(int64_t M, int64_t N, int64_t tiles, int64_t blocks, int64_t* out, int64_t* stripe_b) {
  int64_t k = 0;
  for (int64_t local = 0; local < blocks; ++local) {
    const Stripe s = stripe_of(M, N, local, tiles);
    stripe_b[local] = s.b;
    for (int64_t t = 0; t < row_tiles_of(s); ++t) {
      const Stripe x = row_tile(s, t);
      out[2 * k] = x.row0;
      out[2 * k + 1] = x.row_end;
      ++k;
    }
  }
  return k;
}

int came_reg_groups(int64_t N, int vec) { return reg_groups(N, vec); }
int64_t came_table_bytes(int64_t n) { return table_bytes(n); }
int64_t came_desc_bytes() { return sizeof(TensorDesc); }
int64_t came_clip_cols() { return kClipCols; }
int64_t came_ws_cap_floats() { return kWsCapFloats; }

}  // extern "C"
