// A shared batch: one region holding the layout header, the slot-state words and the field
// arrays. The manager creates it; workers attach by name and write their slot in place.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "batch_layout.h"
#include "shm_region.h"
#include "slot_state.h"

namespace vlarl {

class ShmBatch {
 public:
  static std::shared_ptr<ShmBatch> create(const std::string& name, size_t num_envs,
                                          const std::vector<FieldSpec>& specs) {
    Header header;
    size_t size = make_layout(num_envs, specs, &header);
    auto batch = std::shared_ptr<ShmBatch>(new ShmBatch(ShmRegion::create(name, size)));
    std::memcpy(batch->region_.data(), &header, sizeof(Header));  // fresh pages are zero: states start at 0
    return batch;
  }

  static std::shared_ptr<ShmBatch> attach(const std::string& name) {
    auto batch = std::shared_ptr<ShmBatch>(new ShmBatch(ShmRegion::attach(name)));
    const Header* h = batch->header();
    if (batch->region_.size() < sizeof(Header) || h->magic != kMagic || h->total_size > batch->region_.size())
      throw std::runtime_error("shared memory '" + name + "' is not a vlarl-fast batch");
    return batch;
  }

  const Header* header() const { return static_cast<const Header*>(region_.data()); }
  size_t num_envs() const { return header()->num_envs; }
  size_t num_fields() const { return header()->num_fields; }
  const std::string& name() const { return region_.name(); }
  bool owner() const { return region_.owner(); }
  size_t size() const { return region_.size(); }

  const FieldDesc& field(const std::string& fname) const {
    for (size_t i = 0; i < num_fields(); ++i)
      if (fname == header()->fields[i].name) return header()->fields[i];
    throw std::out_of_range("no field '" + fname + "' in batch " + name());
  }
  const FieldDesc& field(size_t i) const { return header()->fields[i]; }

  uint8_t* field_ptr(const FieldDesc& f) const { return static_cast<uint8_t*>(region_.data()) + f.offset; }
  uint8_t* slot_ptr(const FieldDesc& f, size_t env) const {
    check_env(env);
    return field_ptr(f) + env * f.bytes_per_env;
  }

  uint32_t* state_word(size_t env) const {
    check_env(env);
    return reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(region_.data()) + header()->states_offset) + env;
  }
  uint32_t state(size_t env) const { return load_state(state_word(env)); }
  void set_state(size_t env, uint32_t v) const { store_state(state_word(env), v); }
  bool wait(size_t env, uint32_t want, double timeout_s) const { return wait_state(state_word(env), want, timeout_s); }

  void close() { region_.release(); }
  bool closed() const { return region_.data() == nullptr; }

 private:
  explicit ShmBatch(ShmRegion region) : region_(std::move(region)) {}
  void check_env(size_t env) const {
    if (closed()) throw std::runtime_error("batch " + name() + " is closed");
    if (env >= num_envs()) throw std::out_of_range("env index out of range");
  }
  ShmRegion region_;
};

}  // namespace vlarl
