// The `dat._C` Python module. Importing it loads this shared library, whose static initialisers register
// every `dat::` op with the PyTorch dispatcher (schemas in each op folder's <op>.cpp, kernels in its cpu/
// and cuda/ subfolders). Its one attribute, `build_config`, says how the binary was built, for
// `python -m dat info`: the values setup.py recorded (dat_build_config.h, generated into build/generated/)
// and those only the compiler and this CPU know.
#include <Python.h>

#include "common/cpu_isa.h"
#include "dat_build_config.h"

#if defined(__clang__)
#define DAT_HOST_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define DAT_HOST_COMPILER "gcc " __VERSION__
#else
#define DAT_HOST_COMPILER "unknown"
#endif

#ifdef DAT_CPU_AVX2_CLONES
#define DAT_CPU_ISAS "baseline, avx2+fma"
#else
#define DAT_CPU_ISAS "baseline"
#endif

static struct PyModuleDef dat_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dat_module);
  if (module == nullptr) return nullptr;
  // "z" turns a null string (a build without CUDA kernels) into None
  PyObject* config = Py_BuildValue(
      "{s:s,s:s,s:z,s:z,s:s,s:s}", "torch_version", DAT_BUILD_TORCH_VERSION, "compiler", DAT_HOST_COMPILER,
      "cuda_version", DAT_BUILD_CUDA_VERSION, "cuda_arch_list", DAT_BUILD_CUDA_ARCH_LIST, "cpu_isas", DAT_CPU_ISAS,
      "cpu_isa_in_use", dat::cpu_has_avx2_fma() ? "avx2+fma" : "baseline");
  if (config == nullptr || PyModule_AddObject(module, "build_config", config) < 0) {
    Py_XDECREF(config);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
