// Python bindings of the shared batch (module vlarl_fast._C). Arrays are numpy views of the
// shared memory itself: the batch object is their base, so the mapping lives as long as any view.
// Every blocking wait runs without the GIL, in slices, so other Python threads run meanwhile and
// Ctrl-C (any Python signal handler that raises) interrupts it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>

#include "shm_batch.h"
#include "version.h"

namespace py = pybind11;
using namespace pybind11::literals;
using vlarl::FieldDesc;
using vlarl::FieldSpec;
using vlarl::ShmBatch;

namespace {

constexpr double kSliceSeconds = 0.05;  // longest stretch without checking Python signals

const char* kDtypes = "bool, int8, uint8, int16, uint16, int32, uint32, int64, uint64, float16, float32, float64";
const char kCodes[] = "?bBhHiIqQefd";  // the numpy type characters of kDtypes, in that order

// numpy is reached only through its Python API and the buffer protocol. Both are stable across
// numpy releases, while the C structs behind numpy's C API change layout between them: an
// extension that reads those structs, built against one numpy, crashes under another.
struct Numpy {
  py::object ndarray, dtype, asarray, ascontiguousarray, empty, can_cast, copyto, int64, uint32;
  py::dict same_kind;         // casting="same_kind", built once rather than on every write()
  py::object by_code[128];    // dtype objects by type character, so views do not rebuild them
};
// Filled when the module is imported and never freed: its destructor would release Python objects
// after the interpreter has shut down.
Numpy* g_np = nullptr;

const Numpy& np() { return *g_np; }

void init_numpy() {
  py::module_ m = py::module_::import("numpy");
  auto* n = new Numpy();
  n->ndarray = m.attr("ndarray");
  n->dtype = m.attr("dtype");
  n->asarray = m.attr("asarray");
  n->ascontiguousarray = m.attr("ascontiguousarray");
  n->empty = m.attr("empty");
  n->can_cast = m.attr("can_cast");
  n->copyto = m.attr("copyto");
  n->int64 = n->dtype("int64");
  n->uint32 = n->dtype("uint32");
  n->same_kind["casting"] = "same_kind";
  for (const char* c = kCodes; *c; ++c) n->by_code[static_cast<int>(*c)] = n->dtype(std::string(1, *c));
  g_np = n;
}

// Any dtype spec numpy.dtype() takes (a name, a type, a dtype) to the batch's type character.
char dtype_code(py::handle spec) {
  py::object dt = np().dtype(spec);
  const std::string kind = py::str(dt.attr("kind"));
  const auto size = dt.attr("itemsize").cast<size_t>();
  char code = 0;
  if (dt.attr("isnative").cast<bool>() && dt.attr("fields").is_none() && kind.size() == 1) {
    if (kind[0] == 'b' && size == 1) code = '?';
    if (kind[0] == 'i') code = size == 1 ? 'b' : size == 2 ? 'h' : size == 4 ? 'i' : size == 8 ? 'q' : 0;
    if (kind[0] == 'u') code = size == 1 ? 'B' : size == 2 ? 'H' : size == 4 ? 'I' : size == 8 ? 'Q' : 0;
    if (kind[0] == 'f') code = size == 2 ? 'e' : size == 4 ? 'f' : size == 8 ? 'd' : 0;
  }
  if (code == 0) throw py::type_error("unsupported dtype " + std::string(py::str(dt)) + "; use one of " + kDtypes);
  return code;
}

const py::object& code_dtype(char c) { return np().by_code[static_cast<unsigned char>(c) & 127]; }

std::vector<py::ssize_t> env_shape(const FieldDesc& f) {
  std::vector<py::ssize_t> shape;
  for (int d = 0; d < f.ndim; ++d) shape.push_back(static_cast<py::ssize_t>(f.shape[d]));
  return shape;
}

std::string shape_str(const std::vector<py::ssize_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << shape[i] << (shape.size() == 1 ? "," : i + 1 < shape.size() ? ", " : "");
  s << ")";
  return s.str();
}

// Py_buffer released on scope exit.
struct BufferView {
  Py_buffer view{};
  bool held = false;
  ~BufferView() {
    if (held) PyBuffer_Release(&view);
  }
};

// The batch's buffer protocol: the whole mapped region as writable bytes, so numpy can build views
// on it with the batch as their base (every view keeps the mapping alive). A closed batch refuses.
// Written against the C API rather than pybind11's buffer hook, which lets a C++ exception escape
// into Python's C code in pybind11 2.x.
extern "C" int batch_getbuffer(PyObject* self, Py_buffer* view, int flags) {
  const ShmBatch* b = nullptr;
  try {
    b = &py::handle(self).cast<const ShmBatch&>();
  } catch (...) {
    PyErr_SetString(PyExc_BufferError, "SharedBatch: not an initialised batch (use SharedBatch.create or attach)");
  }
  if (b != nullptr && b->closed()) {
    PyErr_Format(PyExc_BufferError, "batch %s is closed", b->name().c_str());
    b = nullptr;
  }
  if (b == nullptr) {
    view->obj = nullptr;
    return -1;
  }
  void* data = const_cast<vlarl::Header*>(b->header());
  return PyBuffer_FillInfo(view, self, data, static_cast<Py_ssize_t>(b->size()), /*readonly=*/0, flags);
}

// A numpy array over the batch's own memory at `offset` (no copy; base = the batch).
py::object view(const std::shared_ptr<ShmBatch>& b, const FieldDesc& f, size_t offset, bool with_env_dim) {
  py::tuple shape(f.ndim + (with_env_dim ? 1 : 0));
  size_t k = 0;
  if (with_env_dim) shape[k++] = py::int_(b->num_envs());
  for (int d = 0; d < f.ndim; ++d) shape[k++] = py::int_(f.shape[d]);
  return np().ndarray(shape, code_dtype(f.dtype), py::cast(b), py::int_(offset));
}

const FieldDesc& find_field(const ShmBatch& b, const std::string& name) {
  if (b.closed()) throw std::runtime_error("batch " + b.name() + " is closed");
  const FieldDesc* f = b.find(name);
  if (f == nullptr) {
    std::string have;
    for (size_t i = 0; i < b.num_fields(); ++i) have += (i ? ", " : "") + std::string(b.field(i).name);
    throw py::key_error("no field '" + name + "' in batch " + b.name() + " (fields: " + have + ")");
  }
  return *f;
}

size_t env_index(const ShmBatch& b, int64_t env) {
  if (env < 0 || static_cast<uint64_t>(env) >= b.num_envs())
    throw py::index_error("env " + std::to_string(env) + " out of range for a batch of " +
                          std::to_string(b.num_envs()) + " envs");
  return static_cast<size_t>(env);
}

size_t slot_offset(const ShmBatch& b, const FieldDesc& f, int64_t env) {
  return static_cast<size_t>(f.offset) + env_index(b, env) * static_cast<size_t>(f.bytes_per_env);
}

// Copies a 1-D contiguous buffer of native int64 (what numpy int64 arrays export) into `out`;
// false, with no Python error set, for anything else.
bool read_int64s(py::handle obj, std::vector<int64_t>* out) {
  if (!PyObject_CheckBuffer(obj.ptr())) return false;
  BufferView v;
  if (PyObject_GetBuffer(obj.ptr(), &v.view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();
    return false;
  }
  v.held = true;
  const char* fmt = v.view.format != nullptr ? v.view.format : "B";
  if (*fmt == '@') ++fmt;
  if (v.view.ndim != 1 || v.view.itemsize != 8 || (std::strcmp(fmt, "q") != 0 && std::strcmp(fmt, "l") != 0))
    return false;
  const auto* p = static_cast<const int64_t*>(v.view.buf);
  out->assign(p, p + v.view.len / 8);
  return true;
}

// Env ids from any integer sequence or array (one dimension), checked against the batch.
std::vector<size_t> parse_env_ids(const ShmBatch& b, py::handle ids) {
  std::vector<int64_t> raw;
  if (!read_int64s(ids, &raw)) {  // int64 arrays, the per-step case, skip the calls into numpy
    py::object arr = np().asarray(ids);
    if (arr.attr("ndim").cast<int>() != 1) throw py::value_error("env_ids must be a 1-D sequence of env indices");
    py::object dt = arr.attr("dtype");
    const std::string kind = py::str(dt.attr("kind"));
    if (arr.attr("size").cast<py::ssize_t>() > 0 && kind != "i" && kind != "u")
      throw py::type_error("env_ids must be integers, got dtype " + std::string(py::str(dt)));
    if (!read_int64s(np().ascontiguousarray(arr, np().int64), &raw))
      throw std::runtime_error("numpy.ascontiguousarray(env_ids, int64) did not export a 1-D int64 buffer");
  }
  std::vector<size_t> out(raw.size());
  for (size_t j = 0; j < out.size(); ++j) out[j] = env_index(b, raw[j]);
  return out;
}

// A new numpy array of `n` values of `dtype` (a C type of the same size), filled by fill(pointer).
template <class T, class Fill>
py::object new_array(size_t n, const py::object& dtype, Fill&& fill) {
  py::object out = np().empty(py::int_(n), dtype);
  BufferView v;
  if (PyObject_GetBuffer(out.ptr(), &v.view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
  v.held = true;
  if (v.view.len != static_cast<Py_ssize_t>(n * sizeof(T)))
    throw std::runtime_error("numpy.empty returned a buffer of an unexpected size");
  fill(static_cast<T*>(v.view.buf));
  return out;
}

py::object id_array(const std::vector<size_t>& ids) {
  return new_array<int64_t>(ids.size(), np().int64, [&](int64_t* p) {
    for (size_t j = 0; j < ids.size(); ++j) p[j] = static_cast<int64_t>(ids[j]);
  });
}

std::vector<FieldSpec> parse_fields(const py::dict& fields) {
  std::vector<FieldSpec> specs;
  for (auto item : fields) {
    FieldSpec fs;
    fs.name = py::str(item.first);
    py::object spec = py::reinterpret_borrow<py::object>(item.second);
    if (!py::isinstance<py::tuple>(spec) && !py::isinstance<py::list>(spec))
      throw py::value_error("field '" + fs.name + "': expected (dtype, shape), e.g. ('float32', (7,))");
    auto seq = spec.cast<py::sequence>();
    if (seq.size() != 2) throw py::value_error("field '" + fs.name + "': expected (dtype, shape), e.g. ('float32', (7,))");
    fs.dtype = dtype_code(py::object(seq[0]));
    py::object shape = seq[1];
    if (py::isinstance<py::int_>(shape)) {
      fs.shape.push_back(shape.cast<int64_t>());
    } else {
      for (auto d : shape.cast<py::sequence>()) {
        if (!py::isinstance<py::int_>(d)) throw py::type_error("field '" + fs.name + "': shape entries must be ints");
        fs.shape.push_back(d.cast<int64_t>());
      }
    }
    specs.push_back(std::move(fs));
  }
  return specs;
}

double parse_timeout(std::optional<double> timeout) {
  if (!timeout.has_value() || std::isinf(*timeout) || *timeout < 0) return -1.0;  // no limit
  if (std::isnan(*timeout)) throw py::value_error("timeout must be a number of seconds or None");
  return *timeout;
}

// Runs attempt(slice_seconds) without the GIL until it reports success or the deadline passes;
// between slices, takes the GIL back to run Python signal handlers (KeyboardInterrupt raises).
template <class Attempt>
bool interruptible_wait(double timeout, Attempt&& attempt) {
  vlarl::Deadline dl(timeout);
  for (;;) {
    double slice = kSliceSeconds;
    double left = dl.left();
    if (left >= 0 && left < slice) slice = left;
    bool done;
    {
      py::gil_scoped_release nogil;
      done = attempt(slice);
    }
    if (done) return true;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (dl.passed()) return false;
  }
}

std::string unique_name() {
  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  std::ostringstream s;
  s << "/vlarl_" << getpid() << "_" << counter++ << "_" << std::hex << (static_cast<uint64_t>(rd()) << 32 | rd());
  return s.str();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlarl-fast compiled core: shared-memory batches for the vectorised environment manager";
  init_numpy();
  m.attr("ALIGNMENT") = vlarl::kAlign;
  m.attr("LAYOUT_VERSION") = vlarl::kLayoutVersion;
  m.def("build_info", []() {
        auto info = vlarl::build_info();
        info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR);
        return info;
      },
      "Compiler, C++ standard, build type and wait mechanism of this extension (a dict of strings)");

  py::class_<ShmBatch, std::shared_ptr<ShmBatch>>(m, "SharedBatch", py::custom_type_setup([](PyHeapTypeObject* t) {
        t->as_buffer.bf_getbuffer = batch_getbuffer;
        t->as_buffer.bf_releasebuffer = nullptr;  // the buffer borrows the mapping, which lives as long as the batch
        t->ht_type.tp_as_buffer = &t->as_buffer;
      }), R"doc(
Named shared-memory batch of per-env slots for worker processes.

Every field is an array [num_envs, *shape] of one dtype, starting on a 64-byte boundary; every
slot also has a 32-bit state word (meaning up to the caller, e.g. 0 free, 1 ready, 2 consumed)
with process-shared wait/notify (futex). Views are numpy arrays over the shared memory itself.

    b = SharedBatch.create(None, 8, {"image": ("uint8", (128, 128, 3)), "reward": ("float32", ())})
    # in a worker (spawned: pass b itself, it pickles by name, or b.name to SharedBatch.attach)
    w = SharedBatch.attach(b.name); w.write("image", 3, img); w.set_state(3, 1)
    # in the manager
    ready = b.wait_any(1, min_count=4, timeout=5.0); obs = b.array("image")[ready]

The creator unlinks the name on close() (or when it is garbage-collected), or earlier with
unlink() once the other processes hold it (attached, or through fileno() passed over a Unix
socket and attach_fd): then not even a killed creator leaves an entry in /dev/shm. Views stay valid.

Many slots at once: set_states(ids, value) publishes them with one call; wait_slots(ids, value,
min_count) sleeps (GIL released) until min_count of them hold value, woken once rather than per
slot, and returns them in the order they reached it.
)doc")
      .def_static("create", [](std::optional<std::string> name, size_t num_envs, const py::dict& fields) {
            std::vector<FieldSpec> specs = parse_fields(fields);
            return ShmBatch::create(name.has_value() ? *name : unique_name(), num_envs, specs);
          }, py::arg("name"), py::arg("num_envs"), py::arg("fields"),
          "Create (and own) a batch. name: POSIX shm name ('/x' or 'x'; None picks a unique one); "
          "fields: {name: (dtype, shape per env)}")
      .def_static("attach", &ShmBatch::attach, py::arg("name"), "Attach to a batch another process created")
      .def_static("attach_fd", &ShmBatch::attach_fd, py::arg("fd"),
          "Attach through a descriptor of the batch (another process's fileno(), passed e.g. with "
          "multiprocessing.reduction.send_handle); works after the name is unlinked. The caller keeps its fd.")
      .def_static("remove", [](const std::string& name) {
            return shm_unlink(vlarl::normalize_shm_name(name).c_str()) == 0;
          }, py::arg("name"), "Unlink a stale batch name left by a crashed owner; False if there was none")
      .def_property_readonly("name", &ShmBatch::name)
      .def_property_readonly("num_envs", &ShmBatch::num_envs)
      .def_property_readonly("owner", &ShmBatch::owner,
          "True while this handle created the batch and its name is still linked (not closed or unlinked)")
      .def_property_readonly("nbytes", &ShmBatch::size)
      .def_property_readonly("closed", &ShmBatch::closed)
      .def_property_readonly("fields", [](const ShmBatch& b) {
            py::dict out;
            for (size_t i = 0; i < b.num_fields(); ++i) {
              const auto& f = b.field(i);
              out[py::str(f.name)] = py::make_tuple(code_dtype(f.dtype), py::tuple(py::cast(env_shape(f))));
            }
            return out;
          }, "{name: (numpy dtype, shape per env)}")
      .def("array", [](const std::shared_ptr<ShmBatch>& b, const std::string& name) {
            const auto& f = find_field(*b, name);
            return view(b, f, static_cast<size_t>(f.offset), true);
          }, py::arg("field"), "Zero-copy numpy view [num_envs, *shape] of a field")
      .def("__getitem__", [](const std::shared_ptr<ShmBatch>& b, const std::string& name) {
            const auto& f = find_field(*b, name);
            return view(b, f, static_cast<size_t>(f.offset), true);
          }, py::arg("field"))
      .def("slot", [](const std::shared_ptr<ShmBatch>& b, const std::string& name, int64_t env) {
            const auto& f = find_field(*b, name);
            return view(b, f, slot_offset(*b, f, env), false);
          }, py::arg("field"), py::arg("env"), "Zero-copy numpy view of one env's slot of a field")
      .def("write", [](const std::shared_ptr<ShmBatch>& b, const std::string& name, int64_t env, py::handle value) {
            const auto& f = find_field(*b, name);
            py::object dst = view(b, f, slot_offset(*b, f, env), false);
            py::object src = np().asarray(value);
            std::vector<py::ssize_t> want = env_shape(f), got;
            for (auto d : py::tuple(src.attr("shape"))) got.push_back(d.cast<py::ssize_t>());
            if (want != got)
              throw py::value_error("field '" + name + "' holds " + shape_str(want) + " per env, got shape " +
                                    shape_str(got));
            py::object src_dtype = src.attr("dtype");
            const py::object& dst_dtype = code_dtype(f.dtype);
            if (!np().can_cast(src_dtype, dst_dtype, **np().same_kind).cast<bool>())
              throw py::type_error("cannot write " + std::string(py::str(src_dtype)) + " into " +
                                   std::string(py::str(dst_dtype)) + " field '" + name + "'");
            np().copyto(dst, src, **np().same_kind);
          }, py::arg("field"), py::arg("env"), py::arg("value"),
          "Copy value into one env's slot; checks its shape exactly and its dtype (same kind, e.g. float64 -> float32)")
      .def("fileno", &ShmBatch::fd, "The batch's file descriptor (this handle owns it), to pass to another process")
      .def("unlink", &ShmBatch::unlink,
           "Remove the name now (creator only; idempotent). Attached processes and passed descriptors keep "
           "working; nobody can attach by name afterwards")
      .def("state", [](const ShmBatch& b, int64_t env) { return b.state(env_index(b, env)); }, py::arg("env"))
      .def("stamp", [](const ShmBatch& b, int64_t env) { return b.stamp(env_index(b, env)); }, py::arg("env"),
           "The number of the slot's last state change in the batch's sequence of changes (wraps at 2^32)")
      .def("stamps", [](const ShmBatch& b) {
            return new_array<uint32_t>(b.num_envs(), np().uint32, [&](uint32_t* p) {
              for (size_t i = 0; i < b.num_envs(); ++i) p[i] = b.stamp(i);
            });
          }, "A copy of every slot's stamp (uint32)")
      .def("states", [](const ShmBatch& b) {
            return new_array<uint32_t>(b.num_envs(), np().uint32, [&](uint32_t* p) {
              for (size_t i = 0; i < b.num_envs(); ++i) p[i] = b.state(i);
            });
          }, "A copy of every slot's state word (uint32)")
      .def("set_state", [](const ShmBatch& b, int64_t env, uint32_t value) {
            size_t i = env_index(b, env);
            py::gil_scoped_release nogil;
            b.set_state(i, value);
          }, py::arg("env"), py::arg("value"),
          "Publish a slot's new state (after writing the slot) and wake every waiter")
      .def("set_states", [](const ShmBatch& b, py::handle env_ids, uint32_t value) {
            std::vector<size_t> ids = parse_env_ids(b, env_ids);
            py::gil_scoped_release nogil;
            b.set_states(ids.data(), ids.size(), value);
          }, py::arg("env_ids"), py::arg("value"),
          "Publish value in every listed slot with one call (same effect as set_state on each); every id is "
          "checked before any slot changes")
      .def("compare_exchange", [](const ShmBatch& b, int64_t env, uint32_t expected, uint32_t desired) {
            size_t i = env_index(b, env);
            py::gil_scoped_release nogil;
            return b.compare_exchange(i, expected, desired);
          }, py::arg("env"), py::arg("expected"), py::arg("desired"),
          "Atomically set the state to desired if it holds expected; returns whether it did")
      .def("wait", [](const std::shared_ptr<ShmBatch>& b, int64_t env, uint32_t value, std::optional<double> timeout) {
            size_t i = env_index(*b, env);
            if (b->closed()) throw std::runtime_error("batch " + b->name() + " is closed");
            return interruptible_wait(parse_timeout(timeout), [&](double s) { return b->wait(i, value, s); });
          }, py::arg("env"), py::arg("value"), py::arg("timeout") = py::none(),
          "Block (GIL released) until the slot's state equals value; False on timeout (None: no limit)")
      .def("publish_and_wait", [](const std::shared_ptr<ShmBatch>& b, int64_t env, uint32_t publish, uint32_t want,
                                  std::optional<double> timeout) {
            size_t i = env_index(*b, env);
            {
              py::gil_scoped_release nogil;
              b->set_state(i, publish);
            }
            return interruptible_wait(parse_timeout(timeout), [&](double s) { return b->wait(i, want, s); });
          }, py::arg("env"), py::arg("publish"), py::arg("want"), py::arg("timeout") = py::none(),
          "A worker's round trip: set_state(env, publish), then wait(env, want, timeout)")
      .def("wait_slots", [](const std::shared_ptr<ShmBatch>& b, py::handle env_ids, uint32_t value,
                            std::optional<size_t> min_count, std::optional<double> timeout) {
            std::vector<size_t> ids = parse_env_ids(*b, env_ids), ready;
            size_t k = min_count.has_value() ? *min_count : ids.size();
            interruptible_wait(parse_timeout(timeout),
                               [&](double s) { return b->wait_slots(ids.data(), ids.size(), value, k, s, &ready); });
            return id_array(ready);
          }, py::arg("env_ids"), py::arg("value"), py::arg("min_count") = py::none(), py::arg("timeout") = py::none(),
          "Block (GIL released) until at least min_count (default: all) of the listed slots hold value; "
          "returns those that hold it, oldest state change first (fewer than min_count on timeout)")
      .def("wait_all", [](const std::shared_ptr<ShmBatch>& b, uint32_t value, std::optional<double> timeout) {
            std::vector<size_t> ready;
            size_t n = b->num_envs();
            return interruptible_wait(parse_timeout(timeout),
                                      [&](double s) { return b->wait_count(value, n, s, &ready); });
          }, py::arg("value"), py::arg("timeout") = py::none(),
          "Block (GIL released) until every slot's state equals value; False on timeout")
      .def("wait_any", [](const std::shared_ptr<ShmBatch>& b, uint32_t value, size_t min_count, std::optional<double> timeout) {
            std::vector<size_t> ready;
            if (min_count == 0) min_count = 1;
            interruptible_wait(parse_timeout(timeout), [&](double s) { return b->wait_count(value, min_count, s, &ready); });
            return ready;
          }, py::arg("value"), py::arg("min_count") = 1, py::arg("timeout") = py::none(),
          "Block (GIL released) until at least min_count slots hold value; returns the ids of the slots that "
          "hold it (fewer than min_count, possibly none, on timeout)")
      .def("close", &ShmBatch::close,
           "Close this handle; the creator unlinks the name. Views already taken stay valid.")
      .def("__enter__", [](const std::shared_ptr<ShmBatch>& b) { return b; })
      .def("__exit__", [](ShmBatch& b, py::args) { b.close(); })
      .def("__repr__", [](const ShmBatch& b) {
            std::string s = "SharedBatch(name='" + b.name() + "', num_envs=" + std::to_string(b.num_envs()) + ", fields={";
            for (size_t i = 0; i < b.num_fields(); ++i) {
              const auto& f = b.field(i);
              s += (i ? ", '" : "'") + std::string(f.name) + "': (" + std::string(py::str(code_dtype(f.dtype))) +
                   ", " + shape_str(env_shape(f)) + ")";
            }
            return s + "}" + (b.owner() ? ", owner" : "") + (b.closed() ? ", closed" : "") + ")";
          })
      .def(py::pickle(
          [](const ShmBatch& b) {
            if (b.closed()) throw std::runtime_error("cannot pickle closed batch " + b.name());
            return py::make_tuple(b.name());
          },
          [](py::tuple t) { return ShmBatch::attach(t[0].cast<std::string>()); }));
}
