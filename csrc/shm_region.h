// A named POSIX shared-memory region (shm_open + mmap), created by one process and attached
// by others. The creator unlinks the name when it closes, so no segment outlives the manager.
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

class ShmRegion {
 public:
  static ShmRegion create(const std::string& name, size_t size) {
    int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("shm_open(" + name + ") failed: " + std::strerror(errno));
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
      int err = errno;
      close(fd);
      shm_unlink(name.c_str());
      throw std::runtime_error("ftruncate(" + name + ") failed: " + std::strerror(err));
    }
    return ShmRegion(name, fd, size, /*owner=*/true);
  }

  static ShmRegion attach(const std::string& name) {
    int fd = shm_open(name.c_str(), O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("no shared batch named " + name + ": " + std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0) {
      int err = errno;
      close(fd);
      throw std::runtime_error("fstat(" + name + ") failed: " + std::strerror(err));
    }
    return ShmRegion(name, fd, static_cast<size_t>(st.st_size), /*owner=*/false);
  }

  ShmRegion(ShmRegion&& o) noexcept { *this = std::move(o); }
  ShmRegion& operator=(ShmRegion&& o) noexcept {
    if (this != &o) {
      release();
      name_ = std::move(o.name_);
      data_ = o.data_;
      size_ = o.size_;
      owner_ = o.owner_;
      o.data_ = nullptr;
      o.owner_ = false;
    }
    return *this;
  }
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;
  ~ShmRegion() { release(); }

  void* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }

  void release() {
    if (data_ != nullptr) munmap(data_, size_);
    if (owner_) shm_unlink(name_.c_str());
    data_ = nullptr;
    owner_ = false;
  }

 private:
  ShmRegion(std::string name, int fd, size_t size, bool owner) : name_(std::move(name)), size_(size), owner_(owner) {
    data_ = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (data_ == MAP_FAILED) {
      data_ = nullptr;
      if (owner) shm_unlink(name_.c_str());
      throw std::runtime_error("mmap(" + name_ + ") failed: " + std::strerror(err));
    }
  }

  std::string name_;
  void* data_ = nullptr;
  size_t size_ = 0;
  bool owner_ = false;
};

}  // namespace vlarl
