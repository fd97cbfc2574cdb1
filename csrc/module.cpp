// The Python module lavae_fast._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations
// of the CPU kernels (csrc/dispatch.cpp) for the ops defined in lavae_fast/engine/ops.py and norm.py.
// Its functions report and switch the kernel variant (kernel_table.h):
//   cpu_capability() -> str, available_cpu_capabilities() -> list[str], set_cpu_capability(str)
#include <Python.h>

#include <c10/util/Exception.h>

#include "kernel_table.h"

// The digest of the op schemas this build was compiled against (setup.py passes it; see
// lavae_fast/engine/_schemas.py). Python reads these bytes from the file before loading it: a build from
// other schemas would fail the dispatcher's schema check inside a static initialiser, which aborts.
#ifndef LAVAE_FAST_SCHEMA_DIGEST
#define LAVAE_FAST_SCHEMA_DIGEST unknown
#endif
#define LAVAE_FAST_STR2(x) #x
#define LAVAE_FAST_STR(x) LAVAE_FAST_STR2(x)
extern "C" __attribute__((used, visibility("default"))) const char lavae_fast_op_schemas_stamp[] =
    "lavae_fast-op-schemas:" LAVAE_FAST_STR(LAVAE_FAST_SCHEMA_DIGEST) ";";

namespace {

PyObject* py_cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(lavae_fast::cpu_capability().c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_available(PyObject*, PyObject*) {
  const auto names = lavae_fast::available_cpu_capabilities();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) PyList_SET_ITEM(list, i, PyUnicode_FromString(names[i].c_str()));
  return list;
}

PyObject* py_set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    lavae_fast::set_cpu_capability(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS, "The CPU kernel variant the ops run: default, avx2 or avx512."},
    {"available_cpu_capabilities", py_available, METH_NOARGS, "Variants built in and runnable on this CPU."},
    {"set_cpu_capability", py_set_cpu_capability, METH_O, "Switch the CPU kernel variant (ValueError if unusable)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lavae_fast CPU kernels", -1, methods};
  return PyModule_Create(&module_def);
}
}
