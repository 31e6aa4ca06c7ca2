// A named POSIX shared-memory region (shm_open + mmap), created by one process and attached
// by others: by name (workers started with spawn/forkserver), or by a file descriptor passed over
// a Unix socket, which also works after the name is gone.
//
// Lifetime: the creator (owner) unlinks the name when it closes, or earlier through unlink() once
// every other process holds a descriptor or a mapping: then no crash, not even a SIGKILL of the
// creator, can leave an entry in /dev/shm. The mapping stays valid until the object is destroyed,
// because numpy views handed to Python may still point into it (unmapping under a live view would
// crash). The descriptor stays open as long as the mapping, so it can be handed to a process that
// starts later (a restarted worker).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace vlarl {

// POSIX wants "/name" with no further slash; add the leading slash if the caller left it out.
inline std::string normalize_shm_name(const std::string& name) {
  std::string n = (!name.empty() && name[0] == '/') ? name : "/" + name;
  if (n.size() < 2 || n.size() > 250 || n.find('/', 1) != std::string::npos)
    throw std::invalid_argument("shared-memory names are 1 to 249 characters without '/': '" + name + "'");
  return n;
}

class ShmRegion {
 public:
  ShmRegion() = default;

  static ShmRegion create(const std::string& name, size_t size) {
    std::string n = normalize_shm_name(name);
    int fd = shm_open(n.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      int err = errno;
      if (err == EEXIST)
        throw std::runtime_error("shared memory " + n + " already exists (pick another name, or unlink the stale one)");
      throw std::runtime_error("shm_open(" + n + ") failed: " + std::strerror(err));
    }
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
      int err = errno;
      ::close(fd);
      shm_unlink(n.c_str());
      throw std::runtime_error("ftruncate(" + n + ") failed: " + std::strerror(err));
    }
    return ShmRegion(n, fd, size, /*owner=*/true);
  }

  static ShmRegion attach(const std::string& name) {
    std::string n = normalize_shm_name(name);
    int fd = shm_open(n.c_str(), O_RDWR, 0600);
    if (fd < 0) {
      int err = errno;
      throw std::runtime_error("no shared batch named " + n + ": " + std::strerror(err));
    }
    return ShmRegion(n, fd, size_of(fd, n), /*owner=*/false);
  }

  // Attaches through a descriptor of the region (the caller keeps its own: it is duplicated).
  static ShmRegion attach_fd(int fd, const std::string& label) {
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) {
      int err = errno;
      throw std::runtime_error("descriptor " + std::to_string(fd) + " is not open: " + std::strerror(err));
    }
    return ShmRegion(label, own, size_of(own, label), /*owner=*/false);
  }

  ShmRegion(ShmRegion&& o) noexcept { *this = std::move(o); }
  ShmRegion& operator=(ShmRegion&& o) noexcept {
    if (this != &o) {
      unlink();
      unmap();
      name_ = std::move(o.name_);
      data_ = o.data_;
      size_ = o.size_;
      owner_ = o.owner_;
      fd_ = o.fd_;
      o.data_ = nullptr;
      o.size_ = 0;
      o.owner_ = false;
      o.fd_ = -1;
    }
    return *this;
  }
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;
  ~ShmRegion() {
    unlink();
    unmap();
  }

  void* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }
  int fd() const { return fd_; }

  // Removes the name (owner only; idempotent). Processes already attached keep their mapping.
  void unlink() {
    if (owner_) shm_unlink(name_.c_str());
    owner_ = false;
  }

  // Unmaps the memory: only when nothing can still point into it.
  void unmap() {
    if (data_ != nullptr) munmap(data_, size_);
    data_ = nullptr;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  static size_t size_of(int fd, const std::string& label) {
    struct stat st {};
    if (fstat(fd, &st) != 0) {
      int err = errno;
      ::close(fd);
      throw std::runtime_error("fstat(" + label + ") failed: " + std::strerror(err));
    }
    return static_cast<size_t>(st.st_size);
  }

  ShmRegion(std::string name, int fd, size_t size, bool owner) : name_(std::move(name)), size_(size), owner_(owner) {
    void* p = size > 0 ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
    int err = size > 0 ? errno : EINVAL;
    if (p == MAP_FAILED) {
      ::close(fd);
      if (owner_) shm_unlink(name_.c_str());
      owner_ = false;
      throw std::runtime_error("mmap(" + name_ + ") failed: " + std::strerror(err));
    }
    data_ = p;
    fd_ = fd;
  }

  std::string name_;
  void* data_ = nullptr;
  size_t size_ = 0;
  bool owner_ = false;
  int fd_ = -1;
};

}  // namespace vlarl
