// The `dat._C` Python module. It holds no Python functions of its own: importing it loads this
// shared library, whose static initialisers register every `dat::` op with the PyTorch dispatcher
// (schemas in each op folder's <op>.cpp, kernels in its cpu/ and cuda/ subfolders).
#include <Python.h>

static struct PyModuleDef dat_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dat_module); }
