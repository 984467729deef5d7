// ABN_CHECK: argument errors that reach Python as RuntimeError with exactly the given text (no C++
// file and line, unlike STD_TORCH_CHECK): these messages are for users.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#define ABN_CHECK(condition, ...)                                                           \
  do {                                                                                      \
    if (!(condition)) {                                                                     \
      throw std::runtime_error(::inplace_abn::error_message("inplace_abn: ", __VA_ARGS__)); \
    }                                                                                       \
  } while (0)

namespace inplace_abn {

template <typename... Parts>
std::string error_message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

}  // namespace inplace_abn
