// came_kernels._host: the per-step checks of the steady-state fast path, in C++ (no CUDA).
//
// A fused step keeps its device tables between steps, so every step must show that nothing they address
// has changed: each grad's type, dtype, device, shape, contiguity and address, and the address (and the
// params' strides) of every param and state tensor; and that the optimizer's state holds the same entries.
// From Python that is one C-level call per tensor and fact, about 0.1 us each: some 2,500 calls and 0.25 ms
// for TinyLlama's 201 params and 1,071 tensors, as long as the kernels' own host code. Here it is one call
// per list, a few ns per tensor.
//
// grads, ptrs and strides return the facts as bytes (int64 words), which the caller compares as a whole
// with those of the last fully validated step, or None when an element is not a plain strided tensor (a
// subclass such as DTensor, a sparse grad): the Python path, which knows what to say about it, takes over.
// same_state returns a bool. They read and never change anything; they raise TypeError for arguments of
// the wrong kind, and same_state passes on an error raised by comparing two non-tensor state entries.
//
// Built by setup.py wherever torch is importable at build time (any GPU install; on a CPU machine with
// `pip install --no-build-isolation -e .`); came_kernels/_fastpath.py falls back to Python without it.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

#include <cstdint>
#include <exception>
#include <vector>

namespace {

PyObject* g_parameter = nullptr;  // torch.nn.Parameter, looked up on first use (import order)

bool parameter_type(PyTypeObject* t) {
  if (g_parameter == nullptr) {
    PyObject* mod = PyImport_ImportModule("torch.nn.parameter");
    if (mod == nullptr) {
      PyErr_Clear();
      return false;
    }
    g_parameter = PyObject_GetAttrString(mod, "Parameter");
    Py_DECREF(mod);
    if (g_parameter == nullptr) {
      PyErr_Clear();
      return false;
    }
  }
  return reinterpret_cast<PyObject*>(t) == g_parameter;
}

// Exactly torch.Tensor (or torch.nn.Parameter where `param_ok`), strided, with storage: the tensors whose
// Python getters these functions stand in for (a subclass may override them through __torch_function__).
bool plain(PyObject* obj, bool param_ok) {
  PyTypeObject* t = Py_TYPE(obj);
  if (reinterpret_cast<PyObject*>(t) != THPVariableClass && !(param_ok && parameter_type(t))) return false;
  const at::Tensor& x = THPVariable_Unpack(obj);
  return x.layout() == c10::kStrided && x.has_storage();
}

int64_t address(const at::Tensor& x) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(x.data_ptr())); }

PyObject* to_bytes(const std::vector<int64_t>& v) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(v.data()),
                                   static_cast<Py_ssize_t>(v.size() * sizeof(int64_t)));
}

// A list or tuple as a borrowed array (PySequence_Fast); nullptr with TypeError set otherwise.
struct Items {
  PyObject* seq = nullptr;
  Py_ssize_t n = 0;
  PyObject** items = nullptr;
  explicit Items(PyObject* arg) {
    seq = PySequence_Fast(arg, "expected a list or tuple of tensors");
    if (seq != nullptr) {
      n = PySequence_Fast_GET_SIZE(seq);
      items = PySequence_Fast_ITEMS(seq);
    }
  }
  ~Items() { Py_XDECREF(seq); }
};

// grads(params) -> (grads, kinds, ptrs, contiguous) or None.
//   grads: the list of the params' grads that are not None, in order;
//   kinds: per param, -1 when it has no grad, else dtype, device, ndim, then the sizes;
//   ptrs:  per grad, its data_ptr();
//   contiguous: whether every grad is contiguous (a layout the fused backends check, not a kind).
// None when a param is not a plain Tensor/Parameter or a grad not a plain strided Tensor.
PyObject* grads(PyObject*, PyObject* arg) {
  Items ps(arg);
  if (ps.seq == nullptr) return nullptr;
  std::vector<int64_t> kinds, ptrs;
  kinds.reserve(static_cast<size_t>(ps.n) * 6);
  ptrs.reserve(static_cast<size_t>(ps.n));
  bool contiguous = true;
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  try {
    for (Py_ssize_t i = 0; i < ps.n; ++i) {
      if (!plain(ps.items[i], /*param_ok=*/true)) {
        Py_DECREF(out);
        Py_RETURN_NONE;
      }
      const at::Tensor& g = THPVariable_Unpack(ps.items[i]).grad();
      if (!g.defined()) {
        kinds.push_back(-1);
        continue;
      }
      PyObject* gobj = THPVariable_Wrap(g);  // the grad's own Python object (a new reference)
      if (gobj == nullptr || !plain(gobj, /*param_ok=*/false)) {
        Py_XDECREF(gobj);
        Py_DECREF(out);
        if (PyErr_Occurred()) return nullptr;
        Py_RETURN_NONE;
      }
      const int append_failed = PyList_Append(out, gobj);
      Py_DECREF(gobj);
      if (append_failed) {
        Py_DECREF(out);
        return nullptr;
      }
      const c10::Device dev = g.device();
      kinds.push_back(static_cast<int64_t>(g.scalar_type()));
      kinds.push_back(static_cast<int64_t>(dev.type()) * 65536 + dev.index() + 1);
      kinds.push_back(g.dim());
      contiguous = contiguous && g.is_contiguous();
      for (int64_t s : g.sizes()) kinds.push_back(s);
      ptrs.push_back(address(g));
    }
  } catch (const std::exception&) {  // a getter torch refuses: let the Python path say what is wrong
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  PyObject* k = to_bytes(kinds);
  PyObject* p = to_bytes(ptrs);
  if (k == nullptr || p == nullptr) {
    Py_XDECREF(k);
    Py_XDECREF(p);
    Py_DECREF(out);
    return nullptr;
  }
  return Py_BuildValue("(NNNO)", out, k, p, contiguous ? Py_True : Py_False);
}

// ptrs(tensors) -> bytes of data_ptr() per tensor, or None (not all plain Tensors/Parameters).
PyObject* ptrs(PyObject*, PyObject* arg) {
  Items ts(arg);
  if (ts.seq == nullptr) return nullptr;
  std::vector<int64_t> v(static_cast<size_t>(ts.n));
  try {
    for (Py_ssize_t i = 0; i < ts.n; ++i) {
      if (!plain(ts.items[i], /*param_ok=*/true)) Py_RETURN_NONE;
      v[static_cast<size_t>(i)] = address(THPVariable_Unpack(ts.items[i]));
    }
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  return to_bytes(v);
}

// strides(tensors) -> bytes of ndim and then the strides, per tensor, or None (as ptrs).
PyObject* strides(PyObject*, PyObject* arg) {
  Items ts(arg);
  if (ts.seq == nullptr) return nullptr;
  std::vector<int64_t> v;
  v.reserve(static_cast<size_t>(ts.n) * 3);
  try {
    for (Py_ssize_t i = 0; i < ts.n; ++i) {
      if (!plain(ts.items[i], /*param_ok=*/true)) Py_RETURN_NONE;
      const at::Tensor& x = THPVariable_Unpack(ts.items[i]);
      v.push_back(x.dim());
      for (int64_t s : x.strides()) v.push_back(s);
    }
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  return to_bytes(v);
}

// Whether a and b are the same object, or equal non-tensors (a tensor is never compared by value: that
// would be device work, and a host sync).
int same_entry(PyObject* a, PyObject* b) {
  if (a == b) return 1;
  if (THPVariable_Check(a) || THPVariable_Check(b)) return 0;
  return PyObject_RichCompareBool(a, b, Py_EQ);  // -1 with an error set
}

// same_state(state, keys, values) -> bool: whether the optimizer's state (a dict of param -> dict) holds
// the params `keys` in that order, and for each the very entries of the dict in `values` (same keys, the
// same objects; non-tensors may be equal instead). What CAME._state_unchanged compares in Python.
PyObject* same_state(PyObject*, PyObject* args) {
  PyObject *state, *keys, *values;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &state, &PyList_Type, &keys, &PyList_Type, &values)) {
    return nullptr;
  }
  const Py_ssize_t n = PyDict_Size(state);
  if (PyList_GET_SIZE(keys) != n || PyList_GET_SIZE(values) != n) Py_RETURN_FALSE;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *entries;
  while (PyDict_Next(state, &pos, &key, &entries)) {
    PyObject* snap = PyList_GET_ITEM(values, i);
    if (key != PyList_GET_ITEM(keys, i++) || !PyDict_Check(entries) || !PyDict_Check(snap) ||
        PyDict_Size(entries) != PyDict_Size(snap)) {
      Py_RETURN_FALSE;
    }
    Py_ssize_t epos = 0;
    PyObject *name, *value;
    while (PyDict_Next(entries, &epos, &name, &value)) {
      PyObject* was = PyDict_GetItemWithError(snap, name);  // borrowed
      if (was == nullptr) {
        if (PyErr_Occurred()) return nullptr;
        Py_RETURN_FALSE;
      }
      const int same = same_entry(value, was);
      if (same < 0) return nullptr;
      if (same == 0) Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"grads", grads, METH_O, "grads(params) -> (grads, kinds, ptrs, contiguous) or None (fast_checks.cpp)"},
    {"ptrs", ptrs, METH_O, "ptrs(tensors) -> bytes of data_ptr() per tensor, or None"},
    {"strides", strides, METH_O, "strides(tensors) -> bytes of ndim and strides per tensor, or None"},
    {"same_state", same_state, METH_VARARGS, "same_state(state, keys, values) -> bool (see fast_checks.cpp)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_host", "Per-step checks of CAME's fast path (see fast_checks.cpp).",
                      -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

#define CAME_STR2(x) #x
#define CAME_STR(x) CAME_STR2(x)

// torch_version: the torch these checks were compiled against. They read torch's structures through inline
// functions of its headers, so came_kernels._fastpath uses them only under that very torch version.
PyMODINIT_FUNC PyInit__host() {
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr &&
      PyModule_AddStringConstant(m, "torch_version", CAME_STR(TORCH_VERSION_MAJOR) "." CAME_STR(
                                     TORCH_VERSION_MINOR) "." CAME_STR(TORCH_VERSION_PATCH)) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
