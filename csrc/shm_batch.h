// A shared batch: one region holding the layout header, the epoch and slot-state words and the
// field arrays. The manager creates it; workers attach by name and write their slot in place,
// then publish the slot's new state; the manager waits for one slot, all of them, or any k.
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
    // fresh pages are zero: every slot state and the epoch start at 0
    std::memcpy(batch->region_.data(), &header, sizeof(Header));
    return batch;
  }

  static std::shared_ptr<ShmBatch> attach(const std::string& name) {
    auto batch = std::shared_ptr<ShmBatch>(new ShmBatch(ShmRegion::attach(name)));
    validate_layout(*batch->header(), batch->region_.size(), batch->region_.name());
    return batch;
  }

  const Header* header() const { return static_cast<const Header*>(region_.data()); }
  size_t num_envs() const { return header()->num_envs; }
  size_t num_fields() const { return header()->num_fields; }
  const std::string& name() const { return region_.name(); }
  bool owner() const { return region_.owner(); }
  size_t size() const { return region_.size(); }
  bool closed() const { return closed_; }

  const FieldDesc* find(const std::string& fname) const {
    for (size_t i = 0; i < num_fields(); ++i)
      if (fname == header()->fields[i].name) return &header()->fields[i];
    return nullptr;
  }
  const FieldDesc& field(const std::string& fname) const {
    check_open();
    const FieldDesc* f = find(fname);
    if (f == nullptr) throw std::out_of_range("no field '" + fname + "' in batch " + name());
    return *f;
  }
  const FieldDesc& field(size_t i) const { return header()->fields[i]; }

  uint8_t* field_ptr(const FieldDesc& f) const {
    check_open();
    return static_cast<uint8_t*>(region_.data()) + f.offset;
  }
  uint8_t* slot_ptr(const FieldDesc& f, size_t env) const {
    check_env(env);
    return field_ptr(f) + env * f.bytes_per_env;
  }

  uint32_t state(size_t env) const { return load_state(state_word(env)); }
  void set_state(size_t env, uint32_t v) const { store_state(state_word(env), v, epoch_word()); }
  bool compare_exchange(size_t env, uint32_t expected, uint32_t desired) const {
    return cas_state(state_word(env), expected, desired, epoch_word());
  }
  uint32_t epoch() const { return load_state(epoch_word()); }

  // Waits until slot `env` holds `want`; false on timeout (timeout_s < 0: no limit).
  bool wait(size_t env, uint32_t want, double timeout_s) const { return wait_state(state_word(env), want, timeout_s); }

  // Waits until at least `min_count` slots hold `want`; fills `ready` with the slots that hold
  // it when the wait ends (fewer than min_count on timeout). Returns whether min_count was met.
  bool wait_count(uint32_t want, size_t min_count, double timeout_s, std::vector<size_t>* ready) const {
    check_open();
    const size_t n = num_envs();
    if (min_count > n) min_count = n;
    auto scan = [&]() {
      ready->clear();
      for (size_t i = 0; i < n; ++i)
        if (load_state(state_word_unchecked(i)) == want) ready->push_back(i);
      return ready->size() >= min_count;
    };
    return wait_epoch(epoch_word(), scan, timeout_s);
  }

  // Closes this handle: the owner unlinks the name at once (attached processes keep working);
  // further calls through this handle raise. The memory is unmapped when the object dies,
  // because views into it may still be alive.
  void close() {
    closed_ = true;
    region_.unlink();
  }

 private:
  explicit ShmBatch(ShmRegion region) : region_(std::move(region)) {}
  void check_open() const {
    if (closed_) throw std::runtime_error("batch " + name() + " is closed");
  }
  void check_env(size_t env) const {
    check_open();
    if (env >= num_envs())
      throw std::out_of_range("env " + std::to_string(env) + " out of range for a batch of " +
                              std::to_string(num_envs()) + " envs");
  }
  uint32_t* state_word_unchecked(size_t env) const {
    return reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(region_.data()) + header()->states_offset) + env;
  }
  uint32_t* state_word(size_t env) const {
    check_env(env);
    return state_word_unchecked(env);
  }
  uint32_t* epoch_word() const {
    check_open();
    return reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(region_.data()) + header()->epoch_offset);
  }

  ShmRegion region_;
  bool closed_ = false;
};

}  // namespace vlarl
