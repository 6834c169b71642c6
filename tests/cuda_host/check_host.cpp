// csrc/check.h on the host: CAME_CHECK's message for each argument type the extension's checks format, and
// that a passing check builds nothing. Built and called by tests/test_cuda_check_host.py.
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"

namespace {
int built = 0;
const char* counted() {
  ++built;
  return "x";
}
}  // namespace

extern "C" int came_check_demo(int which, char* out, int n) {
  const std::vector<int64_t> shape{2, 3};
  try {
    if (which == 0) {
      CAME_CHECK(false, "came_kernels: ", std::string("grads[3]"), " is ", c10::ScalarType::Double, " of shape ",
                 c10::IntArrayRef(shape), " on ", c10::Device(c10::DeviceType::CUDA, 1), " and ",
                 c10::Device(c10::DeviceType::CPU), ", got ", int64_t{-5}, " ", size_t{7}, " ", 0.25, " ", true,
                 " ", shape);
    } else {
      CAME_CHECK(true, "never ", counted());
      std::snprintf(out, n, "built %d", built);
      return 0;
    }
  } catch (const c10::Error& e) {
    std::snprintf(out, n, "%s", e.what_without_backtrace());
    return 1;
  }
  return 2;
}
