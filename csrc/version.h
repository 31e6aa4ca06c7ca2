// Build facts reported by `vlarl-fast info`.
#pragma once

#include <string>

namespace vlarl {

inline std::string build_info() {
  std::string compiler =
#if defined(__clang__)
      "clang " __clang_version__;
#elif defined(__GNUC__)
      "gcc " __VERSION__;
#else
      "unknown compiler";
#endif
#ifdef NDEBUG
  const char* type = "release";
#else
  const char* type = "debug";
#endif
  return compiler + ", C++" + std::to_string(__cplusplus / 100 % 100) + ", " + type;
}

}  // namespace vlarl
