// Per-slot state words shared between processes. A worker publishes "my slot is written" by
// storing a new value (release) and waking waiters; the other side sleeps in the kernel (futex on
// Linux) until the value it wants appears or a timeout passes. No lock, no busy waiting: each
// slot has one writer at a time, and the value says whose turn it is (e.g. 0 free, 1 ready,
// 2 consumed: the meaning belongs to the caller).
//
// Waiters sleep with a futex bitset naming the value they wait for (bit value % 32), and a store
// wakes only the waiters of the value it stores. The manager handing a slot back (ready -> free)
// would otherwise wake the worker that sleeps on the same word waiting for its next command: one
// needless context switch per env step, on machines with fewer cores than workers.
//
// Off Linux there is no process-shared futex in libc; the fallback polls with a growing sleep.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define VLARL_HAVE_FUTEX 1
#else
#define VLARL_HAVE_FUTEX 0
#endif

namespace vlarl {

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "state words must be 32 bits");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "state words must be lock free across processes");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "waiter entries must be lock free across processes");

inline const char* wait_mechanism() { return VLARL_HAVE_FUTEX ? "futex" : "polling"; }

inline std::atomic<uint32_t>* as_atomic(uint32_t* word) { return reinterpret_cast<std::atomic<uint32_t>*>(word); }
inline std::atomic<uint64_t>* as_atomic(uint64_t* word) { return reinterpret_cast<std::atomic<uint64_t>*>(word); }

constexpr uint32_t kAnyValue = 0xffffffffu;  // bitset of a waiter woken by every store
inline uint32_t value_bit(uint32_t value) { return 1u << (value % 32); }

// Sleeps while *word == expected, at most timeout_s (< 0: no limit), unless a wake whose bitset
// meets `bits` comes. Spurious returns are fine: every caller re-checks its condition.
inline void futex_wait(uint32_t* word, uint32_t expected, double timeout_s, uint32_t bits = kAnyValue) {
#if VLARL_HAVE_FUTEX
  struct timespec ts {};
  struct timespec* tsp = nullptr;
  if (timeout_s >= 0) {
    // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = static_cast<long long>(ts.tv_nsec) + static_cast<long long>(timeout_s * 1e9);
    ts.tv_sec += static_cast<time_t>(ns / 1000000000LL);
    ts.tv_nsec = static_cast<long>(ns % 1000000000LL);
    tsp = &ts;
  }
  // no FUTEX_PRIVATE_FLAG: the word lives in memory shared between processes
  syscall(SYS_futex, word, FUTEX_WAIT_BITSET, expected, tsp, nullptr, bits);
#else
  (void)expected;
  (void)bits;
  double s = timeout_s < 0 ? 1e-3 : (timeout_s < 1e-3 ? timeout_s : 1e-3);
  std::this_thread::sleep_for(std::chrono::duration<double>(s));
#endif
}

inline void futex_wake(uint32_t* word, uint32_t bits = kAnyValue) {
#if VLARL_HAVE_FUTEX
  syscall(SYS_futex, word, FUTEX_WAKE_BITSET, INT_MAX, nullptr, nullptr, bits);
#else
  (void)word;
  (void)bits;
#endif
}

inline uint32_t load_state(uint32_t* word) { return as_atomic(word)->load(std::memory_order_acquire); }

// Stores `value` (everything written before is visible to a reader that sees it) and wakes the
// waiters of that value. Batch-level bookkeeping (epoch, stamps) is the caller's: see shm_batch.h.
inline void store_state(uint32_t* word, uint32_t value) {
  as_atomic(word)->store(value, std::memory_order_release);
  futex_wake(word, value_bit(value));
}

// Atomically replaces `expected` by `desired`; false (and nothing changes) if the word held
// something else. Lets several consumers claim a ready slot without a lock.
inline bool cas_state(uint32_t* word, uint32_t expected, uint32_t desired) {
  if (!as_atomic(word)->compare_exchange_strong(expected, desired, std::memory_order_acq_rel)) return false;
  futex_wake(word, value_bit(desired));
  return true;
}

class Deadline {
 public:
  explicit Deadline(double timeout_s) : forever_(timeout_s < 0) {
    if (!forever_)
      end_ = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_s));
  }
  bool forever() const { return forever_; }
  // seconds left (>= 0), or -1 for no limit
  double left() const {
    if (forever_) return -1.0;
    double s = std::chrono::duration<double>(end_ - clock::now()).count();
    return s > 0 ? s : 0.0;
  }
  bool passed() const { return !forever_ && clock::now() >= end_; }

 private:
  using clock = std::chrono::steady_clock;
  bool forever_;
  clock::time_point end_{};
};

// Waits until *word == want. Returns false on timeout (timeout_s < 0: wait forever). `sleeps`, if
// given, counts the times the caller went to sleep (tests check that unrelated stores do not wake it).
inline bool wait_state(uint32_t* word, uint32_t want, double timeout_s, unsigned* sleeps = nullptr) {
  Deadline dl(timeout_s);
  for (;;) {
    uint32_t cur = load_state(word);
    if (cur == want) return true;
    if (dl.passed()) return false;
    if (sleeps != nullptr) ++*sleeps;
    // sleeps only while the word still holds `cur`, so a store between the load and here is not lost
    futex_wait(word, cur, dl.left(), value_bit(want));
  }
}

}  // namespace vlarl
