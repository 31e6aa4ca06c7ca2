// Build facts reported by `vlarl-fast info`: compiler, C++ standard, build type, wait mechanism.
#pragma once

#include <map>
#include <string>

#include "batch_layout.h"
#include "slot_state.h"

#ifndef VLARL_BUILD_TYPE
#define VLARL_BUILD_TYPE "unknown"
#endif

namespace vlarl {

inline std::string compiler_id() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown compiler";
#endif
}

inline std::map<std::string, std::string> build_info() {
  return {
      {"compiler", compiler_id()},
      {"cxx_standard", "C++" + std::to_string(__cplusplus / 100 % 100)},
      {"build_type", VLARL_BUILD_TYPE},
#ifdef NDEBUG
      {"asserts", "off"},
#else
      {"asserts", "on"},
#endif
      {"wait", wait_mechanism()},
      {"layout_version", std::to_string(kLayoutVersion)},
  };
}

}  // namespace vlarl
