// Per-slot state words shared between processes: a worker publishes "my slot is written" by
// storing a new value and waking waiters; the manager sleeps in the kernel (futex) until the
// value changes or a timeout passes. No busy waiting, no lock: each slot has one writer.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>

namespace vlarl {

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word must be 32 bits");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "futex word must be lock free");

inline long futex(uint32_t* addr, int op, uint32_t val, const struct timespec* timeout) {
  // no FUTEX_PRIVATE_FLAG: the word lives in memory shared between processes
  return syscall(SYS_futex, addr, op, val, timeout, nullptr, 0);
}

inline uint32_t load_state(uint32_t* word) {
  return reinterpret_cast<std::atomic<uint32_t>*>(word)->load(std::memory_order_acquire);
}

inline void store_state(uint32_t* word, uint32_t value) {
  reinterpret_cast<std::atomic<uint32_t>*>(word)->store(value, std::memory_order_release);
  futex(word, FUTEX_WAKE, INT_MAX, nullptr);
}

// Waits until *word == want. Returns false on timeout (timeout_s < 0: wait forever).
inline bool wait_state(uint32_t* word, uint32_t want, double timeout_s) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(
                                           std::chrono::duration<double>(timeout_s < 0 ? 0.0 : timeout_s));
  for (;;) {
    uint32_t cur = load_state(word);
    if (cur == want) return true;
    struct timespec ts {};
    struct timespec* tsp = nullptr;
    if (timeout_s >= 0) {
      auto left = deadline - clock::now();
      if (left <= clock::duration::zero()) return false;
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      ts.tv_sec = static_cast<time_t>(ns / 1000000000LL);
      ts.tv_nsec = static_cast<long>(ns % 1000000000LL);
      tsp = &ts;
    }
    // sleeps only while the word still holds `cur`, so a store between the load and here is not lost
    long rc = futex(word, FUTEX_WAIT, cur, tsp);
    if (rc != 0 && errno != EAGAIN && errno != EINTR && errno != ETIMEDOUT) return load_state(word) == want;
  }
}

}  // namespace vlarl
