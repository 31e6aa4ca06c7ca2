// C++ unit test of the shared batch: layout alignment, a forked child that attaches by name,
// writes its slot in place and publishes; the parent waits on the futex and reads it back.
#include <sys/wait.h>
#include <unistd.h>

#include <cassert>
#include <cstdio>
#include <string>

#include "shm_batch.h"

using namespace vlarl;

int main() {
  std::string name = "/vlarl_test_" + std::to_string(getpid());
  {
    auto b = ShmBatch::create(name, 3, {{"image", 'u', {5, 7, 3}}, {"reward", 'f', {}}});
    const FieldDesc& img = b->field("image");
    const FieldDesc& rew = b->field("reward");
    assert(img.offset % kAlign == 0 && rew.offset % kAlign == 0);
    assert(img.bytes_per_env == 5 * 7 * 3 && rew.bytes_per_env == 4);
    assert(rew.offset >= img.offset + 3 * img.bytes_per_env);
    assert(b->state(0) == 0 && b->state(2) == 0);
    assert(!b->wait(1, 1, 0.01));  // times out

    pid_t pid = fork();
    if (pid == 0) {
      auto c = ShmBatch::attach(name);
      assert(!c->owner() && c->num_envs() == 3);
      uint8_t* p = c->slot_ptr(c->field("image"), 1);
      for (size_t i = 0; i < 5 * 7 * 3; ++i) p[i] = static_cast<uint8_t>(i);
      *reinterpret_cast<float*>(c->slot_ptr(c->field("reward"), 1)) = 2.5f;
      c->set_state(1, 1);
      _exit(0);
    }
    bool ok = b->wait(1, 1, 5.0);
    assert(ok);
    const uint8_t* p = b->slot_ptr(img, 1);
    for (size_t i = 0; i < 5 * 7 * 3; ++i) assert(p[i] == static_cast<uint8_t>(i));
    assert(*reinterpret_cast<float*>(b->slot_ptr(rew, 1)) == 2.5f);
    assert(b->state(0) == 0);  // other slots untouched
    int status = 0;
    waitpid(pid, &status, 0);
    assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    bool threw = false;
    try {
      ShmBatch::create(name, 1, {{"x", 'f', {}}});  // name taken
    } catch (const std::runtime_error&) {
      threw = true;
    }
    assert(threw);
  }
  bool gone = false;
  try {
    ShmBatch::attach(name);  // the owner unlinked it on destruction
  } catch (const std::runtime_error&) {
    gone = true;
  }
  assert(gone);
  std::puts("test_shm_batch: all passed");
  return 0;
}
