// The layout of a shared batch: named fields, each [num_envs, *shape] of one dtype, every
// field starting on a 64-byte boundary (a cache line: workers writing neighbouring fields do
// not share lines). The layout is serialised into the region's header so that a process can
// attach by name alone.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace vlarl {

constexpr size_t kAlign = 64;
constexpr size_t kMaxFields = 16;
constexpr size_t kMaxDims = 4;
constexpr size_t kNameLen = 32;
constexpr uint64_t kMagic = 0x564c41524c424154ULL;  // "VLARLBAT"

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

inline size_t dtype_size(char code) {
  switch (code) {
    case 'u': return 1;  // uint8
    case 'b': return 1;  // bool
    case 'f': return 4;  // float32
    case 'i': return 4;  // int32
    case 'l': return 8;  // int64
    case 'd': return 8;  // float64
    default: throw std::invalid_argument(std::string("unsupported dtype code '") + code + "'");
  }
}

struct FieldDesc {
  char name[kNameLen];
  char dtype;
  uint8_t ndim;
  int64_t shape[kMaxDims];  // per env
  uint64_t offset;          // from the start of the region
  uint64_t bytes_per_env;
};

struct Header {
  uint64_t magic;
  uint64_t num_envs;
  uint64_t num_fields;
  uint64_t total_size;
  uint64_t states_offset;  // num_envs uint32 slot-state words
  FieldDesc fields[kMaxFields];
};

struct FieldSpec {
  std::string name;
  char dtype;
  std::vector<int64_t> shape;
};

// Fills `header` and returns the region size needed for `num_envs` slots of `specs`.
inline size_t make_layout(size_t num_envs, const std::vector<FieldSpec>& specs, Header* header) {
  if (num_envs == 0) throw std::invalid_argument("num_envs must be positive");
  if (specs.empty() || specs.size() > kMaxFields)
    throw std::invalid_argument("a batch needs 1 to 16 fields");
  std::memset(header, 0, sizeof(Header));
  header->magic = kMagic;
  header->num_envs = num_envs;
  header->num_fields = specs.size();
  size_t offset = align_up(sizeof(Header));
  header->states_offset = offset;
  offset = align_up(offset + num_envs * sizeof(uint32_t));
  for (size_t i = 0; i < specs.size(); ++i) {
    const FieldSpec& s = specs[i];
    if (s.name.empty() || s.name.size() >= kNameLen)
      throw std::invalid_argument("field names must have 1 to 31 characters: '" + s.name + "'");
    for (size_t j = 0; j < i; ++j)
      if (s.name == header->fields[j].name) throw std::invalid_argument("duplicate field '" + s.name + "'");
    if (s.shape.size() > kMaxDims) throw std::invalid_argument("field '" + s.name + "' has more than 4 dims");
    FieldDesc& f = header->fields[i];
    std::strncpy(f.name, s.name.c_str(), kNameLen - 1);
    f.dtype = s.dtype;
    f.ndim = static_cast<uint8_t>(s.shape.size());
    size_t n = dtype_size(s.dtype);
    for (size_t d = 0; d < s.shape.size(); ++d) {
      if (s.shape[d] <= 0) throw std::invalid_argument("field '" + s.name + "' has a non-positive dimension");
      f.shape[d] = s.shape[d];
      n *= static_cast<size_t>(s.shape[d]);
    }
    f.bytes_per_env = n;
    f.offset = offset;
    offset = align_up(offset + n * num_envs);
  }
  header->total_size = offset;
  return offset;
}

}  // namespace vlarl
