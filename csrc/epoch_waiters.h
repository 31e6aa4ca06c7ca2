// Waiting for "at least k of a set of slots reach a state" across processes, woken once instead of
// once per slot.
//
// Every slot-state change bumps one shared counter, the epoch. A waiter reads the epoch, scans its
// slots and, if it still lacks `need` slots, sleeps on the epoch word. Each change moves at most
// one slot, so nothing can satisfy the waiter before `need` more bumps: the waiter publishes the
// epoch value it waits for (its target) in a small table of waiter entries, and a bump wakes the
// epoch's sleepers only when some entry's target is reached. A manager waiting for 8 workers is
// then woken once per batch, not 8 times (each wake is a context switch taken from the workers).
//
// No lost wake-up: the waiter stores its target, then re-reads the epoch (and the kernel re-checks
// it when queuing the sleep); a bumper increments the epoch, then reads the targets. Both sides
// are sequentially consistent, so either the bumper sees the target or the waiter sees the bump.
// Early wake-ups are harmless (the waiter re-scans); a waiter that finds no free entry counts
// itself in `overflow`, which makes every bump wake, and a dead process's stale entry only causes
// early wake-ups.
#pragma once

#include <cstddef>
#include <cstdint>

#include "slot_state.h"

namespace vlarl {

constexpr size_t kWaiterEntries = 8;
constexpr uint64_t kArmed = uint64_t{1} << 32;  // an entry holds kArmed | target, 0 when free

// Lives in the shared region (zero-initialised pages are a valid empty block).
struct EpochBlock {
  uint32_t epoch;     // bumped by every slot-state change
  uint32_t seq;       // stamps slot changes in order (see shm_batch.h)
  uint32_t overflow;  // waiters without an entry: while > 0, every bump wakes
  uint32_t reserved;
  uint64_t entries[kWaiterEntries];
};

// True when `epoch` has reached `target` (modulo 2^32: targets lie less than 2^31 ahead).
inline bool reached(uint32_t epoch, uint32_t target) { return static_cast<int32_t>(epoch - target) >= 0; }

// Records `n` state changes (made before the call) and wakes the epoch's sleepers if one of them
// may now be satisfied.
inline void bump_epoch(EpochBlock* b, uint32_t n = 1) {
  uint32_t e = as_atomic(&b->epoch)->fetch_add(n, std::memory_order_seq_cst) + n;
  bool wake = as_atomic(&b->overflow)->load(std::memory_order_seq_cst) != 0;
  for (size_t i = 0; !wake && i < kWaiterEntries; ++i) {
    uint64_t v = as_atomic(&b->entries[i])->load(std::memory_order_seq_cst);
    wake = v != 0 && reached(e, static_cast<uint32_t>(v));
  }
  if (wake) futex_wake(&b->epoch);
}

// One wait's registration: an entry of the table while the wait lasts, or the overflow count.
class EpochWaiter {
 public:
  explicit EpochWaiter(EpochBlock* b) : b_(b) {
    for (size_t i = 0; i < kWaiterEntries; ++i) {
      uint64_t expected = 0;
      // claimed with an already-reached target, so bumps wake until arm() sets the real one
      if (as_atomic(&b_->entries[i])->compare_exchange_strong(expected, kArmed | load_epoch(),
                                                               std::memory_order_seq_cst)) {
        entry_ = &b_->entries[i];
        return;
      }
    }
    as_atomic(&b_->overflow)->fetch_add(1, std::memory_order_seq_cst);
  }
  ~EpochWaiter() {
    if (entry_ != nullptr)
      as_atomic(entry_)->store(0, std::memory_order_seq_cst);
    else
      as_atomic(&b_->overflow)->fetch_sub(1, std::memory_order_seq_cst);
  }
  EpochWaiter(const EpochWaiter&) = delete;
  EpochWaiter& operator=(const EpochWaiter&) = delete;

  bool has_entry() const { return entry_ != nullptr; }
  uint32_t load_epoch() const { return as_atomic(&b_->epoch)->load(std::memory_order_seq_cst); }

  // Waits until deficit() == 0. deficit() scans the slots and returns how many more must change
  // before the condition can hold (0: it holds). Returns false on timeout (< 0: no limit).
  // `sleeps`, if given, counts the times the caller went to sleep.
  template <class Deficit>
  bool wait(Deficit&& deficit, double timeout_s, unsigned* sleeps = nullptr) {
    Deadline dl(timeout_s);
    for (;;) {
      uint32_t seen = load_epoch();
      size_t need = deficit();
      if (need == 0) return true;
      if (dl.passed()) return false;
      if (need > (size_t{1} << 30)) need = size_t{1} << 30;
      if (entry_ != nullptr) as_atomic(entry_)->store(kArmed | (seen + static_cast<uint32_t>(need)),
                                                      std::memory_order_seq_cst);
      if (load_epoch() != seen) continue;  // a bump came before our target was visible: re-scan
      if (sleeps != nullptr) ++*sleeps;
      futex_wait(&b_->epoch, seen, dl.left());
    }
  }

 private:
  EpochBlock* b_;
  uint64_t* entry_ = nullptr;
};

}  // namespace vlarl
