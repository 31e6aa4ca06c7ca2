// C++ unit test of the shared batch (plain asserts): layout alignment and errors, a forked child
// that attaches by name, writes its slot in place and publishes; the parent waits on the futex,
// reads it back and hands the slot back (ready -> consumed handshake); wait-for-any-k across
// processes; timeouts; unlink on close. Built by `cmake -DVLARL_BUILD_TESTS=ON` or directly:
//   c++ -std=c++17 -Icsrc csrc/test_shm_batch.cpp -o test_shm_batch && ./test_shm_batch
#undef NDEBUG
#include <sys/wait.h>
#include <unistd.h>

#include <cassert>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>

#include "shm_batch.h"
#include "version.h"

using namespace vlarl;

template <class F>
static bool throws(F&& f) {
  try {
    f();
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

static void test_layout() {
  Header h;
  size_t size = make_layout(3, {{"image", 'B', {5, 7, 3}}, {"reward", 'f', {}}, {"proprio", 'd', {9}}}, &h);
  assert(size % kAlign == 0 && size == h.total_size);
  assert(h.sync_offset % kAlign == 0 && h.states_offset >= h.sync_offset + sizeof(EpochBlock));
  assert(h.stamps_offset % kAlign == 0 && h.stamps_offset >= h.states_offset + 3 * sizeof(uint32_t));
  for (size_t i = 0; i < h.num_fields; ++i) assert(h.fields[i].offset % kAlign == 0);
  assert(h.fields[0].bytes_per_env == 5 * 7 * 3 && h.fields[1].bytes_per_env == 4 && h.fields[2].bytes_per_env == 72);
  assert(h.fields[1].offset >= h.fields[0].offset + 3 * 105);
  assert(h.fields[0].offset >= h.stamps_offset + 3 * sizeof(uint32_t));
  validate_layout(h, size, "t");
  assert(throws([&] { validate_layout(h, size - 1, "t"); }));  // truncated region
  assert(throws([&] { make_layout(0, {{"x", 'f', {}}}, &h); }));
  assert(throws([&] { make_layout(2, {}, &h); }));
  assert(throws([&] { make_layout(2, {{"x", 'c', {}}}, &h); }));                      // unsupported dtype
  assert(throws([&] { make_layout(2, {{"x", 'f', {0}}}, &h); }));                     // empty dim
  assert(throws([&] { make_layout(2, {{"x", 'f', {1, 1, 1, 1, 1}}}, &h); }));         // too many dims
  assert(throws([&] { make_layout(2, {{"x", 'f', {}}, {"x", 'B', {}}}, &h); }));      // duplicate
  assert(throws([&] { make_layout(2, {{std::string(40, 'a'), 'f', {}}}, &h); }));     // long name
  assert(throws([&] { normalize_shm_name("a/b"); }));
  assert(normalize_shm_name("abc") == "/abc");
}

static void test_cross_process(const std::string& name) {
  auto b = ShmBatch::create(name, 3, {{"image", 'B', {5, 7, 3}}, {"reward", 'f', {}}});
  const FieldDesc& img = b->field("image");
  const FieldDesc& rew = b->field("reward");
  assert(b->owner() && b->state(0) == 0 && b->state(2) == 0 && b->epoch() == 0);

  auto t0 = std::chrono::steady_clock::now();
  assert(!b->wait(1, 1, 0.02));  // times out
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  assert(waited >= 0.015 && waited < 2.0);

  pid_t pid = fork();
  if (pid == 0) {  // the worker: attach by name, write slots 1 and 2, publish, wait for the hand-back
    auto c = ShmBatch::attach(name);
    if (c->owner() || c->num_envs() != 3) _exit(2);
    uint8_t* p = c->slot_ptr(c->field("image"), 1);
    for (size_t i = 0; i < 5 * 7 * 3; ++i) p[i] = static_cast<uint8_t>(i);
    *reinterpret_cast<float*>(c->slot_ptr(c->field("reward"), 1)) = 2.5f;
    c->set_state(1, 1);                         // ready
    if (!c->wait(1, 2, 10.0)) _exit(3);         // consumed by the manager
    *reinterpret_cast<float*>(c->slot_ptr(c->field("reward"), 2)) = -1.0f;
    c->set_state(2, 1);
    _exit(0);
  }
  assert(b->wait(1, 1, 10.0));
  const uint8_t* p = b->slot_ptr(img, 1);
  for (size_t i = 0; i < 5 * 7 * 3; ++i) assert(p[i] == static_cast<uint8_t>(i));
  assert(*reinterpret_cast<float*>(b->slot_ptr(rew, 1)) == 2.5f);
  assert(b->state(0) == 0);                      // other slots untouched
  assert(!b->compare_exchange(1, 0, 2));         // not in state 0: no change
  assert(b->compare_exchange(1, 1, 2));          // ready -> consumed, wakes the worker
  std::vector<size_t> ready;
  assert(b->wait_count(1, 1, 10.0, &ready));     // any one slot ready: slot 2
  assert(ready.size() == 1 && ready[0] == 2);
  assert(*reinterpret_cast<float*>(b->slot_ptr(rew, 2)) == -1.0f);
  assert(!b->wait_count(1, 2, 0.02, &ready) && ready.size() == 1);  // two never become ready
  int status = 0;
  waitpid(pid, &status, 0);
  assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // a thread of the same process wakes a waiter on the epoch (the path a recv() takes)
  std::thread t([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    b->set_state(0, 7);
  });
  assert(b->wait_count(7, 1, 10.0, &ready) && ready.size() == 1 && ready[0] == 0);
  t.join();

  assert(throws([&] { ShmBatch::create(name, 1, {{"x", 'f', {}}}); }));  // name taken
  assert(throws([&] { b->field("nope"); }));
  assert(throws([&] { b->slot_ptr(img, 3); }));

  auto other = ShmBatch::attach(name);
  b->close();  // unlinks the name; the handle refuses further use, an attached process keeps working
  assert(b->closed() && !b->owner());
  assert(throws([&] { b->state(0); }));
  assert(throws([&] { ShmBatch::attach(name); }));
  assert(other->state(0) == 7 && *reinterpret_cast<float*>(other->slot_ptr(other->field("reward"), 1)) == 2.5f);
}

int main() {
  test_layout();
  std::string name = "/vlarl_cxxtest_" + std::to_string(getpid());
  test_cross_process(name);
  {
    auto b = ShmBatch::create(name, 1, {{"x", 'f', {}}});
  }  // destroyed without close(): still unlinked
  assert(throws([&] { ShmBatch::attach(name); }));
  auto info = build_info();
  std::printf("test_shm_batch: all passed (%s, %s, wait=%s)\n", info["compiler"].c_str(),
              info["cxx_standard"].c_str(), info["wait"].c_str());
  return 0;
}
