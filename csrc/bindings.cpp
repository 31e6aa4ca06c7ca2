// Python bindings of the shared batch (module vlarl_fast._C). Arrays are numpy views of the
// shared memory itself: the batch object is their base, so the mapping lives as long as any view.
// Every blocking wait runs without the GIL, in slices, so other Python threads run meanwhile and
// Ctrl-C (any Python signal handler that raises) interrupts it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
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

char dtype_code(const py::dtype& dt) {
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  char code = 0;
  if (dt.attr("isnative").cast<bool>() && dt.attr("fields").is_none()) {
    if (kind == 'b' && size == 1) code = '?';
    if (kind == 'i') code = size == 1 ? 'b' : size == 2 ? 'h' : size == 4 ? 'i' : size == 8 ? 'q' : 0;
    if (kind == 'u') code = size == 1 ? 'B' : size == 2 ? 'H' : size == 4 ? 'I' : size == 8 ? 'Q' : 0;
    if (kind == 'f') code = size == 2 ? 'e' : size == 4 ? 'f' : size == 8 ? 'd' : 0;
  }
  if (code == 0) throw py::type_error("unsupported dtype " + std::string(py::str(dt)) + "; use one of " + kDtypes);
  return code;
}

py::dtype code_dtype(char c) { return py::dtype(std::string(1, c)); }

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

py::array view(const std::shared_ptr<ShmBatch>& b, const FieldDesc& f, uint8_t* ptr, bool with_env_dim) {
  std::vector<py::ssize_t> shape = env_shape(f);
  if (with_env_dim) shape.insert(shape.begin(), static_cast<py::ssize_t>(b->num_envs()));
  py::dtype dt = code_dtype(f.dtype);
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t s = dt.itemsize();
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  return py::array(dt, shape, strides, ptr, py::cast(b));  // base = the batch: no copy, kept alive
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

// Env ids from any integer sequence or array (one dimension), checked against the batch.
std::vector<size_t> parse_env_ids(const ShmBatch& b, py::handle ids) {
  py::array arr = py::module_::import("numpy").attr("asarray")(ids);
  if (arr.ndim() != 1) throw py::value_error("env_ids must be a 1-D sequence of env indices");
  const char kind = arr.dtype().kind();
  if (arr.size() > 0 && kind != 'i' && kind != 'u')
    throw py::type_error("env_ids must be integers, got dtype " + std::string(py::str(arr.dtype())));
  auto ints = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  std::vector<size_t> out(static_cast<size_t>(ints.size()));
  const int64_t* p = ints.data();
  for (size_t j = 0; j < out.size(); ++j) out[j] = env_index(b, p[j]);
  return out;
}

py::array_t<int64_t> id_array(const std::vector<size_t>& ids) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(ids.size()));
  int64_t* p = out.mutable_data();
  for (size_t j = 0; j < ids.size(); ++j) p[j] = static_cast<int64_t>(ids[j]);
  return out;
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
    fs.dtype = dtype_code(py::dtype::from_args(seq[0]));
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
  m.attr("ALIGNMENT") = vlarl::kAlign;
  m.attr("LAYOUT_VERSION") = vlarl::kLayoutVersion;
  m.def("build_info", []() {
        auto info = vlarl::build_info();
        info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR);
        return info;
      },
      "Compiler, C++ standard, build type and wait mechanism of this extension (a dict of strings)");

  py::class_<ShmBatch, std::shared_ptr<ShmBatch>>(m, "SharedBatch", R"doc(
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
            return view(b, f, b->field_ptr(f), true);
          }, py::arg("field"), "Zero-copy numpy view [num_envs, *shape] of a field")
      .def("__getitem__", [](const std::shared_ptr<ShmBatch>& b, const std::string& name) {
            const auto& f = find_field(*b, name);
            return view(b, f, b->field_ptr(f), true);
          }, py::arg("field"))
      .def("slot", [](const std::shared_ptr<ShmBatch>& b, const std::string& name, int64_t env) {
            const auto& f = find_field(*b, name);
            return view(b, f, b->slot_ptr(f, env_index(*b, env)), false);
          }, py::arg("field"), py::arg("env"), "Zero-copy numpy view of one env's slot of a field")
      .def("write", [](const std::shared_ptr<ShmBatch>& b, const std::string& name, int64_t env, py::handle value) {
            const auto& f = find_field(*b, name);
            py::array dst = view(b, f, b->slot_ptr(f, env_index(*b, env)), false);
            py::module_ np = py::module_::import("numpy");
            py::array src = np.attr("asarray")(value);
            std::vector<py::ssize_t> want = env_shape(f), got(src.shape(), src.shape() + src.ndim());
            if (want != got)
              throw py::value_error("field '" + name + "' holds " + shape_str(want) + " per env, got shape " +
                                    shape_str(got));
            if (!np.attr("can_cast")(src.dtype(), dst.dtype(), "casting"_a = "same_kind").cast<bool>())
              throw py::type_error("cannot write " + std::string(py::str(src.dtype())) + " into " +
                                   std::string(py::str(dst.dtype())) + " field '" + name + "'");
            np.attr("copyto")(dst, src, "casting"_a = "same_kind");
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
            py::array_t<uint32_t> out(static_cast<py::ssize_t>(b.num_envs()));
            auto* p = out.mutable_data();
            for (size_t i = 0; i < b.num_envs(); ++i) p[i] = b.stamp(i);
            return out;
          }, "A copy of every slot's stamp (uint32)")
      .def("states", [](const ShmBatch& b) {
            py::array_t<uint32_t> out(static_cast<py::ssize_t>(b.num_envs()));
            auto* p = out.mutable_data();
            for (size_t i = 0; i < b.num_envs(); ++i) p[i] = b.state(i);
            return out;
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
