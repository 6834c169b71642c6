// Host build of csrc/plan.h for tests/test_cuda_plan_host.py (g++, no CUDA, no torch): the layout of a group
// (slot order, workspace offsets, block prefix sums) and the block -> slot search the kernels run.
// Plain C ABI for ctypes.
#include <cstdint>
#include <vector>

#include "plan.h"

using namespace came;

extern "C" {

// shapes: n x 4 int64 (numel, B, M, N). Outputs (caller-sized): order[n], ws_col[n], ws_blk[n],
// main_start[n+1], fin_start[n+1]; returns ws_floats.
int64_t came_layout(const int64_t* shapes, int n, int32_t* order, int64_t* ws_col, int64_t* ws_blk,
                    int64_t* main_start, int64_t* fin_start) {
  std::vector<Shape> v;
  for (int i = 0; i < n; ++i) v.push_back(Shape{shapes[4 * i], shapes[4 * i + 1], shapes[4 * i + 2], shapes[4 * i + 3]});
  const Layout L = make_layout(v);
  for (int k = 0; k < n; ++k) {
    order[k] = L.order[k];
    ws_col[k] = L.ws_col[k];
    ws_blk[k] = L.ws_blk[k];
  }
  for (int k = 0; k <= n; ++k) {
    main_start[k] = L.main_start[k];
    fin_start[k] = L.fin_start[k];
  }
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

// Per-shape block counts, as the kernels compute them: main, finalize column blocks, finalize mean blocks,
// colpart floats, fin_vec, block_per_mean.
void came_counts(const int64_t* s, int64_t* out) {
  const Shape sh{s[0], s[1], s[2], s[3]};
  out[0] = main_blocks_of(sh);
  out[1] = fin_col_blocks_of(sh);
  out[2] = fin_mean_blocks_of(sh);
  out[3] = colpart_floats_of(sh);
  out[4] = fin_vec(sh.N);
  out[5] = block_per_mean(sh.M) ? 1 : 0;
}

int64_t came_table_bytes(int64_t n) { return table_bytes(n); }
int64_t came_desc_bytes() { return sizeof(TensorDesc); }

}  // extern "C"
