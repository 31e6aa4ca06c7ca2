// C++ unit test of the synchronisation pieces the manager's per-step path uses (plain asserts):
// value-filtered wake-ups of a slot word, one wake-up per batch for a set waiter (epoch waiter
// entries, and the overflow path when the entries run out), set_states against set_state one by
// one, wait_slots' oldest-first order (across the stamp counter's wrap), a multi-threaded
// dispatch/collect ping-pong with observers, and attach by descriptor after the name is gone.
// Built by `cmake -DVLARL_BUILD_TESTS=ON` or directly:
//   c++ -std=c++17 -pthread -Icsrc csrc/test_slot_sync.cpp -o test_slot_sync && ./test_slot_sync
#undef NDEBUG
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cassert>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shm_batch.h"

using namespace vlarl;
using std::chrono::milliseconds;

constexpr uint32_t IDLE = 0, CMD = 1, DONE = 2;

static std::string batch_name(const char* what) {
  return "/vlarl_cxxsync_" + std::to_string(getpid()) + "_" + what;
}

static std::shared_ptr<ShmBatch> make(const char* what, size_t n) {
  auto b = ShmBatch::create(batch_name(what), n, {{"x", 'f', {}}});
  b->unlink();  // threads share the mapping; a failed assert then leaves nothing in /dev/shm
  return b;
}

template <class F>
static bool throws(F&& f) {
  try {
    f();
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

static EpochBlock* epoch_block(const ShmBatch& b) {
  const FieldDesc& f = b.field(0);
  return reinterpret_cast<EpochBlock*>(b.field_ptr(f) - f.offset + b.header()->sync_offset);
}

static std::vector<size_t> iota(size_t n) {
  std::vector<size_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

// A worker waiting for its next command is not woken by the manager taking its result back.
static void test_value_filtered_wakeups() {
  auto b = make("filter", 2);
  unsigned sleeps = 0;
  std::atomic<bool> ok{false};
  std::thread waiter([&] { ok = b->wait(0, CMD, 30.0, &sleeps); });
  std::this_thread::sleep_for(milliseconds(50));
  for (int r = 0; r < 10; ++r) {  // DONE -> IDLE hand-backs, and other slots' traffic
    b->set_state(0, r % 2 ? IDLE : DONE);
    b->set_state(1, CMD);
    std::this_thread::sleep_for(milliseconds(2));
  }
  b->set_state(0, CMD);
  waiter.join();
  assert(ok);
  // 1 when the waiter was asleep before the first store; a waiter woken by every store sleeps 11 times
  assert(sleeps >= 1 && sleeps <= 2);
}

// A manager waiting for all of a batch is woken once, not once per finished slot, and sees the
// slots in the order they finished.
static void test_one_wakeup_per_batch() {
  const size_t n = 8;
  auto b = make("once", n);
  std::vector<size_t> order = {5, 2, 7, 0, 1, 6, 3, 4}, ready;
  unsigned sleeps = 0;
  std::atomic<bool> ok{false};
  auto all = iota(n);
  std::thread waiter([&] { ok = b->wait_slots(all.data(), n, DONE, n, 30.0, &ready, &sleeps); });
  std::this_thread::sleep_for(milliseconds(50));
  for (size_t i : order) {
    b->set_state(i, DONE);
    std::this_thread::sleep_for(milliseconds(3));
  }
  waiter.join();
  assert(ok && ready == order);
  assert(sleeps >= 1 && sleeps <= 2);  // woken at the 8th, not at each of the 8

  // first k of a subset: a waiter for 2 of {1, 3, 6} wakes when the second of them finishes
  b->set_states(all.data(), n, IDLE);
  std::vector<size_t> sub = {1, 3, 6};
  sleeps = 0;
  std::thread w2([&] { ok = b->wait_slots(sub.data(), sub.size(), DONE, 2, 30.0, &ready, &sleeps); });
  std::this_thread::sleep_for(milliseconds(50));
  for (size_t i : {0, 6, 2, 5, 1, 3}) {  // 0, 2, 5 are not in the set: at most early wake-ups
    b->set_state(i, DONE);
    std::this_thread::sleep_for(milliseconds(3));
  }
  w2.join();
  assert(ok && ready.size() >= 2 && ready[0] == 6 && ready[1] == 1);
}

// set_states is set_state on each id in turn: same states, same stamps, same epoch.
static void test_set_states_equals_one_by_one() {
  auto a = make("many_a", 6), c = make("many_c", 6);
  std::vector<size_t> ids = {3, 1, 4, 0};
  a->set_states(ids.data(), ids.size(), 5);
  for (size_t i : ids) c->set_state(i, 5);
  for (size_t i = 0; i < 6; ++i) assert(a->state(i) == c->state(i) && a->stamp(i) == c->stamp(i));
  assert(a->epoch() == c->epoch() && a->epoch() == 4);
  std::vector<size_t> bad = {2, 6};
  assert(throws([&] { a->set_states(bad.data(), bad.size(), 9); }));
  assert(a->state(2) == 0);  // checked before anything changed
  a->set_states(nullptr, 0, 9);  // nothing to do
  assert(a->epoch() == 4);
}

// Oldest first across the stamp counter's wrap-around; timeouts return what is ready.
static void test_order_across_wrap_and_timeouts() {
  auto b = make("wrap", 4);
  epoch_block(*b)->seq = 0xfffffffeu;
  for (size_t i : {2, 0, 3}) b->set_state(i, DONE);  // stamps fffffffe, ffffffff, 0
  assert(b->stamp(3) == 0);
  std::vector<size_t> ready, all = iota(4);
  assert(b->wait_slots(all.data(), 4, DONE, 3, 0.0, &ready) && (ready == std::vector<size_t>{2, 0, 3}));
  auto t0 = std::chrono::steady_clock::now();
  assert(!b->wait_slots(all.data(), 4, DONE, 4, 0.03, &ready) && ready.size() == 3);
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  assert(waited >= 0.025 && waited < 5.0);
  epoch_block(*b)->epoch = 0xffffffffu;  // the epoch wraps too: targets compare modulo 2^32
  std::atomic<bool> ok{false};
  std::thread w([&] { ok = b->wait_slots(all.data(), 4, DONE, 4, 30.0, &ready); });
  std::this_thread::sleep_for(milliseconds(30));
  b->set_state(1, DONE);
  w.join();
  assert(ok && ready.back() == 1);
}

// With every waiter entry taken (e.g. left by killed processes), waiters fall back to being woken
// by every change: slower, never lost.
static void test_overflow_waiters_are_still_woken() {
  const size_t n = 12;
  auto b = make("overflow", n);
  std::vector<std::unique_ptr<EpochWaiter>> squatters;
  for (size_t i = 0; i < kWaiterEntries; ++i) squatters.emplace_back(new EpochWaiter(epoch_block(*b)));
  assert(!EpochWaiter(epoch_block(*b)).has_entry());
  std::atomic<int> woken{0};
  std::vector<std::thread> waiters;
  for (size_t i = 0; i < n; ++i)
    waiters.emplace_back([&, i] {
      std::vector<size_t> ready;
      if (b->wait_slots(&i, 1, DONE, 1, 30.0, &ready) && ready.size() == 1 && ready[0] == i) ++woken;
    });
  std::this_thread::sleep_for(milliseconds(50));
  std::mt19937 rng(1);
  auto perm = iota(n);
  std::shuffle(perm.begin(), perm.end(), rng);
  for (size_t i : perm) b->set_state(i, DONE);
  for (auto& t : waiters) t.join();
  assert(woken == static_cast<int>(n));
  squatters.clear();
  assert(epoch_block(*b)->overflow == 0);
  for (size_t i = 0; i < kWaiterEntries; ++i) assert(epoch_block(*b)->entries[i] == 0);  // all released
}

// The manager's loop against one thread per worker, with observers waiting on random subsets
// (more waiters than entries at times): a lost wake-up would show as a timed-out wait.
static void test_threaded_dispatch_collect() {
  const size_t n = 6;
  const int rounds = 400;
  auto b = make("pingpong", n);
  const FieldDesc& x = b->field("x");
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> workers;
  for (size_t i = 0; i < n; ++i)
    workers.emplace_back([&, i] {
      float* slot = reinterpret_cast<float*>(b->slot_ptr(x, i));
      if (!b->wait(i, CMD, 30.0)) ++failures;
      for (int r = 0; r < rounds; ++r) {
        *slot += 1.0f;  // the step's result, written before it is published
        bool last = r + 1 == rounds;
        if (last) b->set_state(i, DONE);
        else if (!b->publish_and_wait(i, DONE, CMD, 30.0)) ++failures;
      }
    });
  std::vector<std::thread> observers;
  for (int o = 0; o < 10; ++o)
    observers.emplace_back([&, o] {
      std::mt19937 rng(o);
      std::vector<size_t> ready;
      while (!stop) {
        std::vector<size_t> sub;
        for (size_t i = 0; i < n; ++i)
          if (rng() % 2) sub.push_back(i);
        if (sub.empty()) continue;
        b->wait_slots(sub.data(), sub.size(), DONE, 1 + rng() % 3, 0.002, &ready);
        for (size_t i : ready)
          if (std::find(sub.begin(), sub.end(), i) == sub.end()) ++failures;  // only slots it asked for
      }
    });
  auto all = iota(n);
  std::vector<size_t> ready;
  for (int r = 0; r < rounds; ++r) {
    b->set_states(all.data(), n, CMD);
    if (!b->wait_slots(all.data(), n, DONE, n, 30.0, &ready) || ready.size() != n) ++failures;
    for (size_t i = 0; i < n; ++i)
      if (*reinterpret_cast<float*>(b->slot_ptr(x, i)) != static_cast<float>(r + 1)) ++failures;
    b->set_states(all.data(), n, IDLE);
  }
  stop = true;
  for (auto& t : workers) t.join();
  for (auto& t : observers) t.join();
  assert(failures == 0);
}

// Across processes, through a descriptor: the name is unlinked before the child attaches.
static void test_attach_by_descriptor_after_unlink() {
  std::string name = batch_name("fd");
  auto b = ShmBatch::create(name, 4, {{"x", 'f', {}}});
  b->unlink();
  assert(!b->owner() && throws([&] { ShmBatch::attach(name); }));  // no /dev/shm entry left
  int fd = b->fd();
  pid_t pid = fork();
  if (pid == 0) {  // inherits the descriptor, as a worker receives it over its socket
    auto c = ShmBatch::attach_fd(fd);
    if (c->name() != name || c->num_envs() != 4) _exit(2);
    for (size_t i : {3, 1, 2, 0}) {
      *reinterpret_cast<float*>(c->slot_ptr(c->field("x"), i)) = static_cast<float>(i) + 0.5f;
      c->set_state(i, DONE);
      usleep(2000);
    }
    _exit(0);
  }
  std::vector<size_t> ready, all = iota(4);
  assert(b->wait_slots(all.data(), 4, DONE, 4, 30.0, &ready) && (ready == std::vector<size_t>{3, 1, 2, 0}));
  for (size_t i = 0; i < 4; ++i) assert(*reinterpret_cast<float*>(b->slot_ptr(b->field("x"), i)) == i + 0.5f);
  int status = 0;
  waitpid(pid, &status, 0);
  assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  assert(throws([&] { ShmBatch::attach_fd(-1); }));
  b->close();
  assert(throws([&] { b->fd(); }));
}

int main() {
  test_value_filtered_wakeups();
  test_one_wakeup_per_batch();
  test_set_states_equals_one_by_one();
  test_order_across_wrap_and_timeouts();
  test_overflow_waiters_are_still_woken();
  test_threaded_dispatch_collect();
  test_attach_by_descriptor_after_unlink();
  std::printf("test_slot_sync: all passed (wait=%s)\n", wait_mechanism());
  return 0;
}
