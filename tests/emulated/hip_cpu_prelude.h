// Force-included (-include) before every source of the emulated CUDA tier: it lets g++ compile dat's .cu
// files unchanged against HIP-CPU, which runs their device code on the CPU.
//
// What it maps:
//  * launches: dat::launch_kernel checks what a GPU would refuse (empty or oversized grids and blocks,
//    dynamic shared memory beyond what the kernel opted in to, default 48 KB), runs the kernel through
//    hipLaunchKernelGGL and waits for it, since the CPU tensors around it are not stream-ordered;
//  * dynamic shared memory: filled with NaN bytes (0xFF) when each block starts, so a kernel that reads
//    shared memory it did not write computes NaN and fails its test;
//  * warps: CUDA's 32-lane *_sync shuffles on HIP-CPU's 64-lane warps (an xor shuffle by less than 32
//    stays inside its 32-lane half); __syncwarp becomes a block barrier (HIP-CPU's shuffles are too);
//  * the CUDA runtime calls dat uses, against an emulated device with an H100's shared-memory limits (or
//    the opt-in limit that $DAT_EMULATED_SHARED_OPTIN_BYTES names, so that tests reach kernel limits of
//    smaller GPUs); the c10/cuda headers are replaced by the stubs in tests/emulated/include.
#pragma once

// ATen first, while neither __CUDACC__ nor __HIPCC__ is defined, so c10 takes its plain host definitions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <hip/hip_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

// HIP-CPU asks GCC for SIMD clones of every kernel and device function; they only slow the build here.
#undef __device__
#define __device__
#undef __global__
#define __global__

#define DAT_EMULATED_CUDA 1
#define DAT_CUDA_DISPATCH_KEY CPU

// Device code calls ::min / ::max as CUDA declares them.
using std::max;
using std::min;

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int width = 32) {
  return __shfl_xor(value, lane_mask, width);
}

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) { __syncthreads(); }

#define DAT_DYNAMIC_SHARED(type, name) \
  HIP_DYNAMIC_SHARED(type, name)       \
  ::dat_emulation::poison_at_block_start(std::data(__hip_##name##_storage__), std::size(__hip_##name##_storage__))

enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
using cudaStream_t = hipStream_t;

inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

namespace dat_emulation {

constexpr int kDefaultSharedBytes = 48 * 1024;
constexpr int kH100OptInSharedBytes = 227 * 1024;  // an H100's opt-in limit per block

// The emulated device's opt-in limit per block, read at every query so that a test can set it.
inline int opt_in_shared_bytes() {
  const char* bytes = std::getenv("DAT_EMULATED_SHARED_OPTIN_BYTES");
  return bytes != nullptr ? std::atoi(bytes) : kH100OptInSharedBytes;
}

// Thread (0, 0, 0) runs first in every HIP-CPU block, before any other thread of it starts.
inline void poison_at_block_start(std::byte* storage, size_t bytes) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) std::memset(storage, 0xFF, bytes);
}

// Dynamic shared memory each kernel has opted in to (cudaFuncSetAttribute), keyed by its address.
inline std::unordered_map<const void*, int>& opted_in_shared_bytes() {
  static std::unordered_map<const void*, int> limits;
  return limits;
}
inline std::mutex& opted_in_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline int shared_limit_of(const void* kernel) {
  const std::lock_guard<std::mutex> lock(opted_in_mutex());
  const auto found = opted_in_shared_bytes().find(kernel);
  return found == opted_in_shared_bytes().end() ? kDefaultSharedBytes : found->second;
}

}  // namespace dat_emulation

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = dat_emulation::opt_in_shared_bytes();
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute, int bytes) {
  TORCH_CHECK(bytes <= dat_emulation::opt_in_shared_bytes(), "emulated cudaFuncSetAttribute: ", bytes,
              " bytes is above the device's opt-in limit");
  const std::lock_guard<std::mutex> lock(dat_emulation::opted_in_mutex());
  dat_emulation::opted_in_shared_bytes()[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}

namespace dat {

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535,
              "emulated launch: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x * block.y * block.z <= 1024,
              "emulated launch: invalid block (", block.x, ", ", block.y, ", ", block.z, ")");
  const int limit = dat_emulation::shared_limit_of(reinterpret_cast<const void*>(kernel));
  TORCH_CHECK(shared_bytes <= static_cast<size_t>(limit), "emulated launch: ", shared_bytes,
              " bytes of dynamic shared memory, but the kernel may use ", limit);
  hipLaunchKernelGGL(kernel, grid, block, static_cast<std::uint32_t>(shared_bytes), stream,
                     std::forward<Args>(args)...);
  TORCH_CHECK(hipStreamSynchronize(stream) == hipSuccess, "emulated launch: the kernel failed");
}

}  // namespace dat
