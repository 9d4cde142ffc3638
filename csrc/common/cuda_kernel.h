// What every .cu file of dat uses to launch kernels, to size their dynamic shared memory and to register
// them with the dispatcher.
//
// nvcc gets the CUDA spellings below. The emulated test tier compiles the very same .cu sources as C++
// against HIP-CPU (tests/emulated/hip_cpu_prelude.h defines DAT_EMULATED_CUDA and its own launch_kernel,
// DAT_DYNAMIC_SHARED and DAT_CUDA_DISPATCH_KEY), so no kernel exists in two copies.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <utility>

#include "common/library.h"

#if !defined(DAT_EMULATED_CUDA)
#include <cuda_runtime.h>

// The kernel's dynamic shared memory, `name` of type `type*`.
#define DAT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
// The dispatch key the .cu files register their kernels under.
#define DAT_CUDA_DISPATCH_KEY CUDA

namespace dat {

// Launches `kernel` on `stream`; a launch error (bad configuration, too much shared memory) is raised at once.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dat
#endif

namespace dat {

// Dynamic shared memory a block gets without opting in, on every CUDA architecture.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// The most dynamic shared memory one block of the current device may opt in to.
inline size_t max_shared_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

// The one shared-memory policy of dat's kernels: a launch may use up to the device's opt-in limit; beyond
// it the call is refused with an error naming the op. Kernels check it before they allocate anything
// (check_shared_bytes, which their exported limits describe: `default_shared_bytes` and the device's
// opt-in limit) and again when they launch (reserve_shared_bytes).
inline void check_shared_bytes(size_t bytes, const char* op_name) {
  if (bytes <= kDefaultSharedBytes) return;
  const size_t limit = max_shared_bytes();
  TORCH_CHECK_VALUE(bytes <= limit, op_name, ": needs ", bytes,
                    " bytes of shared memory per block on this GPU, which allows ", limit);
}

// Checks `bytes` as above and lets `kernel` use them. Above the default 48 KB the kernel opts in to the
// device's whole limit rather than to this launch's size, so that a concurrent launch from another host
// thread needing less can never lower the limit under this one.
template <typename Kernel>
void reserve_shared_bytes(Kernel* kernel, size_t bytes, const char* op_name) {
  check_shared_bytes(bytes, op_name);
  if (bytes <= kDefaultSharedBytes) return;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_shared_bytes())));
}

}  // namespace dat
