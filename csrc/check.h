// check.h: CAME_CHECK, the extension's argument checks, with messages built without iostreams.
//
// TORCH_CHECK with arguments other than one C string formats them through c10::str, i.e. a std::ostringstream
// instantiated in this library. Where the extension is built with another C++ toolchain than torch (a newer
// GCC than the one torch was built with, say), that stream can crash the process on the error path, which
// no successful call exercises: the check meant to protect the caller then takes the process down. So the
// message is appended into a std::string here (to_string, snprintf, c10::toString) and handed to TORCH_CHECK
// as one C string, the path a literal message takes. The condition is tested first: nothing is built on
// success.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace came {
namespace msg {

inline void put(std::string& s, const char* x) { s += x; }
inline void put(std::string& s, const std::string& x) { s += x; }
inline void put(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void put(std::string& s, T x) {
  s += std::to_string(x);
}
inline void put(std::string& s, double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  s += buf;
}
inline void put(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void put(std::string& s, const c10::Device& d) {
  s += d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : "another device type";
  if (d.has_index()) {
    s += ':';
    s += std::to_string(d.index());
  }
}
inline void put(std::string& s, c10::IntArrayRef a) {
  s += "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  s += "]";
}
inline void put(std::string& s, const std::vector<int64_t>& a) { put(s, c10::IntArrayRef(a)); }

template <typename... Args>
std::string join(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

}  // namespace msg
}  // namespace came

#define CAME_CHECK(cond, ...)                                              \
  do {                                                                     \
    if (C10_UNLIKELY(!(cond))) {                                           \
      const std::string came_check_msg_ = ::came::msg::join(__VA_ARGS__);  \
      TORCH_CHECK(false, came_check_msg_.c_str());                         \
    }                                                                      \
  } while (false)
