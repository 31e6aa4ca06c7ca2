// Python bindings of the shared batch (module vlarl_fast._C). Arrays are numpy views of the
// shared memory itself: the batch object is their base, so the memory lives as long as any view.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "shm_batch.h"
#include "version.h"

namespace py = pybind11;
using vlarl::FieldSpec;
using vlarl::ShmBatch;

namespace {

char dtype_code(const py::dtype& dt) {
  if (dt.is(py::dtype::of<uint8_t>())) return 'u';
  if (dt.is(py::dtype::of<bool>())) return 'b';
  if (dt.is(py::dtype::of<float>())) return 'f';
  if (dt.is(py::dtype::of<int32_t>())) return 'i';
  if (dt.is(py::dtype::of<int64_t>())) return 'l';
  if (dt.is(py::dtype::of<double>())) return 'd';
  throw py::type_error("unsupported dtype " + std::string(py::str(dt)) +
                       "; use uint8, bool, float32, int32, int64 or float64");
}

py::dtype code_dtype(char c) {
  switch (c) {
    case 'u': return py::dtype::of<uint8_t>();
    case 'b': return py::dtype::of<bool>();
    case 'f': return py::dtype::of<float>();
    case 'i': return py::dtype::of<int32_t>();
    case 'l': return py::dtype::of<int64_t>();
    default: return py::dtype::of<double>();
  }
}

py::array view(const std::shared_ptr<ShmBatch>& b, const vlarl::FieldDesc& f, uint8_t* ptr, bool with_env_dim) {
  std::vector<py::ssize_t> shape;
  if (with_env_dim) shape.push_back(static_cast<py::ssize_t>(b->num_envs()));
  for (int d = 0; d < f.ndim; ++d) shape.push_back(f.shape[d]);
  py::dtype dt = code_dtype(f.dtype);
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t s = dt.itemsize();
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  return py::array(dt, shape, strides, ptr, py::cast(b));
}

const vlarl::FieldDesc& find_field(const ShmBatch& b, const std::string& name) {
  if (b.closed()) throw std::runtime_error("batch " + b.name() + " is closed");
  for (size_t i = 0; i < b.num_fields(); ++i)
    if (name == b.field(i).name) return b.field(i);
  throw py::key_error("no field '" + name + "' in batch " + b.name());
}

std::vector<FieldSpec> parse_fields(const py::dict& fields) {
  std::vector<FieldSpec> specs;
  for (auto item : fields) {
    auto spec = item.second.cast<py::tuple>();
    if (spec.size() != 2) throw py::value_error("each field is (dtype, shape)");
    FieldSpec fs;
    fs.name = item.first.cast<std::string>();
    fs.dtype = dtype_code(py::dtype::from_args(spec[0]));
    for (auto d : spec[1].cast<py::tuple>()) fs.shape.push_back(d.cast<int64_t>());
    specs.push_back(fs);
  }
  return specs;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlarl-fast compiled core: shared-memory batches for the vectorised environment manager";
  m.def("build_info", &vlarl::build_info, "Compiler, C++ standard and build type of this extension");

  py::class_<ShmBatch, std::shared_ptr<ShmBatch>>(m, "SharedBatch", R"doc(
Named shared-memory batch of per-env slots: fields [num_envs, *shape], 64-byte aligned, plus one
32-bit state word per slot with futex wait/notify across processes.

SharedBatch.create(name, num_envs, {"image": ("uint8", (64, 64, 3)), "reward": ("float32", ())})
SharedBatch.attach(name)   # in another process
)doc")
      .def_static("create", [](const std::string& name, size_t num_envs, const py::dict& fields) {
            return ShmBatch::create(name, num_envs, parse_fields(fields));
          }, py::arg("name"), py::arg("num_envs"), py::arg("fields"))
      .def_static("attach", &ShmBatch::attach, py::arg("name"))
      .def_property_readonly("name", &ShmBatch::name)
      .def_property_readonly("num_envs", &ShmBatch::num_envs)
      .def_property_readonly("owner", &ShmBatch::owner)
      .def_property_readonly("nbytes", &ShmBatch::size)
      .def_property_readonly("closed", &ShmBatch::closed)
      .def_property_readonly("fields", [](const ShmBatch& b) {
            py::dict out;
            for (size_t i = 0; i < b.num_fields(); ++i) {
              const auto& f = b.field(i);
              py::list shape;
              for (int d = 0; d < f.ndim; ++d) shape.append(f.shape[d]);
              out[py::str(f.name)] = py::make_tuple(code_dtype(f.dtype), py::tuple(shape));
            }
            return out;
          })
      .def("array", [](const std::shared_ptr<ShmBatch>& b, const std::string& name) {
            const auto& f = find_field(*b, name);
            return view(b, f, b->field_ptr(f), true);
          }, py::arg("field"), "Zero-copy numpy view [num_envs, *shape] of a field")
      .def("slot", [](const std::shared_ptr<ShmBatch>& b, const std::string& name, size_t env) {
            const auto& f = find_field(*b, name);
            return view(b, f, b->slot_ptr(f, env), false);
          }, py::arg("field"), py::arg("env"), "Zero-copy numpy view of one env's slot of a field")
      .def("state", &ShmBatch::state, py::arg("env"))
      .def("set_state", &ShmBatch::set_state, py::arg("env"), py::arg("value"),
           "Publish a slot state and wake every waiter", py::call_guard<py::gil_scoped_release>())
      .def("wait", &ShmBatch::wait, py::arg("env"), py::arg("value"), py::arg("timeout") = -1.0,
           "Block (GIL released) until the slot state equals value; False on timeout",
           py::call_guard<py::gil_scoped_release>())
      .def("wait_all", [](const ShmBatch& b, uint32_t value, double timeout) {
            auto start = std::chrono::steady_clock::now();
            for (size_t i = 0; i < b.num_envs(); ++i) {
              double left = timeout;
              if (timeout >= 0) {
                left = timeout - std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
                if (left < 0) left = 0;
              }
              if (!b.wait(i, value, left)) return false;
            }
            return true;
          }, py::arg("value"), py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("close", &ShmBatch::close, "Unmap (and unlink, if this process created it)");
}
