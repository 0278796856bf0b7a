// Makes each extension library importable as a Python module (minillm_fast._C, minillm_fast._C_cuda) when
// setup.py builds it ahead of time. It holds no functions: the operators register themselves with the
// PyTorch dispatcher (TORCH_LIBRARY_IMPL in the bindings) as soon as the library is loaded.
#include <Python.h>

#define MINILLM_CONCAT_(a, b) a##b
#define MINILLM_CONCAT(a, b) MINILLM_CONCAT_(a, b)
#define MINILLM_STRINGIFY_(a) #a
#define MINILLM_STRINGIFY(a) MINILLM_STRINGIFY_(a)

static struct PyModuleDef minillm_module = {PyModuleDef_HEAD_INIT, MINILLM_STRINGIFY(TORCH_EXTENSION_NAME),
                                            "minillm_fast kernels (registered as torch.ops.minillm_fast.*)", -1,
                                            nullptr};

PyMODINIT_FUNC MINILLM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&minillm_module); }
