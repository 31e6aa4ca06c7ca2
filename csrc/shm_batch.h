// A shared batch: one region holding the layout header, the epoch block, the slot-state words and
// their stamps, and the field arrays. The manager creates it; workers attach (by name or by a
// passed descriptor) and write their slot in place, then publish the slot's new state; the
// manager publishes many slots in one call and waits for all, or the first k, of a set of slots.
//
// Stamps: every state change takes the next number of a shared counter and stores it in the
// slot's stamp before the state itself, so a reader that sees the state sees when it was set.
// wait_slots returns ready slots oldest first: "the first k envs to finish" is exact, and an env
// that finished long ago is never passed over for one that finished just now.
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "batch_layout.h"
#include "epoch_waiters.h"
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
    const std::string& n = batch->region_.name();
    std::memcpy(header.shm_name, n.data(), std::min(n.size(), kShmNameLen - 1));
    // fresh pages are zero: every slot state, stamp, the epoch and the waiter entries start at 0
    std::memcpy(batch->region_.data(), &header, sizeof(Header));
    return batch;
  }

  static std::shared_ptr<ShmBatch> attach(const std::string& name) {
    return validated(std::shared_ptr<ShmBatch>(new ShmBatch(ShmRegion::attach(name))));
  }

  // Attaches through a descriptor another process passed (works after the name is unlinked).
  static std::shared_ptr<ShmBatch> attach_fd(int fd) {
    return validated(std::shared_ptr<ShmBatch>(
        new ShmBatch(ShmRegion::attach_fd(fd, "descriptor " + std::to_string(fd)))));
  }

  const Header* header() const { return static_cast<const Header*>(region_.data()); }
  size_t num_envs() const { return header()->num_envs; }
  size_t num_fields() const { return header()->num_fields; }
  std::string name() const { return header()->shm_name; }
  bool owner() const { return region_.owner(); }
  size_t size() const { return region_.size(); }
  bool closed() const { return closed_; }
  int fd() const {
    check_open();
    return region_.fd();
  }

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
  uint32_t stamp(size_t env) const {
    check_env(env);
    return as_atomic(stamp_word(env))->load(std::memory_order_acquire);
  }
  uint32_t epoch() const { return as_atomic(&sync()->epoch)->load(std::memory_order_seq_cst); }

  void set_state(size_t env, uint32_t v) const {
    uint32_t* w = state_word(env);
    stamp_slot(env);
    store_state(w, v);
    bump_epoch(sync());
  }

  // Publishes `v` in every listed slot (ids checked first: nothing changes on a bad one), with one
  // epoch bump for the lot. Equal to set_state on each id in turn, bar the order of the wake-ups.
  void set_states(const size_t* ids, size_t n, uint32_t v) const {
    check_ids(ids, n);
    for (size_t j = 0; j < n; ++j) {
      stamp_slot(ids[j]);
      as_atomic(state_word_unchecked(ids[j]))->store(v, std::memory_order_release);
    }
    if (n > 0) bump_epoch(sync(), static_cast<uint32_t>(n));
    for (size_t j = 0; j < n; ++j) futex_wake(state_word_unchecked(ids[j]), value_bit(v));
  }

  bool compare_exchange(size_t env, uint32_t expected, uint32_t desired) const {
    uint32_t* w = state_word(env);
    if (load_state(w) != expected) return false;
    // stamped before the exchange, so a reader that sees `desired` sees its stamp; a lost race
    // (rare: the pre-check passed) only moves the stamp of a slot someone else just changed
    stamp_slot(env);
    if (!cas_state(w, expected, desired)) return false;
    bump_epoch(sync());
    return true;
  }

  // Waits until slot `env` holds `want`; false on timeout (timeout_s < 0: no limit).
  bool wait(size_t env, uint32_t want, double timeout_s, unsigned* sleeps = nullptr) const {
    return wait_state(state_word(env), want, timeout_s, sleeps);
  }

  // Worker side of a round trip in one call: publish `publish` in slot `env`, then wait until it
  // holds `want` (the next command). False on timeout.
  bool publish_and_wait(size_t env, uint32_t publish, uint32_t want, double timeout_s) const {
    set_state(env, publish);
    return wait(env, want, timeout_s);
  }

  // Waits until at least `min_count` of the listed slots hold `want` (min_count is capped at n).
  // Fills `ready` with the listed slots that hold it when the wait ends, oldest state change
  // first (fewer than min_count on timeout). Returns whether min_count was met.
  bool wait_slots(const size_t* ids, size_t n, uint32_t want, size_t min_count, double timeout_s,
                  std::vector<size_t>* ready, unsigned* sleeps = nullptr) const {
    check_ids(ids, n);
    if (min_count > n) min_count = n;
    auto deficit = [&]() -> size_t {
      ready->clear();
      for (size_t j = 0; j < n; ++j)
        if (load_state(state_word_unchecked(ids[j])) == want) ready->push_back(ids[j]);
      return ready->size() >= min_count ? 0 : min_count - ready->size();
    };
    EpochWaiter waiter(sync());
    bool met = waiter.wait(deficit, timeout_s, sleeps);
    order_by_stamp(ready);
    return met;
  }

  // wait_slots over every slot of the batch.
  bool wait_count(uint32_t want, size_t min_count, double timeout_s, std::vector<size_t>* ready) const {
    check_open();
    std::vector<size_t> all(num_envs());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    return wait_slots(all.data(), all.size(), want, min_count, timeout_s, ready);
  }

  // Closes this handle: the owner unlinks the name at once (attached processes keep working);
  // further calls through this handle raise. The memory is unmapped when the object dies,
  // because views into it may still be alive.
  void close() {
    closed_ = true;
    region_.unlink();
  }

  // Removes the name while the batch stays in use (owner only; idempotent): processes that have
  // attached, or hold a descriptor, keep working; nobody can attach by name any more.
  void unlink() {
    check_open();
    region_.unlink();
  }

 private:
  explicit ShmBatch(ShmRegion region) : region_(std::move(region)) {}
  static std::shared_ptr<ShmBatch> validated(std::shared_ptr<ShmBatch> b) {
    validate_layout(*b->header(), b->region_.size(), b->region_.name());
    return b;
  }
  void check_open() const {
    if (closed_) throw std::runtime_error("batch " + name() + " is closed");
  }
  void check_env(size_t env) const {
    check_open();
    if (env >= num_envs())
      throw std::out_of_range("env " + std::to_string(env) + " out of range for a batch of " +
                              std::to_string(num_envs()) + " envs");
  }
  void check_ids(const size_t* ids, size_t n) const {
    check_open();
    for (size_t j = 0; j < n; ++j) check_env(ids[j]);
  }
  uint8_t* base() const { return static_cast<uint8_t*>(region_.data()); }
  EpochBlock* sync() const { return reinterpret_cast<EpochBlock*>(base() + header()->sync_offset); }
  uint32_t* state_word_unchecked(size_t env) const {
    return reinterpret_cast<uint32_t*>(base() + header()->states_offset) + env;
  }
  uint32_t* stamp_word(size_t env) const { return reinterpret_cast<uint32_t*>(base() + header()->stamps_offset) + env; }
  uint32_t* state_word(size_t env) const {
    check_env(env);
    return state_word_unchecked(env);
  }
  void stamp_slot(size_t env) const {
    uint32_t s = as_atomic(&sync()->seq)->fetch_add(1, std::memory_order_relaxed);
    as_atomic(stamp_word(env))->store(s, std::memory_order_relaxed);  // published by the state's release store
  }
  // Oldest first; ages are taken against the counter's current value, so the order survives its
  // wrap-around (stamps in use lie less than 2^32 changes apart).
  void order_by_stamp(std::vector<size_t>* ids) const {
    const uint32_t now = as_atomic(&sync()->seq)->load(std::memory_order_relaxed);
    std::vector<std::pair<uint32_t, size_t>> aged;
    aged.reserve(ids->size());
    for (size_t i : *ids) aged.emplace_back(now - as_atomic(stamp_word(i))->load(std::memory_order_relaxed), i);
    std::sort(aged.begin(), aged.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (size_t j = 0; j < aged.size(); ++j) (*ids)[j] = aged[j].second;
  }

  ShmRegion region_;
  bool closed_ = false;
};

}  // namespace vlarl
