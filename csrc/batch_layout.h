// The layout of a shared batch: named fields, each [num_envs, *shape] of one dtype, every field
// starting on a 64-byte boundary (a cache line: workers writing neighbouring fields do not share
// lines, and the arrays suit vector loads). The layout is serialised into the region's header,
// so a process can attach by name alone.
//
// Region:  [Header][pad][EpochBlock][pad][num_envs slot-state words][pad][num_envs slot stamps][pad]
//          [field 0: num_envs x bytes_per_env][pad to 64][field 1] ...
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "epoch_waiters.h"

namespace vlarl {

constexpr size_t kAlign = 64;
constexpr size_t kMaxFields = 16;
constexpr size_t kMaxDims = 4;
constexpr size_t kNameLen = 32;
constexpr uint64_t kMagic = 0x564c41524c424154ULL;  // "VLARLBAT"
constexpr uint32_t kLayoutVersion = 3;
constexpr size_t kShmNameLen = 256;  // POSIX names up to 249 characters (see shm_region.h), NUL-terminated

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// dtypes by numpy type character: ? bool, b/B int8/uint8, h/H int16/uint16, i/I int32/uint32,
// q/Q int64/uint64, e/f/d float16/32/64. Returns 0 for anything else.
inline size_t dtype_size_or_zero(char code) {
  switch (code) {
    case '?': case 'b': case 'B': return 1;
    case 'h': case 'H': case 'e': return 2;
    case 'i': case 'I': case 'f': return 4;
    case 'q': case 'Q': case 'd': return 8;
    default: return 0;
  }
}

inline size_t dtype_size(char code) {
  size_t n = dtype_size_or_zero(code);
  if (n == 0) throw std::invalid_argument(std::string("unsupported dtype code '") + code + "'");
  return n;
}

struct FieldDesc {
  char name[kNameLen];
  char dtype;  // numpy type character, see dtype_size
  uint8_t ndim;
  int64_t shape[kMaxDims];  // per env
  uint64_t offset;          // from the start of the region, a multiple of kAlign
  uint64_t bytes_per_env;
};

struct Header {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t reserved;
  uint64_t num_envs;
  uint64_t num_fields;
  uint64_t total_size;
  uint64_t sync_offset;    // the EpochBlock: epoch word, stamp counter, waiter entries
  uint64_t states_offset;  // num_envs uint32 slot-state words
  uint64_t stamps_offset;  // num_envs uint32: when each slot last changed state (its order among changes)
  char shm_name[kShmNameLen];  // the name it was created under: a process attached by descriptor can say which batch
  FieldDesc fields[kMaxFields];
};

struct FieldSpec {
  std::string name;
  char dtype;
  std::vector<int64_t> shape;
};

// Fills `header` and returns the region size needed for `num_envs` slots of `specs`.
inline size_t make_layout(size_t num_envs, const std::vector<FieldSpec>& specs, Header* header) {
  if (num_envs == 0 || num_envs > (1u << 20)) throw std::invalid_argument("num_envs must be 1 to 2^20");
  if (specs.empty() || specs.size() > kMaxFields) throw std::invalid_argument("a batch needs 1 to 16 fields");
  std::memset(header, 0, sizeof(Header));
  header->magic = kMagic;
  header->layout_version = kLayoutVersion;
  header->num_envs = num_envs;
  header->num_fields = specs.size();
  size_t offset = align_up(sizeof(Header));
  header->sync_offset = offset;
  offset = align_up(offset + sizeof(EpochBlock));
  header->states_offset = offset;
  offset = align_up(offset + num_envs * sizeof(uint32_t));
  header->stamps_offset = offset;
  offset = align_up(offset + num_envs * sizeof(uint32_t));
  for (size_t i = 0; i < specs.size(); ++i) {
    const FieldSpec& s = specs[i];
    if (s.name.empty() || s.name.size() >= kNameLen)
      throw std::invalid_argument("field names must have 1 to 31 characters: '" + s.name + "'");
    for (size_t j = 0; j < i; ++j)
      if (s.name == header->fields[j].name) throw std::invalid_argument("duplicate field '" + s.name + "'");
    if (s.shape.size() > kMaxDims)
      throw std::invalid_argument("field '" + s.name + "' has more than 4 dimensions per env");
    FieldDesc& f = header->fields[i];
    std::memcpy(f.name, s.name.data(), s.name.size());
    f.dtype = s.dtype;
    f.ndim = static_cast<uint8_t>(s.shape.size());
    size_t n = dtype_size(s.dtype);
    for (size_t d = 0; d < s.shape.size(); ++d) {
      if (s.shape[d] <= 0 || s.shape[d] > (int64_t{1} << 31))
        throw std::invalid_argument("field '" + s.name + "' has a dimension outside 1..2^31");
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

// Checks a header read from a region of `region_size` bytes (attach must not trust it blindly).
inline void validate_layout(const Header& h, size_t region_size, const std::string& name) {
  if (region_size < sizeof(Header) || h.magic != kMagic)
    throw std::runtime_error("shared memory " + name + " is not a vlarl-fast batch");
  if (h.layout_version != kLayoutVersion)
    throw std::runtime_error("shared memory " + name + " has batch layout version " +
                             std::to_string(h.layout_version) + ", this build reads version " +
                             std::to_string(kLayoutVersion) + " (mixed installs?)");
  bool ok = h.total_size <= region_size && h.num_fields >= 1 && h.num_fields <= kMaxFields && h.num_envs >= 1 &&
            h.sync_offset % kAlign == 0 && h.sync_offset + sizeof(EpochBlock) <= h.total_size &&
            h.states_offset % kAlign == 0 && h.states_offset + h.num_envs * sizeof(uint32_t) <= h.total_size &&
            h.stamps_offset % kAlign == 0 && h.stamps_offset + h.num_envs * sizeof(uint32_t) <= h.total_size &&
            h.shm_name[kShmNameLen - 1] == '\0';
  for (size_t i = 0; ok && i < h.num_fields; ++i) {
    const FieldDesc& f = h.fields[i];
    ok = f.name[kNameLen - 1] == '\0' && f.ndim <= kMaxDims && dtype_size_or_zero(f.dtype) != 0 &&
         f.offset % kAlign == 0 && f.offset + f.bytes_per_env * h.num_envs <= h.total_size;
  }
  if (!ok) throw std::runtime_error("shared memory " + name + " holds a corrupt batch header");
}

}  // namespace vlarl
