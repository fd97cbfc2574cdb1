// The Python module lavae_fast._C. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL registrations of the CPU kernels for the ops defined in lavae_fast/ops.py.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lavae_fast CPU kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
