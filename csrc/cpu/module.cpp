// The Python module object of one capability build (cai_kernels._C_avx512, _C_avx2, _C_default).
//
// The kernels themselves register with the dispatcher under the `cai_kernels_cpu` namespace
// (TORCH_LIBRARY_FRAGMENT in each kernel file); importing this module is what runs those
// registrations. It is written against the bare CPython API so it compiles without pybind11.
#include <Python.h>

#define CAI_STR_(x) #x
#define CAI_STR(x) CAI_STR_(x)
#define CAI_CAT_(a, b) a##b
#define CAI_CAT(a, b) CAI_CAT_(a, b)

static struct PyModuleDef cai_module_def = {
    PyModuleDef_HEAD_INIT, CAI_STR(TORCH_EXTENSION_NAME),
    "cai_kernels C++ CPU kernels; ops live in torch.ops.cai_kernels_cpu", -1, nullptr};

PyMODINIT_FUNC CAI_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&cai_module_def);
  if (module != nullptr) {
    PyModule_AddStringConstant(module, "capability", CAI_STR(CAI_CAPABILITY_NAME));
  }
  return module;
}
